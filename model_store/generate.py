"""Text generation: prefill the prefix in one forward call, then sample one character per step.

`sample_next` is vectorised over rows that may each have their own sampling settings
and their own random stream, so a row's output never depends on which other rows share
its batch. Each row draws exactly one uniform number per step from its own generator
and picks its character by inverse CDF over the surviving probabilities.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from model_store.model import CharLM, State
from model_store.vocab import Vocabulary


@dataclass(frozen=True)
class SamplingParams:
    """How the next character is chosen. temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus: smallest set of characters whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages characters already in the text

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], not {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], not {self.repetition_penalty!r}")


@dataclass
class Completion:
    text: str  # prefix + generated
    generated: str
    finish_reason: str  # "length" or "stop"
    seed: int | None  # the seed that reproduces this sample (None for greedy)


def row_generator(seed: int) -> torch.Generator:
    """A CPU generator for one row's uniforms (CPU streams are the same on every device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Pick one character per row. logits (rows, vocab); seen (rows, vocab) bool marks the
    characters already in each row's text (for the repetition penalty)."""
    logits = logits.float()
    device = logits.device
    penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if seen is not None and bool((penalty != 1.0).any()):
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    choice = logits.argmax(dim=1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return choice
    idx = torch.tensor(sampled, device=device)
    temperature = torch.tensor([params[i].temperature for i in sampled], device=device)[:, None]
    probs = torch.softmax(logits[idx] / temperature, dim=1)
    sorted_probs, order = probs.sort(dim=1, descending=True)
    cumulative = sorted_probs.cumsum(dim=1)
    position = torch.arange(logits.shape[1], device=device)[None, :]
    top_k = torch.tensor([params[i].top_k or logits.shape[1] for i in sampled], device=device)[:, None]
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)[:, None]
    # keep a character while the mass before it is below top_p; the first always survives
    keep = (position < top_k) & ((cumulative - sorted_probs) < top_p)
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs, 0.0).cumsum(dim=1)
    uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(device)
    target = uniforms[:, None] * kept[:, -1:]
    pick = torch.searchsorted(kept, target, right=True).clamp_(max=logits.shape[1] - 1)
    # a pick past the kept set can only come from rounding at the very top: step back into it
    pick = torch.minimum(pick, keep.sum(dim=1, keepdim=True) - 1)
    choice[idx] = order.gather(1, pick).squeeze(1)
    return choice


def prefill(model: CharLM, ids: Sequence[int], device=None) -> tuple[torch.Tensor, State]:
    """Run the whole prefix through the model in one call: last logits (1, vocab) and state."""
    device = device or model.dense.weight.device
    logits, state = model(torch.tensor([list(ids)], device=device))
    return logits[:, -1], state


def repeat_state(state: State, n: int) -> State:
    if isinstance(state, tuple):
        return tuple(s.repeat(1, n, 1) for s in state)
    return state.repeat(1, n, 1)


@dataclass
class Delta:
    """New text for one continuation, as it is produced."""

    index: int
    text: str


class Generation:
    """One request's continuations, produced step by step.

    Iterating yields `Delta`s as characters are generated (text that might be the start of
    a stop string is held back until it is known not to be); afterwards `completions`
    holds the finished results. Choice i of a sampled request uses seed `seed + i`, so
    n=1 reproduces choice 0 of a larger n. Raises UnknownCharactersError for characters
    outside the vocabulary and ValueError for an empty prefix (the model needs one
    character to start from) or out-of-range sizes.
    """

    def __init__(self, model: CharLM, vocab: Vocabulary, prefix: str, max_chars: int = 50,
                 params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                 seed: int | None = None, n: int = 1):
        if not prefix:
            raise ValueError("prefix must contain at least one character")
        if max_chars < 0 or n < 1:
            raise ValueError("max_chars must be >= 0 and n >= 1")
        self.model, self.vocab, self.prefix = model, vocab, prefix
        self.ids = vocab.encode(prefix)
        self.max_chars, self.params, self.n = max_chars, params, n
        self.stop = [s for s in stop if s]
        if params.temperature > 0 and seed is None:
            seed = secrets.randbits(31)
        self.seeds = [seed + i if params.temperature > 0 else None for i in range(n)]
        self.completions: list[Completion] = []

    def __iter__(self) -> Iterator[Delta]:
        # grad mode is thread-local state: set it per block, never across a yield
        n, vocab = self.n, self.vocab
        generators = [row_generator(s) if s is not None else None for s in self.seeds]
        with torch.no_grad():
            logits, state = prefill(self.model, self.ids)
            logits, state = logits.repeat(n, 1), repeat_state(state, n)
            device = logits.device
            seen = torch.zeros(n, len(vocab), dtype=torch.bool, device=device)
            seen[:, torch.tensor(self.ids, device=device)] = True
        texts, emitted = [""] * n, [0] * n
        finish: list[str | None] = [None] * n
        for _ in range(self.max_chars):
            with torch.no_grad():
                chosen = sample_next(logits, [self.params] * n, seen, generators).tolist()
            for row, c in enumerate(chosen):
                if finish[row] is not None:
                    continue
                texts[row] += vocab.idx_to_char[c]
                if any(texts[row].endswith(s) for s in self.stop):
                    finish[row] = "stop"
                    texts[row] = strip_stop(texts[row], self.stop)
                    safe = len(texts[row])
                else:
                    safe = len(texts[row]) - held_back(texts[row], self.stop)
                if safe > emitted[row]:
                    yield Delta(row, texts[row][emitted[row]:safe])
                    emitted[row] = safe
            if all(f is not None for f in finish):
                break
            with torch.no_grad():
                next_ids = torch.tensor(chosen, device=device)
                seen[torch.arange(n), next_ids] = True
                step_logits, state = self.model(next_ids[:, None], state)
                logits = step_logits[:, -1]
        for row in range(n):
            if len(texts[row]) > emitted[row]:
                yield Delta(row, texts[row][emitted[row]:])
            self.completions.append(Completion(self.prefix + texts[row], texts[row], finish[row] or "length",
                                               self.seeds[row]))


def generate(model: CharLM, vocab: Vocabulary, prefix: str, max_chars: int = 50,
             params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
             seed: int | None = None, n: int = 1) -> list[Completion]:
    """Continue `prefix` with up to `max_chars` characters, `n` times (see `Generation`)."""
    generation = Generation(model, vocab, prefix, max_chars, params, stop, seed, n)
    for _ in generation:
        pass
    return generation.completions


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-k:]):
                longest = k
                break
    return longest


def strip_stop(text: str, stop: Sequence[str]) -> str:
    """Remove the stop string that ended the text (the longest one, if several match)."""
    for s in sorted(stop, key=len, reverse=True):
        if s and text.endswith(s):
            return text[: -len(s)]
    return text
