"""Scoring: mean cross-entropy (nats per character) and perplexity of a text under a model.

The state is carried through the whole text: character i is predicted from every
character before it. Long texts are run in windows only to bound memory; the result is
the same as one call over the whole text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_store.model import CharLM
from model_store.vocab import UnknownCharactersError, Vocabulary

WINDOW = 4096


@dataclass
class Score:
    cross_entropy: float  # mean nats per scored character
    perplexity: float  # exp(cross_entropy)
    chars_scored: int  # every character but the first, which has nothing to be predicted from
    unknown_skipped: int = 0  # characters dropped because the vocabulary lacks them

    @property
    def bits_per_char(self) -> float:
        return self.cross_entropy / math.log(2)


@torch.no_grad()
def score_ids(model: CharLM, ids: Sequence[int] | torch.Tensor) -> Score:
    """Score ids[1:] given ids[:-1], state carried across windows."""
    device = model.dense.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    if ids.numel() < 2:
        raise ValueError("a text needs at least two characters to be scored")
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    for start in range(0, ids.numel() - 1, WINDOW):
        x = ids[start:start + WINDOW]
        y = ids[start + 1:start + WINDOW + 1]
        x = x[: y.numel()]
        logits, state = model(x[None], state)
        total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
    model.train(was_training)
    n = ids.numel() - 1
    ce = total / n
    return Score(cross_entropy=ce, perplexity=math.exp(ce) if ce < 700 else math.inf, chars_scored=n)


def score_text(model: CharLM, vocab: Vocabulary, text: str, unknown: str = "error") -> Score:
    """Score a text. unknown='error' raises UnknownCharactersError naming the characters the
    vocabulary lacks; unknown='skip' drops them and reports how many were dropped."""
    if unknown not in ("error", "skip"):
        raise ValueError("unknown must be 'error' or 'skip'")
    missing = vocab.unknown(text)
    skipped = 0
    if missing:
        if unknown == "error":
            raise UnknownCharactersError(missing)
        kept = "".join(c for c in text if c in vocab)
        skipped = len(text) - len(kept)
        text = kept
    result = score_ids(model, vocab.encode(text))
    result.unknown_skipped = skipped
    return result
