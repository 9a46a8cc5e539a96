"""Batch stepping: the rows of any number of requests prefilled together and stepped together, one
model call per step (the service's engine drives it). How each row picks its character is
sampling.py's job; with `best_of` > 1 a continuation is a `Group` of candidate rows, and every
`best_of_chars` characters the likeliest candidate (by the model's own probabilities) is kept and
the others continue from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy
import torch

from model_store import kernels
from model_store.constraints import mask_logits
from model_store.continuation import CharLogprob, Row
from model_store.mixture import LanguageModel, for_generation
from model_store.model import State, state_parts
from model_store.sampling import block_repeats, sample_next
from model_store.state import Snapshot
from model_store.vocab import Vocabulary

if TYPE_CHECKING:
    from model_store.generate import Generation


def select_state(state: State, index: torch.Tensor) -> State:
    """The state's rows (dim 1) at `index`, in that order."""
    if isinstance(state, tuple):
        return tuple(s.index_select(1, index) for s in state)
    return state.index_select(1, index)


def cat_state(a: State, b: State) -> State:
    return (tuple(torch.cat(pair, dim=1) for pair in zip(a, b, strict=True)) if isinstance(a, tuple)
            else torch.cat([a, *state_parts(b)], dim=1))


def state_to(state: State, device, copy: bool = False) -> State:
    if isinstance(state, tuple):
        return tuple(s.to(device, copy=copy) for s in state)
    return state.to(device, copy=copy)


def snapshot(state: State, last: int, seen: torch.Tensor, text: Sequence[int]) -> Snapshot:
    """A CPU copy of one row's position: its state (all but the last character read), that character, seen-mask,
    and the ids of the text before that character."""
    return Snapshot(state_to(state, "cpu", copy=True), last, seen.to("cpu", copy=True), list(text))


def char_logprobs(logits: torch.Tensor, chosen: torch.Tensor, tops: list[int]) -> list[CharLogprob]:
    """Row i's character chosen[i]: its log-probability under softmax(logits[i]) and the tops[i] likeliest there."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    picked = log_probs.gather(1, chosen[:, None])[:, 0].tolist()
    values, ids = (t.tolist() for t in log_probs.topk(min(max(tops), log_probs.shape[1]), dim=1))
    return [CharLogprob(c, lp, list(zip(i[:k], v[:k], strict=True)))
            for c, lp, i, v, k in zip(chosen.tolist(), picked, ids, values, tops, strict=True)]


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
        self.newline = vocab.char_to_idx.get("\n")  # for min_line_chars
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
        logits = block_repeats(mask_logits(raw, [r.tracker for r in rows]), rows, self.blanks, self.newline)
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
        if (given := g.request.start) is not None:
            for whole, part in zip(state_parts(start), state_parts(given.state), strict=True):
                whole[:, i] = part[:, 0].to(device)
            seen[i] = given.seen.cpu().numpy()
        seen[i, g.ids] = True
    logits, state = model(torch.tensor([g.ids for g in generations], device=device), start, last_only=True)
    seen_mask = torch.from_numpy(seen).to(device)
    if all(g.request.row_count == 1 for g in generations):
        return logits[:, -1], state, seen_mask
    counts = torch.tensor([g.request.row_count for g in generations], device=device)
    index = torch.repeat_interleave(torch.arange(len(generations), device=device), counts)
    return logits[:, -1].index_select(0, index), select_state(state, index), seen_mask.index_select(0, index)
