"""Text generation: prefill the prefix in one forward call, then sample one character per step.

`Generation` is one request's continuations; `Batch` steps the rows of any number of
requests together, one model call per step (the service's engine drives it). How each
row picks its character is sampling.py's job. With `best_of` > 1 each continuation is a
`Group` of candidate rows, and every `best_of_chars` characters the likeliest candidate
(by the model's own probabilities) is kept and the others continue from it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy
import torch

from model_store import kernels
from model_store.constraints import Constraints, Plan, Tracker, mask_logits
from model_store.mixture import LanguageModel, for_generation
from model_store.model import State, state_parts
from model_store.sampling import NgramBlocker, SamplingParams, Uniforms, block_repeats, sample_next
from model_store.state import Snapshot
from model_store.vocab import Vocabulary


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


def prefill(model: LanguageModel, ids: Sequence[int], device=None) -> tuple[torch.Tensor, State]:
    """Run the whole prefix through the model in one call: last logits (1, vocab) and state."""
    device = device or model.dense.weight.device
    logits, state = model(torch.tensor([list(ids)], device=device), last_only=True)
    return logits[:, -1], state


def repeat_state(state: State, n: int) -> State:
    if isinstance(state, tuple):
        return tuple(s.repeat(1, n, 1) for s in state)
    return state.repeat(1, n, 1)


def select_state(state: State, index: torch.Tensor) -> State:
    """The state's rows (dim 1) at `index`, in that order."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


def cat_state(a: State, b: State) -> State:
    return (tuple(torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)) if isinstance(a, tuple)
            else torch.cat([a, *state_parts(b)], dim=1))


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
                 logprobs: int | None = None):
        self.params, self.seed, self.stop, self.max_chars = params, seed, stop, max_chars
        self.top_logprobs = logprobs  # None: not recorded; k: each character's log-probability and the top k
        self.logprobs: list[CharLogprob] = []  # one per character pushed (a stripped stop string's too)
        self.shown = 0  # characters handed out as deltas
        self.after_blank = after_blank  # the last character read or generated is a blank (no_blank_runs)
        self.group: Group | None = None  # the best_of candidates this row is one of
        self.loglik = 0.0  # log-probability of its characters since its group last compared them
        self.ngrams = NgramBlocker(params.no_repeat_ngram, read) if params.no_repeat_ngram else None
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


def prefill_rows(model: LanguageModel, generations: Sequence[Generation]) -> tuple[torch.Tensor, State, torch.Tensor]:
    """Prefill the inputs (`ids`, all of one length) of several generations in one call, each from
    its start state; generation i's logits, state and seen-mask rows are repeated row_count times, in order.
    The seen mask is built in numpy: a server admits requests between the steps of its batch, and
    every torch call there waits for the GIL (see model.CharLM._generation_step)."""
    model = for_generation(model)
    device = model.dense.weight.device
    start = model.init_state(len(generations), device)
    seen = numpy.zeros((len(generations), model.config.vocab_size), dtype=bool)
    for i, g in enumerate(generations):
        if g.start is not None:
            for whole, part in zip(state_parts(start), state_parts(g.start.state), strict=True):
                whole[:, i] = part[:, 0].to(device)
            seen[i] = g.start.seen.cpu().numpy()
        seen[i, g.ids] = True
    logits, state = model(torch.tensor([g.ids for g in generations], device=device), start, last_only=True)
    seen_mask = torch.from_numpy(seen).to(device)
    if all(g.row_count == 1 for g in generations):
        return logits[:, -1], state, seen_mask
    counts = torch.tensor([g.row_count for g in generations], device=device)
    index = torch.repeat_interleave(torch.arange(len(generations), device=device), counts)
    return logits[:, -1].index_select(0, index), select_state(state, index), seen_mask.index_select(0, index)


def state_to(state: State, device, copy: bool = False) -> State:
    if isinstance(state, tuple):
        return tuple(s.to(device, copy=copy) for s in state)
    return state.to(device, copy=copy)


def snapshot(state: State, last: int, seen: torch.Tensor, text: Sequence[int]) -> Snapshot:
    """A CPU copy of one row's position: its state (all but the last character read), that character, seen-mask,
    and the ids of the text before that character."""
    return Snapshot(state_to(state, "cpu", copy=True), last, seen.to("cpu", copy=True), list(text))


class Group:
    """The `best_of` candidate rows of one continuation. They step side by side, each drawing from its
    own random stream; every `every` characters, or when one finishes, the candidate whose characters
    since the last comparison were likeliest under the model (its own softmax, before temperature and
    filters) becomes the `lead`, and the others continue from it. Only the lead's text is shown."""

    def __init__(self, rows: list[Row], every: int):
        self.rows, self.every, self.lead = rows, every, rows[0]
        self.steps = self.emitted = self.shown = 0
        for row in rows:
            row.group = self


class Batch:
    """Continuations of any number of requests, stepped together: one model call per step.

    Row i of `logits` (next-character scores), of the state (dim 1) and of `seen` belongs to
    `rows[i]`. `step` samples every row with its own settings and random stream, then retires the
    finished rows at once and advances the rest. A row draws only from its own stream, so its
    text does not depend on its batch-mates. Call it under
    `torch.no_grad()` (or inference mode).
    """

    def __init__(self, model: LanguageModel, vocab: Vocabulary):
        self.model, self.vocab = for_generation(model), vocab
        self.blanks = torch.tensor([c.isspace() for c in vocab.idx_to_char], dtype=torch.bool,
                                   device=self.model.dense.weight.device)  # for no_blank_runs
        self.rows: list[Row] = []
        # the rows' next-character logits, state and seen marks; None while there are no rows
        self.logits: torch.Tensor | None = None
        self.state: State | None = None
        self.seen: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, State, torch.Tensor]:
        """The rows' logits, state and seen marks (the batch has rows)."""
        if self.logits is None or self.state is None or self.seen is None:
            raise RuntimeError("the batch has no rows")
        return self.logits, self.state, self.seen

    def add(self, rows: list[Row], logits: torch.Tensor, state: State, seen: torch.Tensor) -> None:
        """Append rows with their prefilled logits, state and seen mask; rows already finished are dropped."""
        if self.rows:
            old_logits, old_state, old_seen = self.tensors()
            logits, state = torch.cat([old_logits, logits]), cat_state(old_state, state)
            seen = torch.cat([old_seen, seen])
        self.rows, self.logits, self.state, self.seen = self.rows + rows, logits, state, seen
        self.keep([i for i, r in enumerate(self.rows) if r.finish is None])

    def keep(self, kept: list[int], logits: bool = True) -> None:
        """Keep only the rows at these positions (retire or cancel the others). `logits=False`: the
        caller is about to replace the logits, so they are not copied."""
        if len(kept) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in kept]
        if not self.rows:
            self.logits = self.state = self.seen = None
            return
        old_logits, old_state, old_seen = self.tensors()
        index = torch.tensor(kept, device=old_seen.device)
        if logits:
            self.logits = old_logits.index_select(0, index)
        self.seen, self.state = old_seen.index_select(0, index), select_state(old_state, index)

    def drop(self, owners) -> None:
        """Remove every row whose owner is in `owners`."""
        self.keep([i for i, r in enumerate(self.rows) if r.owner not in owners])

    def step(self) -> list[tuple[Row, str]]:
        """One character for every row: each row with the text it made safe to show."""
        rows = self.rows
        raw, _, seen = self.tensors()
        logits = block_repeats(mask_logits(raw, [r.tracker for r in rows]), rows, self.blanks)
        chosen = sample_next(logits, [r.params for r in rows], seen, [r.uniforms for r in rows])
        if any(r.top_logprobs is not None for r in rows):
            self.record_logprobs(chosen)
        chars = self.vocab.idx_to_char
        produced = [(row, row.push(chars[c], c)) for row, c in zip(rows, chosen.tolist(), strict=True)]
        if any(row.group is not None for row in rows):
            produced = self.compare_candidates(chosen, produced)
        _, state, seen = self.tensors()  # compare_candidates may have moved rows' state and marks
        kernels.mark_seen(seen, chosen)
        live = [i for i, r in enumerate(rows) if r.finish is None]
        if len(live) < len(rows):
            for i, row in enumerate(rows):
                if row.finish is not None and row.keep_state:  # its state has read all but the last character
                    one = select_state(state, torch.tensor([i], device=chosen.device))
                    row.snapshot = snapshot(one, int(chosen[i]), seen[i], [*row.read, *row.generated_ids[:-1]])
            chosen = chosen[torch.tensor(live, dtype=torch.long, device=chosen.device)]
            self.keep(live, logits=False)
        if self.rows:
            self.logits, self.state = self.model.step(chosen, self.tensors()[1])
        return produced

    def record_logprobs(self, chosen: torch.Tensor) -> None:
        """Append each recording row's character log-probability and top alternatives, from the raw logits."""
        rows = self.rows
        asking = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
        tops = [top for r in rows if (top := r.top_logprobs) is not None]
        index = torch.tensor(asking, device=chosen.device)
        records = char_logprobs(self.tensors()[0].index_select(0, index), chosen.index_select(0, index), tops)
        for i, record in zip(asking, records, strict=True):
            rows[i].logprobs.append(record)

    def compare_candidates(self, chosen: torch.Tensor, produced: list[tuple[Row, str]]) -> list[tuple[Row, str]]:
        """Add each candidate's character log-probability; in every group due for a comparison, make the
        likeliest candidate the lead and move the others onto its text, state, seen-mask and character
        (in place, before the state advances). Only a group's lead shows text, what it added since the
        group last showed some."""
        rows = self.rows
        logits, state, seen = self.tensors()
        grouped = [i for i, r in enumerate(rows) if r.group is not None]
        index = torch.tensor(grouped, device=chosen.device)
        log_probs = torch.log_softmax(logits.index_select(0, index).float(), dim=1)
        for i, lp in zip(grouped, log_probs.gather(1, chosen.index_select(0, index)[:, None])[:, 0].tolist(),
                         strict=True):
            rows[i].loglik += lp
        position: dict[int, int] = {}  # row -> index, made when a group is first due
        shown: dict[int, str] = {}
        targets, sources = [], []
        for group in {id(r.group): r.group for r in rows if r.group is not None}.values():
            group.steps += 1
            if group.steps < group.every and not any(r.finish for r in group.rows):
                continue
            group.steps = 0
            position = position or {id(r): i for i, r in enumerate(rows)}
            lead = group.lead = max(group.rows, key=lambda r: r.loglik)  # ties: the first
            for row in group.rows:
                row.loglik = 0.0
                if row is not lead:
                    row.follow(lead)
                    targets.append(position[id(row)])
                    sources.append(position[id(lead)])
            shown[id(lead)], group.emitted = lead.text[group.emitted:lead.emitted], lead.emitted
        if targets:
            to, source = (torch.tensor(x, device=chosen.device) for x in (targets, sources))
            chosen[to] = chosen[source]
            seen[to] = seen[source]
            for part in state_parts(state):
                part[:, to] = part[:, source]
        return [(row, text if row.group is None else shown.get(id(row), "")) for row, text in produced]


class Generation:
    """One request's continuations, produced step by step.

    Iterating yields `Delta`s as characters are generated (text that might be the start of
    a stop string is held back until it is known not to be); afterwards `completions`
    holds the finished results. Choice i of a sampled request uses seed `seed + i`, so
    n=1 reproduces choice 0 of a larger n. Raises UnknownCharactersError for characters
    outside the vocabulary, ValueError for an empty prefix without a `start` (the model
    needs one character to start from) or out-of-range sizes, and ConstraintError for
    impossible `constraints`. The service's engine does not iterate it: it steps the
    `rows()` of many generations in one shared `Batch`.

    `start` continues a text from its `Snapshot`: the model reads the text's last character
    and then `prefix`, exactly as if it had been given the whole text. `keep_state` puts each
    choice's own snapshot in its `Completion.state`.
    """

    def __init__(self, model: LanguageModel, vocab: Vocabulary, prefix: str, max_chars: int = 50,
                 params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                 seed: int | None = None, n: int = 1, start: Snapshot | None = None, keep_state: bool = False,
                 constraints: Constraints | None = None, logprobs: int | None = None):
        if not prefix and start is None:
            raise ValueError("prefix must contain at least one character")
        if max_chars < 0 or n < 1:
            raise ValueError("max_chars must be >= 0 and n >= 1")
        self.model, self.vocab, self.prefix = model, vocab, prefix
        self.start, self.keep_state = start, keep_state
        self.ids = ([start.last] if start is not None else []) + vocab.encode(prefix)  # what the model reads
        self.plan = Plan(constraints, vocab, max_chars, model.dense.weight.device) if constraints else None
        self.max_chars, self.params, self.n = max_chars, params, n
        if logprobs is not None and logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        self.logprobs = logprobs
        self.stop = [s for s in stop if s]
        if params.temperature > 0 and seed is None:
            seed = secrets.randbits(31)
        self.seeds: list[int | None] = ([seed + i for i in range(n)] if params.temperature > 0 and seed is not None
                                        else [None] * n)
        self.completions: list[Completion] = []

    def text_ids(self) -> list[int]:
        """The ids of the whole text read so far: a snapshot's text and its last character, then the prefix."""
        start = self.start.text + [self.start.last] if self.start is not None else []
        return start + self.vocab.encode(self.prefix)

    @property
    def row_count(self) -> int:
        """Rows this generation takes in a batch: n continuations of best_of candidates each."""
        return self.n * self.params.best_of

    def rows(self, owner=None) -> list[Row]:
        """The batch rows: per continuation, its best_of candidates (a `Group` when more than one).
        Candidate 0 of choice i draws from seed + i, so best_of 1 is plain sampling; candidate j
        from `candidate_seed(seed + i, j)`."""
        read = self.text_ids()
        last = self.prefix[-1:] or self.vocab.idx_to_char[self.ids[-1]]
        rows = []
        for i, seed in enumerate(self.seeds):
            candidates = [Row(self.params, seed, self.stop, self.max_chars, i, owner,
                              self.plan.tracker() if self.plan else None, self.keep_state, read, last.isspace(),
                              candidate_seed(seed, j), self.logprobs) for j in range(self.params.best_of)]
            if len(candidates) > 1:
                Group(candidates, self.params.best_of_chars)
            rows += candidates
        return rows

    def finish(self, rows: list[Row]) -> None:
        rows = [row for row in rows if row.group is None or row is row.group.lead]  # one per continuation
        for row in rows:
            if row.keep_state and row.finish and row.snapshot is None:  # nothing generated (max_chars 0)
                row.snapshot = self.read_all_but_last()
        self.completions = [row.completion(self.prefix) for row in rows]

    def read_all_but_last(self) -> Snapshot:
        """The snapshot after reading the input but its last character (for a row that generated nothing)."""
        device = self.model.dense.weight.device
        start = self.model.init_state(1) if self.start is None else state_to(self.start.state, device)
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
        if self.start is not None:
            seen |= self.start.seen.cpu()
        seen[self.ids] = True
        with torch.no_grad():
            state = start
            if len(self.ids) > 1:
                state = for_generation(self.model)(torch.tensor([self.ids[:-1]], device=device), start, last_only=True)[1]
        return snapshot(state, self.ids[-1], seen, self.text_ids()[:-1])

    def __iter__(self) -> Iterator[Delta]:
        # grad mode is thread-local state: set it per block, never across a yield
        rows, batch = self.rows(), Batch(self.model, self.vocab)
        with torch.no_grad():
            batch.add(rows, *prefill_rows(self.model, [self]))
        while batch.rows:
            with torch.no_grad():
                produced = batch.step()
            for row, text in produced:
                if text:
                    yield row.delta(text)
        self.finish(rows)


def candidate_seed(seed: int | None, j: int) -> int | None:
    """The random stream of best_of candidate j of the choice whose seed is `seed`: the seed itself for
    candidate 0, a hash of both for the others (torch's CPU generator reads only a seed's low 32 bits, so
    seed + j * 2**k would repeat candidate 0's stream)."""
    if seed is None or j == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest(), "little")


def generate(model: LanguageModel, vocab: Vocabulary, prefix: str, max_chars: int = 50,
             params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
             seed: int | None = None, n: int = 1, **options) -> list[Completion]:
    """Continue `prefix` with up to `max_chars` characters, `n` times (see `Generation`, which
    takes the `options` start, keep_state, constraints and logprobs)."""
    generation = Generation(model, vocab, prefix, max_chars, params, stop, seed, n, **options)
    for _ in generation:
        pass
    return generation.completions


@torch.no_grad()
def text_logprobs(model: LanguageModel, ids: Sequence[int], top: int) -> list[CharLogprob]:
    """Each of ids[1:] with its log-probability after the ids before it and the `top` likeliest characters
    there, under the model that generates (a mixture's recurrent model): what `logprobs` reports for the
    characters of a prompt, the same numbers as for generated ones."""
    model = for_generation(model)
    if len(ids) < 2:
        return []
    device = model.dense.weight.device
    logits, _ = model(torch.tensor([list(ids[:-1])], device=device))
    return char_logprobs(logits[0], torch.tensor(list(ids[1:]), device=device), [top] * (len(ids) - 1))


def char_logprobs(logits: torch.Tensor, chosen: torch.Tensor, tops: list[int]) -> list[CharLogprob]:
    """Row i's character chosen[i]: its log-probability under softmax(logits[i]) and the tops[i] likeliest there."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    picked = log_probs.gather(1, chosen[:, None])[:, 0].tolist()
    values, ids = (t.tolist() for t in log_probs.topk(min(max(tops), log_probs.shape[1]), dim=1))
    return [CharLogprob(c, lp, list(zip(i[:k], v[:k], strict=True)))
            for c, lp, i, v, k in zip(chosen.tolist(), picked, ids, values, tops, strict=True)]


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
