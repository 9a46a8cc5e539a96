"""Text generation as a request asks for it: `Generation` (a prefix, its decoding settings, stop
strings, seeds, n continuations, constraints, a start state) prefills the prefix in one forward
call and then samples one character per step; `generate` runs one to its end.

The rows it makes are stepped by batch.py's `Batch` (alone here; with other requests' rows in
the service's engine); each row's text, stops and completion are continuation.py's `Row`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence

import torch

from model_store.batch import Batch, Group, char_logprobs, prefill_rows, snapshot, state_to
from model_store.constraints import Constraints, Plan
from model_store.continuation import CharLogprob, Completion, Delta, Row
from model_store.mixture import LanguageModel, for_generation
from model_store.sampling import SamplingParams
from model_store.state import Snapshot
from model_store.vocab import Vocabulary


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
