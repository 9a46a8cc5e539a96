"""Text generation as a request asks for it: a `Request` (plain data: a prefix, its decoding
settings, stop strings, seeds, n continuations, constraints, a start state) paired with a model is
a `Generation`, which prefills the prefix in one forward call and then samples one character per
step; `generate` runs one to its end.

The rows it makes are stepped by batch.py's `Batch` (alone here; with other requests' rows in
the service's engine); each row's text, stops and completion are continuation.py's `Row`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from model_store.batch import Batch, Group, char_logprobs, prefill_rows, snapshot, state_to
from model_store.constraints import Constraints, Plan
from model_store.continuation import CharLogprob, Completion, Delta, Row, since_last
from model_store.mixture import LanguageModel, for_generation
from model_store.sampling import SamplingParams
from model_store.state import Snapshot
from model_store.vocab import Vocabulary


@dataclass
class Request:
    """What one generation asks for, as plain data: the text to continue and how, with no model in it.
    The service's routes build these and the engine pairs each with its model in a `Generation`.

    Choice i of a sampled request uses seed `seed + i`, so n=1 reproduces choice 0 of a larger n.
    `start` continues a text from its `Snapshot`: the model reads the text's last character and then
    `prefix`, exactly as if it had been given the whole text. `keep_state` puts each choice's own
    snapshot in its `Completion.state`. Raises ValueError for an empty prefix without a `start` (the
    model needs one character to start from) or out-of-range sizes.
    """

    prefix: str
    max_chars: int = 50
    params: SamplingParams = SamplingParams()
    stop: Sequence[str] = ()
    seed: int | None = None
    n: int = 1
    start: Snapshot | None = None
    keep_state: bool = False
    constraints: Constraints | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not self.prefix and self.start is None:
            raise ValueError("prefix must contain at least one character")
        if self.max_chars < 0 or self.n < 1:
            raise ValueError("max_chars must be >= 0 and n >= 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def row_count(self) -> int:
        """Rows this request takes in a batch: n continuations of best_of candidates each."""
        return self.n * self.params.best_of


class Generation:
    """One request run on one model, produced step by step.

    Iterating yields `Delta`s as characters are generated (text that might be the start of
    a stop string is held back until it is known not to be); afterwards `completions`
    holds the finished results. Raises UnknownCharactersError for characters outside the
    vocabulary and ConstraintError for `constraints` the vocabulary or max_chars cannot meet.
    The service's engine does not iterate it: it steps the `rows()` of many generations in one
    shared `Batch`.
    """

    def __init__(self, model: LanguageModel, vocab: Vocabulary, request: Request):
        self.model, self.vocab, self.request = model, vocab, request
        start = request.start
        self.ids = ([start.last] if start is not None else []) + vocab.encode(request.prefix)  # what the model reads
        self.plan = (Plan(request.constraints, vocab, request.max_chars, model.dense.weight.device)
                     if request.constraints else None)
        self.stop = [s for s in request.stop if s]
        seed, n = request.seed, request.n
        sampled = request.params.temperature > 0
        if sampled and seed is None:
            seed = secrets.randbits(31)
        self.seeds: list[int | None] = [seed + i for i in range(n)] if sampled and seed is not None else [None] * n
        self.completions: list[Completion] = []

    def text_ids(self) -> list[int]:
        """The ids of the whole text read so far: a snapshot's text and its last character, then the prefix."""
        start = self.request.start
        return (start.text + [start.last] if start is not None else []) + self.vocab.encode(self.request.prefix)

    def rows(self, owner=None) -> list[Row]:
        """The batch rows: per continuation, its best_of candidates (a `Group` when more than one).
        Candidate 0 of choice i draws from seed + i, so best_of 1 is plain sampling; candidate j
        from `candidate_seed(seed + i, j)`."""
        r = self.request
        read = self.text_ids()
        last = r.prefix[-1:] or self.vocab.idx_to_char[self.ids[-1]]
        line_length = since_last(read, self.vocab.char_to_idx.get("\n"))
        rows = []
        for i, seed in enumerate(self.seeds):
            candidates = [Row(r.params, seed, self.stop, r.max_chars, i, owner,
                              self.plan.tracker() if self.plan else None, r.keep_state, read, last.isspace(),
                              candidate_seed(seed, j), r.logprobs, line_length) for j in range(r.params.best_of)]
            if len(candidates) > 1:
                Group(candidates, r.params.best_of_chars)
            rows += candidates
        return rows

    def finish(self, rows: list[Row]) -> None:
        rows = [row for row in rows if row.group is None or row is row.group.lead]  # one per continuation
        for row in rows:
            if row.keep_state and row.finish and row.snapshot is None:  # nothing generated (max_chars 0)
                row.snapshot = self.read_all_but_last()
        self.completions = [row.completion(self.request.prefix) for row in rows]

    def read_all_but_last(self) -> Snapshot:
        """The snapshot after reading the input but its last character (for a row that generated nothing)."""
        device, given = self.model.dense.weight.device, self.request.start
        start = self.model.init_state(1) if given is None else state_to(given.state, device)
        seen = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
        if given is not None:
            seen |= given.seen.cpu()
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
    """Continue `prefix` with up to `max_chars` characters, `n` times (see `Request`, which
    takes the `options` start, keep_state, constraints and logprobs)."""
    generation = Generation(model, vocab, Request(prefix, max_chars, params, stop, seed, n, **options))
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
