"""Where a model was most surprised by a text: its most surprising spans, and the per-character
JSON that `lyrics perplexity --per-char --json` and POST /perplexity both answer with.

A span is `length` consecutive characters of the text, offsets [start, end). Its surprisal is
the total nll (nats) of the characters in it that were predicted; the first character and
characters dropped as unknown count nothing. `surprising_spans` picks the spans with the
highest total, greedily from the top, never two that overlap (on a tie, the earlier span).
Ranking by the total rather than the mean keeps a span of mostly unscored characters from
winning on one surprising character.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from model_store.scoring import CharNLL, Score


@dataclass
class Span:
    start: int  # offset of the first character
    end: int  # offset just past the last one
    text: str
    nats: float  # total nll of the scored characters in the span
    chars_scored: int

    @property
    def bits(self) -> float:
        return self.nats / math.log(2)

    @property
    def mean_nats(self) -> float:
        return self.nats / self.chars_scored


def surprising_spans(per_char: Sequence[CharNLL], k: int = 3, length: int = 3) -> list[Span]:
    """The k most surprising non-overlapping spans of `length` characters (shorter texts: the whole text),
    most surprising first. Spans without a scored character are never chosen."""
    if k < 0 or length < 1:
        raise ValueError("k must be >= 0 and length >= 1")
    length = min(length, len(per_char))
    total = [0.0, *accumulate(c.nll or 0.0 for c in per_char)]
    count = [0, *accumulate(c.nll is not None for c in per_char)]
    windows = [(total[s + length] - total[s], s) for s in range(len(per_char) - length + 1)
               if count[s + length] > count[s]]
    windows.sort(key=lambda w: (-w[0], w[1]))
    chosen: list[Span] = []
    for nats, start in windows:
        if len(chosen) == k:
            break
        if all(start + length <= c.start or c.end <= start for c in chosen):
            text = "".join(c.char for c in per_char[start:start + length])
            chosen.append(Span(start, start + length, text, nats, count[start + length] - count[start]))
    return chosen


def surprisal_json(score: Score, top_spans: int = 3, span_chars: int = 3) -> dict:
    """`per_char` ({char, nll, nll_bits} for every character, nll null where nothing was predicted) and
    `surprising_spans`, from a score made with per_char=True."""
    if score.per_char is None:
        raise ValueError("score the text with per_char=True first")
    return {"per_char": [{"char": c.char, "nll": c.nll, "nll_bits": c.nll_bits} for c in score.per_char],
            "surprising_spans": [{"start": s.start, "end": s.end, "text": s.text, "nats": s.nats, "bits": s.bits,
                                  "mean_nats": s.mean_nats, "mean_bits": s.mean_nats / math.log(2),
                                  "chars_scored": s.chars_scored}
                                 for s in surprising_spans(score.per_char, top_spans, span_chars)]}
