"""Scoring: mean cross-entropy (nats per character) and perplexity of a text under a model.

The state is carried through the whole text: character i is predicted from every
character before it. Long texts are run in windows only to bound memory; the result is
the same as one call over the whole text.

With per_char=True the score also lists every character's negative log-probability (nats):
`Score.per_char` covers every character of the text, in order. The first character (it has
nothing before it to be predicted from) and characters dropped as unknown have nll None;
the mean of the other nlls is `cross_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_store.mixture import LanguageModel
from model_store.vocab import UnknownCharactersError, Vocabulary

WINDOW = 4096


@dataclass
class CharNLL:
    char: str
    nll: float | None  # nats; None: not predicted (the first character, or dropped as unknown)

    @property
    def nll_bits(self) -> float | None:
        return None if self.nll is None else self.nll / math.log(2)


@dataclass
class Score:
    cross_entropy: float  # mean nats per scored character
    perplexity: float  # exp(cross_entropy)
    chars_scored: int  # every character but the first, which has nothing to be predicted from
    unknown_skipped: int = 0  # characters dropped because the vocabulary lacks them
    nll: list[float] | None = None  # score_ids(per_char=True): the nll of ids[1:], one per scored character
    per_char: list[CharNLL] | None = None  # score_text(per_char=True): every character of the text

    @property
    def bits_per_char(self) -> float:
        return self.cross_entropy / math.log(2)


@torch.no_grad()
def score_ids(model: LanguageModel, ids: Sequence[int] | torch.Tensor, per_char: bool = False) -> Score:
    """Score ids[1:] given ids[:-1], state carried across windows; per_char keeps each one's nll."""
    device = model.dense.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.numel() < 2:
        raise ValueError("a text needs at least two characters to be scored")
    was_training = model.training
    model.eval()
    losses, state = [], None
    for start in range(0, ids.numel() - 1, WINDOW):
        x = ids[start:start + WINDOW]
        y = ids[start + 1:start + WINDOW + 1]
        x = x[: y.numel()]
        logits, state = model(x[None], state)
        losses.append(F.cross_entropy(logits[0].float(), y, reduction="none"))
    model.train(was_training)
    nll = torch.cat(losses).double().cpu()
    n = nll.numel()
    ce = nll.sum().item() / n
    return Score(cross_entropy=ce, perplexity=math.exp(ce) if ce < 700 else math.inf, chars_scored=n,
                 nll=nll.tolist() if per_char else None)


def score_text(model: LanguageModel, vocab: Vocabulary, text: str, unknown: str = "error", per_char: bool = False) -> Score:
    """Score a text. unknown='error' raises UnknownCharactersError naming the characters the
    vocabulary lacks; unknown='skip' drops them and reports how many were dropped (their
    per_char nll is None: the next kept character is predicted from the kept ones before it)."""
    if unknown not in ("error", "skip"):
        raise ValueError("unknown must be 'error' or 'skip'")
    missing = vocab.unknown(text)
    if missing and unknown == "error":
        raise UnknownCharactersError(missing)
    kept = "".join(c for c in text if c in vocab) if missing else text
    result = score_ids(model, vocab.encode(kept), per_char=per_char)
    result.unknown_skipped = len(text) - len(kept)
    if per_char and result.nll is not None:
        result.per_char = per_character(text, vocab, result.nll)
    return result


def per_character(text: str, vocab: Vocabulary, nll: list[float]) -> list[CharNLL]:
    """Every character of `text` with its nll: the first kept character and the unknown ones get None,
    each later kept character the next value of `nll` (which scored the kept characters after the first)."""
    values = iter([None, *nll])
    return [CharNLL(c, next(values) if c in vocab else None) for c in text]
