"""Choosing the next character: sampling settings, the vectorised sampler, and no-repeat n-grams.

`sample_next` is vectorised over rows that may each have their own sampling settings
and their own random stream, so a row's output never depends on which other rows share
its batch. Each row draws exactly one uniform number per step from its own generator
and picks its character by inverse CDF over the surviving probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next character is chosen. temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus: smallest set of characters whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages characters already in the text
    no_repeat_ngram: int = 0  # n >= 2: never complete an n-character sequence already in the text; 0: off

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
    top_k = torch.tensor([params[i].top_k or logits.shape[1] for i in sampled], device=device)[:, None]
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)[:, None]
    sorted_probs, order = sorted_head(probs, top_k, top_p)
    cumulative = sorted_probs.cumsum(dim=1)
    position = torch.arange(sorted_probs.shape[1], device=device)[None, :]
    # keep a character while the mass before it is below top_p; the first always survives
    keep = (position < top_k) & ((cumulative - sorted_probs) < top_p)
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs, 0.0).cumsum(dim=1)
    uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(device)
    target = uniforms[:, None] * kept[:, -1:]
    pick = torch.searchsorted(kept, target, right=True).clamp_(max=sorted_probs.shape[1] - 1)
    # a pick past the kept set can only come from rounding at the very top: step back into it
    pick = torch.minimum(pick, keep.sum(dim=1, keepdim=True) - 1)
    choice[idx] = order.gather(1, pick).squeeze(1)
    return choice


def sorted_head(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                first: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading columns of `probs` sorted in descending order (values, indices): enough that
    every row's top-k/top-p survivors are among them. Sorting the whole vocabulary dominated a
    sampled step; a small `topk` gives the same leading columns (and so the same cumulative sums)."""
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
        self.n, self.ids, self.followers = n, [], {}
        for i in ids:
            self.push(i)

    def push(self, index: int) -> None:
        self.ids.append(index)
        if len(self.ids) >= self.n:
            self.followers.setdefault(tuple(self.ids[-self.n:-1]), set()).add(index)

    def banned(self) -> set[int]:
        return self.followers.get(tuple(self.ids[len(self.ids) - self.n + 1:]), set())


def block_repeats(logits: torch.Tensor, rows: Sequence) -> torch.Tensor:
    """Rule out, per row (generate.Row), the characters its `no_repeat_ngram` bans; rows without one
    (`row.ngrams` None) are untouched."""
    banned = [(i, sorted(r.ngrams.banned())) for i, r in enumerate(rows) if r.ngrams is not None]
    banned = [(i, ids) for i, ids in banned if ids]
    if not banned:
        return logits
    blocked = logits.clone()
    for i, ids in banned:
        blocked[i, ids] = float("-inf")
        if bool(torch.isinf(blocked[i]).all()):  # a constraint allows only banned characters: it wins
            blocked[i] = logits[i]
    return blocked
