"""One continuation's text as it is generated: stop strings and their hold-back, the deltas it
shows, its completion, and the records of what it produced (`CharLogprob`, `Delta`, `Completion`).

A `Row` is the bookkeeping of one continuation; its model state is a row of a `batch.Batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model_store.constraints import Tracker
from model_store.sampling import NgramBlocker, SamplingParams, Uniforms
from model_store.state import Snapshot

if TYPE_CHECKING:
    from model_store.batch import Group


@dataclass
class CharLogprob:
    """A generated character's log-probability under the model's own softmax (before temperature, filters and
    constraints), and the `top` likeliest characters there as (id, log-probability), likeliest first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str  # prefix + generated
    generated: str
    finish_reason: str  # "length" or "stop"
    seed: int | None  # the seed that reproduces this sample (None for greedy)
    constraints_met: dict[str, bool] | None = None  # per requested constraint, read from `generated`
    # where the text stopped (its model state), when asked for; a stripped stop string is part of it
    state: Snapshot | None = field(default=None, compare=False, repr=False)
    logprobs: list[CharLogprob] | None = field(default=None, compare=False, repr=False)  # one per generated char


@dataclass
class Delta:
    """New text for one continuation, as it is produced (with its characters' log-probabilities, if asked)."""

    index: int
    text: str
    logprobs: list[CharLogprob] | None = None


class Row:
    """One continuation's bookkeeping: its sampler settings and random stream, the text so far,
    stop strings and hold-back, its constraint `tracker` (None: unconstrained). Its model state is a
    row of a `Batch`; `snapshot` is a copy of it taken when the row finishes, if `keep_state`."""

    def __init__(self, params: SamplingParams, seed: int | None, stop: Sequence[str], max_chars: int,
                 index: int = 0, owner=None, tracker: Tracker | None = None, keep_state: bool = False,
                 read: Sequence[int] = (), after_blank: bool = False, stream_seed: int | None = None,
                 logprobs: int | None = None, line_length: int = 0):
        self.params, self.seed, self.stop, self.max_chars = params, seed, stop, max_chars
        self.top_logprobs = logprobs  # None: not recorded; k: each character's log-probability and the top k
        self.logprobs: list[CharLogprob] = []  # one per character pushed (a stripped stop string's too)
        self.shown = 0  # characters handed out as deltas
        self.after_blank = after_blank  # the last character read or generated is a blank (no_blank_runs)
        self.group: Group | None = None  # the best_of candidates this row is one of
        self.loglik = 0.0  # log-probability of its characters since its group last compared them
        self.ngrams = NgramBlocker(params.no_repeat_ngram, read) if params.no_repeat_ngram else None
        # the last character read or generated and how many times in a row it ends the text (max_char_run)
        self.run_id, self.run_length = (read[-1], run_at_end(read)) if read else (-1, 0)
        self.line_length = line_length  # characters since the last line break, the text read counted
        self.read = read  # what the row's text is made of, for its snapshot
        self.generated_ids: list[int] = []
        stream_seed = seed if stream_seed is None else stream_seed
        self.uniforms = Uniforms(stream_seed) if stream_seed is not None else None
        self.index, self.owner = index, owner  # which choice of which request
        self.tracker, self.keep_state = tracker, keep_state
        self.snapshot: Snapshot | None = None
        self.text, self.emitted = "", 0
        self.finish: str | None = None if max_chars > 0 else "length"

    def push(self, char: str, index: int) -> str:
        """Append one generated character; return the text that is now safe to show ('' if none)."""
        self.text += char
        self.after_blank = char.isspace()
        self.run_id, self.run_length = index, (self.run_length + 1 if index == self.run_id else 1)
        self.line_length = 0 if char == "\n" else self.line_length + 1
        self.generated_ids.append(index)
        if not self.stop and self.tracker is None and self.ngrams is None:  # the common case, per row and step
            if len(self.text) >= self.max_chars:
                self.finish = "length"
            self.emitted = len(self.text)
            return char
        if self.tracker is not None:
            self.tracker.push(index)
        if self.ngrams is not None:
            self.ngrams.push(index)
        if any(self.text.endswith(s) for s in self.stop):
            self.finish = "stop"
            self.text = strip_stop(self.text, self.stop)
        elif len(self.text) >= self.max_chars or (self.tracker is not None and self.tracker.done):
            self.finish = "length"
        safe = len(self.text) - (0 if self.finish else held_back(self.text, self.stop))
        if safe <= self.emitted:
            return ""
        new, self.emitted = self.text[self.emitted:safe], safe
        return new

    def follow(self, lead: Row) -> None:
        """Continue from `lead`'s text and bookkeeping (a group's candidate that lost), keeping its own
        random stream. The batch copies the model state."""
        self.text, self.emitted, self.finish, self.after_blank = lead.text, lead.emitted, lead.finish, lead.after_blank
        self.run_id, self.run_length, self.line_length = lead.run_id, lead.run_length, lead.line_length
        self.generated_ids = list(lead.generated_ids)
        self.logprobs = list(lead.logprobs)
        self.tracker = lead.tracker.copy() if lead.tracker is not None else None
        self.ngrams = lead.ngrams.copy() if lead.ngrams is not None else None

    def delta(self, text: str) -> Delta:
        """`text`, the next characters this continuation shows, as a Delta (with their log-probabilities)."""
        shows = self.group or self  # a group's lead changes, but its continuation's text goes on
        start, shows.shown = shows.shown, shows.shown + len(text)
        return Delta(self.index, text, self.logprobs[start:shows.shown] if self.top_logprobs is not None else None)

    def completion(self, prefix: str) -> Completion:
        met = self.tracker.plan.met(self.text) if self.tracker is not None else None
        logprobs = self.logprobs[:len(self.text)] if self.top_logprobs is not None else None
        return Completion(prefix + self.text, self.text, self.finish or "length", self.seed, met, self.snapshot,
                          logprobs)


def run_at_end(ids: Sequence[int]) -> int:
    """How many times the last id repeats at the end of ids (1 for a lone one)."""
    length = 1
    while length < len(ids) and ids[-1 - length] == ids[-1]:
        length += 1
    return length


def since_last(ids: Sequence[int], index: int | None) -> int:
    """How many ids follow the last `index` in ids (all of them if it is not there)."""
    length = 0
    while length < len(ids) and ids[-1 - length] != index:
        length += 1
    return length


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
