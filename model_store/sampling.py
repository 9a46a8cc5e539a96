"""Choosing the next character: sampling settings and the lyric defaults, the vectorised sampler,
no-repeat n-grams and blank runs.

`sample_next` is vectorised over rows that may each have their own sampling settings
and their own random stream, so a row's output never depends on which other rows share
its batch. A row draws uniform numbers only from its own stream (`Uniforms`), picks a
character by inverse CDF over its whole distribution and keeps it if it is among the
top-k/top-p survivors, else draws again (`sample_rows`): no sort of the vocabulary. Where the
C kernels are built, each round is one C call (`sample_fused`), on a GPU's logits too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_store import kernels


@dataclass(frozen=True)
class SamplingParams:
    """How the next character is chosen. temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus: smallest set of characters whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages characters already in the text
    no_repeat_ngram: int = 0  # n >= 2: never complete an n-character sequence already in the text; 0: off
    no_blank_runs: bool = False  # never a blank (space, line break) right after a blank
    best_of: int = 1  # candidates sampled per continuation; every best_of_chars the likeliest is kept
    best_of_chars: int = 5
    max_char_run: int = 0  # k >= 1: never more than k of one character in a row (静静静); 0: off
    min_line_chars: int = 0  # k >= 1: no line break before a line has k characters; 0: off

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], not {self.temperature!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], not {self.repetition_penalty!r}")
        if self.no_repeat_ngram == 1 or not 0 <= self.no_repeat_ngram <= 1000:
            raise ValueError(f"no_repeat_ngram must be 0 (off) or in [2, 1000], not {self.no_repeat_ngram!r}")
        if not 0 <= self.max_char_run <= 1000:
            raise ValueError(f"max_char_run must be 0 (off) or in [1, 1000], not {self.max_char_run!r}")
        if not 0 <= self.min_line_chars <= 1000:
            raise ValueError(f"min_line_chars must be 0 (off) or in [1, 1000], not {self.min_line_chars!r}")
        if not 1 <= self.best_of <= 64:
            raise ValueError(f"best_of must be in [1, 64], not {self.best_of!r}")
        if not 1 <= self.best_of_chars <= 1_000_000:
            raise ValueError(f"best_of_chars must be at least 1, not {self.best_of_chars!r}")


# What a request that names none of these gets. Chosen by bench/generation_quality.py (docs/quality.md,
# "What the service writes"): sampled, nucleus, no repeated 4-grams, no blank runs, and the likeliest of 8
# candidates kept every 5 characters. Temperature 0.9 since the pretrained default model (0.8 before: its lines
# came out shorter than the corpus's). No character three times in a row: sampled answers stuttered (啦啦啦,
# 慢慢慢) ten times as often as real lyrics. No line break before a line has 6 characters: without it the lines
# averaged 7.6-8.0 characters against the corpus's 9.9 (9.1-9.5 with it). Greedy (temperature 0) turns the
# lyric-shaping rules off unless asked.
LYRIC_DEFAULTS = {"temperature": 0.9, "top_p": 0.95, "no_repeat_ngram": 4, "no_blank_runs": True, "best_of": 8,
                  "best_of_chars": 5, "max_char_run": 2, "min_line_chars": 6}


def decoding(temperature: float | None = None, top_k: int = 0, top_p: float | None = None,
             repetition_penalty: float = 1.0, no_repeat_ngram: int | None = None, no_blank_runs: bool | None = None,
             best_of: int | None = None, best_of_chars: int | None = None,
             max_char_run: int | None = None, min_line_chars: int | None = None) -> SamplingParams:
    """SamplingParams from a request's fields, None standing for "not given": the lyric defaults when
    the text is sampled; with temperature 0 (greedy, the tutorial's predict) the others are off."""
    if temperature is None:
        temperature = LYRIC_DEFAULTS["temperature"]
    sampled = temperature > 0

    def pick(value, name, off):
        return value if value is not None else (LYRIC_DEFAULTS[name] if sampled else off)

    return SamplingParams(temperature, top_k, pick(top_p, "top_p", 1.0), repetition_penalty,
                          pick(no_repeat_ngram, "no_repeat_ngram", 0), pick(no_blank_runs, "no_blank_runs", False),
                          pick(best_of, "best_of", 1), pick(best_of_chars, "best_of_chars", LYRIC_DEFAULTS["best_of_chars"]),
                          pick(max_char_run, "max_char_run", 0), pick(min_line_chars, "min_line_chars", 0))


class Uniforms:
    """One row's stream of uniform numbers in [0, 1) from its own seeded CPU generator (the same
    stream on every device), drawn in blocks: one `torch.rand` per block, not one per character."""

    BLOCK = 256

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.buffer: list[float] = []

    def next(self) -> float:
        if not self.buffer:
            self.buffer = torch.rand(self.BLOCK, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self.buffer.pop()


def draw(streams: Sequence[Uniforms], device) -> torch.Tensor:
    """The next uniform of each stream, as a (rows, 1) tensor."""
    return torch.tensor([s.next() for s in streams], device=device)[:, None]


def stream_of(streams: Sequence[Uniforms | None], row: int) -> Uniforms:
    """The uniform stream a sampled row draws from (a greedy row has none)."""
    stream = streams[row]
    if stream is None:
        raise ValueError(f"row {row} is sampled but has no stream of uniforms")
    return stream


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None,
                streams: Sequence[Uniforms | None]) -> torch.Tensor:
    """Pick one character per row. logits (rows, vocab); seen (rows, vocab) bool marks the
    characters already in each row's text (for the repetition penalty)."""
    logits = logits.float()
    device = logits.device
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return kernels.argmax(logits)
    # On a GPU the rows are sampled on the host: one copy of the logits and the C sampler (one pass
    # per row) cost less than the torch path's small launches and a synchronisation per round.
    if kernels.library() is not None:  # logits are float32 (above): the kernels apply once on the host
        return sample_fused(logits.cpu(), params, sampled, streams).to(device)
    rows = [params[i] for i in sampled]
    # a temperature so small that logits / temperature overflows would give NaN probabilities; at
    # 1e-30 the quotient stays finite for any logit below 1e8 and the draw is greedy in effect
    temperature = torch.tensor([max(p.temperature, 1e-30) for p in rows], device=device)[:, None]
    if len(sampled) == len(params):
        return sample_rows(torch.softmax(logits / temperature, dim=1), rows, [stream_of(streams, i) for i in sampled])
    index = torch.tensor(sampled, device=device)
    choice = kernels.argmax(logits)
    choice[index] = sample_rows(torch.softmax(logits[index] / temperature, dim=1), rows,
                                [stream_of(streams, i) for i in sampled])
    return choice


def sample_rows(probs: torch.Tensor, params: Sequence[SamplingParams], streams: Sequence[Uniforms],
                rounds: int = 4) -> torch.Tensor:
    """One character per row from its top-k/top-p survivors, without sorting the vocabulary.

    A character survives when fewer than top_k characters are likelier than it and their mass is
    below top_p (the sorted definition, order-free). Each row draws by inverse CDF over its whole
    distribution and keeps the draw if it survives, else draws again: conditioned on surviving, the
    draw has exactly the survivors' renormalised distribution, and with top_p 0.9 nine draws in ten
    survive at the first try. Rows still rejected after `rounds` tries (a tiny top_k or top_p on a
    flat distribution) sample from their sorted head instead."""
    device, vocab = probs.device, probs.shape[1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    restricted = any(p.top_k or p.top_p < 1.0 for p in params)
    any_top_k = any(p.top_k for p in params)
    cdf = probs.cumsum(dim=1)
    picks = torch.empty(len(params), dtype=torch.long, device=device)
    todo = list(range(len(params)))
    for attempt in range(rounds):
        # the first try takes every row as it is; later ones only the rejected rows (a copy)
        index = None if attempt == 0 else torch.tensor(todo, device=device)
        p, c, k, q = (probs, cdf, top_k, top_p) if index is None else (
            probs[index], cdf[index], top_k[index], top_p[index])
        uniforms = draw([streams[i] for i in todo], device).to(c.dtype)
        pick = torch.searchsorted(c, below_total(uniforms, c[:, -1:]), right=True).clamp_(max=vocab - 1)  # NaN
        if index is None:
            picks = pick[:, 0]
        else:
            picks[index] = pick[:, 0]
        if not restricted:
            return picks
        likelier = torch.where(p > p.gather(1, pick), p, 0.0)  # the probabilities above the pick's
        ok = likelier.sum(dim=1, keepdim=True) < q
        if any_top_k:
            ok &= torch.count_nonzero(likelier, dim=1)[:, None] < k
        todo = [i for i, good in zip(todo, ok[:, 0].tolist(), strict=True) if not good]
        if not todo:
            return picks
    index = torch.tensor(todo, device=device)
    picks[index] = sample_sorted(probs[index], top_k[index], top_p[index], [streams[i] for i in todo])
    return picks


def sample_fused(logits: torch.Tensor, params: Sequence[SamplingParams], sampled: list[int],
                 streams: Sequence[Uniforms | None], rounds: int = 4) -> torch.Tensor:
    """`sample_rows`'s rejection sampling for the rows in `sampled`, each round in one C call
    (kernels.Sampler: the softmax, the inverse-CDF draw and the survivor check in one pass per
    row), the rest greedy. A row that is not top-k/top-p restricted keeps its first draw."""
    vocab = logits.shape[1]
    sampler = kernels.Sampler(logits, [max(p.temperature, 1e-30) for p in params],
                              [p.top_k or vocab for p in params], [p.top_p for p in params])
    todo = sampled
    for _ in range(rounds):
        survived = sampler.round(todo, [stream_of(streams, i).next() for i in todo])
        todo = [i for i, good in zip(todo, survived, strict=True) if not good]
        if not todo:
            break
    picks = sampler.picks
    if todo:
        index = torch.tensor(todo)
        weights = torch.from_numpy(sampler.weights)[index]
        probs = weights / weights.sum(dim=1, keepdim=True)
        top_k = torch.tensor(sampler.top_k, dtype=torch.long)[index, None]
        top_p = torch.tensor(sampler.top_p, dtype=torch.float32)[index, None]
        picks[index] = sample_sorted(probs, top_k, top_p, [stream_of(streams, i) for i in todo])
    if len(sampled) < len(params):
        greedy = torch.ones(len(params), dtype=torch.bool)
        greedy[sampled] = False
        picks = torch.where(greedy, kernels.argmax(logits), picks)
    return picks


def below_total(uniforms: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """uniforms * total, kept strictly below total: a uniform just under 1 can round to 1 (float64 to
    float32, or in the product), and a target at the total would pick past the last character with
    any probability. Below it, inverse CDF (`searchsorted(cdf, target, right=True)`) always lands on
    a character whose probability is above zero."""
    return torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))


def sample_sorted(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  streams: Sequence[Uniforms]) -> torch.Tensor:
    """One character per row by inverse CDF over its sorted top-k/top-p survivors."""
    device = probs.device
    sorted_probs, order = sorted_head(probs, top_k, top_p)
    cumulative = sorted_probs.cumsum(dim=1)
    position = torch.arange(sorted_probs.shape[1], device=device)[None, :]
    # keep a character while the mass before it is below top_p; the first always survives
    keep = (position < top_k) & ((cumulative - sorted_probs) < top_p)
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs, 0.0).cumsum(dim=1)
    target = below_total(draw(streams, device).to(kept.dtype), kept[:, -1:])
    pick = torch.searchsorted(kept, target, right=True).clamp_(max=kept.shape[1] - 1)  # NaN
    return order.gather(1, pick).squeeze(1)


def sorted_head(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                first: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading columns of `probs` sorted in descending order (values, indices): enough that
    every row's top-k/top-p survivors are among them. Sorting the whole vocabulary is slow; a small
    `topk` gives the same leading columns (and so the same cumulative sums)."""
    k, vocab = first, probs.shape[1]
    while k < vocab:
        head, order = probs.topk(k, dim=1)
        # a row's survivors end inside the head when its top_k does, or when the head's mass reaches
        # top_p (every later character then has at least top_p before it)
        if bool(((top_k <= k) | (head.cumsum(dim=1)[:, -1:] >= top_p)).all()):
            return head, order
        k *= 4
    return probs.sort(dim=1, descending=True)


class NgramBlocker:
    """`no_repeat_ngram`: the characters that would complete an n-character sequence already in
    the text (this request's input and output), kept up to date one character at a time."""

    def __init__(self, n: int, ids: Sequence[int]):
        self.n, self.ids = n, list[int]()
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for i in ids:
            self.push(i)

    def copy(self) -> NgramBlocker:
        new = copy.copy(self)
        new.ids, new.followers = list(self.ids), {k: set(v) for k, v in self.followers.items()}
        return new

    def push(self, index: int) -> None:
        self.ids.append(index)
        if len(self.ids) >= self.n:
            self.followers.setdefault(tuple(self.ids[-self.n:-1]), set()).add(index)

    def banned(self) -> set[int]:
        return self.followers.get(tuple(self.ids[len(self.ids) - self.n + 1:]), set())


def banned_ids(row, newline: int | None = None) -> list[int]:
    """The characters a row's `no_repeat_ngram`, `max_char_run` and `min_line_chars` rule out next
    (`newline`: the vocabulary's line break, if it has one)."""
    ids = sorted(row.ngrams.banned()) if row.ngrams is not None else []
    if row.params.max_char_run and row.run_length >= row.params.max_char_run:
        ids.append(row.run_id)
    if newline is not None and row.line_length < row.params.min_line_chars:
        ids.append(newline)
    return ids


def block_repeats(logits: torch.Tensor, rows: Sequence, blanks: torch.Tensor | None = None,
                  newline: int | None = None) -> torch.Tensor:
    """Rule out, per row (continuation.Row), the characters its `no_repeat_ngram` bans, the character
    whose run has reached `max_char_run`, a line break before `min_line_chars` (`newline`: its index) and,
    with `no_blank_runs` after a blank, the blanks (`blanks`: (vocab,) bool, on the logits' device), all
    rows in one indexed write. Other rows are untouched; a row whose every allowed character would be
    ruled out (a constraint forcing one) keeps them."""
    pairs = [(i, j) for i, r in enumerate(rows) for j in banned_ids(r, newline)]
    blank_rows = [i for i, r in enumerate(rows) if r.after_blank and r.params.no_blank_runs] \
        if blanks is not None else []
    if not pairs and not blank_rows:
        return logits
    blocked = logits.clone()
    if pairs:  # one indexed write for every row's banned characters
        blocked[torch.tensor(pairs, device=logits.device).t().unbind()] = float("-inf")
    if blanks is not None and blank_rows:
        index = torch.tensor(blank_rows, device=logits.device)
        blocked[index] = blocked[index].masked_fill(blanks, float("-inf"))
    stuck = torch.isinf(blocked).all(dim=1)  # a constraint allows only banned characters: it wins
    if bool(stuck.any()):
        blocked[stuck] = logits[stuck]
    return blocked
