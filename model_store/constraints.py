"""Structure constraints on generated text, enforced exactly by masking the vocabulary at each step.

Constraints apply to the generated characters only: the prefix is context, and the first
generated line starts right after it (end the prefix with a line break to start on a new
line). Each line is its characters followed by the separator: a line break, or a space for
models trained with newlines='space' (then spaces cannot occur inside a line).

* `lines`: the text is exactly that many lines, each ending with the separator; generation
  ends after the last one. Without `line_lengths` a line has at least one character and ends
  where the model puts a separator (it is forced when max_chars would not fit the rest).
* `line_lengths`: an int (every line), a pattern "7-7-7-7" or a list [5, 7, 5], repeated
  when `lines` is larger; the separator is masked until a line has its length, then forced.
  Without `lines`, lines follow the pattern until max_chars.
* `banned`: characters never generated.
* `required`: characters that must appear. The policy: once the free content positions left
  are no more than the required characters still missing, every such position may only take
  a missing one (so they land near the end). The positions are known exactly with
  `line_lengths` and `lines`; otherwise max_chars bounds them. A stop string can still end
  the text early: the answer reports whether each constraint was met.
* `rhyme` (needs `line_lengths`): every line's last character shares a final (韵母,
  pypinyin's `Style.FINALS`, compared exactly: 光 'uang' and 芒 'ang' differ). `true`: the
  first line's ending sets the final; a string such as "ang" names it.

Unconstrained rows have no `Tracker` and cost nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from pypinyin import Style, lazy_pinyin

from model_store.vocab import Vocabulary

PATTERN = re.compile(r"^\d+(-\d+)*$")


class ConstraintError(ValueError):
    """Constraints that cannot be met or contradict each other; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Constraints:
    lines: int | None = None
    line_lengths: int | str | Sequence[int] | None = None
    banned: str = ""
    required: str = ""
    rhyme: bool | str | None = None


def parse_line_lengths(value: int | str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not PATTERN.match(value.strip()):
            raise ConstraintError("line_lengths", f"{value!r} is not a pattern of lengths such as '7-7-7-7'")
        value = [int(part) for part in value.strip().split("-")]
    lengths = (value,) if isinstance(value, int) else tuple(value)
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ConstraintError("line_lengths", "every line length must be a positive whole number")
    return lengths


def structure_chars(lines: int | None, lengths: tuple[int, ...] | None) -> int | None:
    """Characters that `lines` lines of the (repeating) `lengths` take, separators included."""
    if lines is None or lengths is None:
        return None
    whole, part = divmod(lines, len(lengths))
    return whole * (sum(lengths) + len(lengths)) + sum(lengths[:part]) + part


def final_of(char: str) -> str | None:
    """The character's final (韵母) without tone, or None (not a Chinese character, or no final)."""
    final = (lazy_pinyin(char, style=Style.FINALS, errors="ignore") or [""])[0]
    return final.replace("ü", "v") or None


@lru_cache(maxsize=16)
def vocabulary_finals(chars: str) -> tuple[str | None, ...]:
    return tuple(final_of(c) for c in chars)


class Plan:
    """Constraints checked against a vocabulary and a length budget, with their masks on `device`.
    Raises ConstraintError for impossible or contradictory ones."""

    def __init__(self, constraints: Constraints, vocab: Vocabulary, max_chars: int, device=None):
        c = self.constraints = constraints
        self.vocab, self.max_chars, self.lines = vocab, max_chars, c.lines
        self.lengths = parse_line_lengths(c.line_lengths)
        if self.lines is not None and self.lines < 1:
            raise ConstraintError("lines", "lines must be at least 1")
        if self.lengths and max(self.lengths) > max_chars:
            raise ConstraintError("line_lengths", f"a line of {max(self.lengths)} characters does not fit in "
                                                  f"max_chars {max_chars}")
        self.structured = self.lines is not None or self.lengths is not None
        self.sep = "\n" if "\n" in vocab else " "
        if self.structured and self.sep not in vocab:
            raise ConstraintError("lines", "the model has neither a line break nor a space to end a line with")
        self.banned, self.required = self.check_characters(c.banned, c.required)
        self.allowed_any = ~self.mask(self.banned)
        self.content = self.allowed_any & ~self.mask(self.sep) if self.structured else self.allowed_any
        if not self.content.any():
            raise ConstraintError("banned", "every character the model could write is banned")
        self.sep_only = self.mask(self.sep)
        self.finals: tuple[str | None, ...] = ()
        self.has_final = self.content
        self.rhyme = self.check_rhyme(c.rhyme)
        self.layout = self.fixed_layout()
        self.slots_from = self.free_slots()
        self.device = device
        self.allowed_any, self.content, self.sep_only, self.has_final = (
            m.to(device) for m in (self.allowed_any, self.content, self.sep_only, self.has_final))
        self.rhyme_masks: dict[str, torch.Tensor] = {}

    def mask(self, chars) -> torch.Tensor:
        m = torch.zeros(len(self.vocab), dtype=torch.bool)
        m[[self.vocab.char_to_idx[ch] for ch in chars if ch in self.vocab]] = True
        return m

    def check_characters(self, banned: str, required: str) -> tuple[frozenset[str], tuple[int, ...]]:
        required = "".join(dict.fromkeys(required))
        if both := [ch for ch in required if ch in banned]:
            raise ConstraintError("required", f"characters both required and banned: {''.join(both)!r}")
        if missing := self.vocab.unknown(required):
            raise ConstraintError("required", f"required characters the model cannot write: {''.join(missing)!r}")
        if self.structured and self.sep in required:
            raise ConstraintError("required", "the line separator cannot be required: use lines")
        if self.structured and self.sep in banned:
            raise ConstraintError("banned", "the line separator cannot be banned when lines are constrained")
        return frozenset(banned), tuple(self.vocab.encode(required))

    def free_slots(self) -> list[int] | None:
        """With a fixed layout: the free content positions at and after each position (for `required`).
        Checks that the required characters fit in any case."""
        need = len(self.required)
        if self.layout is None:
            if self.lines is not None and self.max_chars < self.lines + max(self.lines, need):
                raise ConstraintError("lines", f"{self.lines} lines with {need} required characters need at least "
                                               f"{self.lines + max(self.lines, need)} characters; max_chars is "
                                               f"{self.max_chars}")
            if need > self.max_chars:
                raise ConstraintError("required", f"{need} required characters do not fit in max_chars "
                                                  f"{self.max_chars}")
            return None
        slots = [0] * (len(self.layout) + 1)
        for i in range(len(self.layout) - 1, -1, -1):
            slots[i] = slots[i + 1] + (self.layout[i] == "c")
        if need > slots[0]:
            raise ConstraintError("required", f"{need} required characters do not fit the {slots[0]} free "
                                              "positions of the structure")
        return slots

    def check_rhyme(self, rhyme: bool | str | None) -> str | bool:
        """False (off), True (the first line sets the final) or the final to match."""
        if rhyme is None or rhyme is False:
            return False
        if self.lengths is None:
            raise ConstraintError("rhyme", "rhyme needs line_lengths, so that the line endings are known")
        self.finals = vocabulary_finals(self.vocab.as_string())
        self.has_final = self.content & torch.tensor([f is not None for f in self.finals])
        if rhyme is True:
            if not self.has_final.any():
                raise ConstraintError("rhyme", "no character the model may write has a pinyin final")
            return True
        final = str(rhyme).strip().lower().replace("ü", "v")
        if not (self.content & torch.tensor([f == final for f in self.finals])).any():
            raise ConstraintError("rhyme", f"no character the model may write has the final {rhyme!r}")
        return final

    def fixed_layout(self) -> str | None:
        """Per generated position: 'c' content, 'f' a rhyming line end, 's' the separator. None unless
        line_lengths fix it; cut at max_chars when `lines` is not given."""
        if self.lengths is None:
            return None
        needed = structure_chars(self.lines, self.lengths)
        if needed is not None and needed > self.max_chars:
            raise ConstraintError("line_lengths", f"the line structure needs {needed} characters (separators "
                                                  f"included); max_chars is {self.max_chars}")
        count = self.lines or self.max_chars  # without `lines`, lines until max_chars (each takes >= 2)
        layout, size = [], 0
        for i in range(count):
            length = self.lengths[i % len(self.lengths)]
            layout.append("c" * (length - 1) + ("f" if self.rhyme else "c") + "s")
            size += length + 1
            if size >= self.max_chars:
                break
        return "".join(layout)[: self.max_chars]

    def total(self) -> int | None:
        """The characters the structure takes when it is fixed (line_lengths and lines), else None."""
        return len(self.layout) if self.layout is not None and self.lines else None

    def rhyme_mask(self, final: str) -> torch.Tensor:
        if final not in self.rhyme_masks:
            match = torch.tensor([f == final for f in self.finals], device=self.device)
            self.rhyme_masks[final] = self.content & match
        return self.rhyme_masks[final]

    def tracker(self) -> Tracker:
        return Tracker(self)

    def met(self, generated: str) -> dict[str, bool]:
        """Whether the generated text meets each requested constraint, read from the text itself."""
        c, result = self.constraints, {}
        pieces = generated.split(self.sep) if self.structured else [generated]
        complete, rest = pieces[:-1], pieces[-1]
        if c.lines is not None:
            result["lines"] = rest == "" and len(complete) == c.lines and all(complete)
        if self.lengths is not None:
            expected = [self.lengths[i % len(self.lengths)] for i in range(len(complete))]
            result["line_lengths"] = bool(complete) and rest == "" and [len(x) for x in complete] == expected
        if c.banned:
            result["banned"] = not any(ch in self.banned for ch in generated)
        if c.required:
            result["required"] = all(ch in generated for ch in c.required)
        if self.rhyme:
            endings = [final_of(line[-1]) if line else None for line in complete]
            target = endings[0] if self.rhyme is True and endings else self.rhyme
            result["rhyme"] = bool(endings) and target is not None and all(e == target for e in endings)
        return result


class Tracker:
    """One row's progress through a Plan: which characters the next position allows."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.produced = self.line = self.pos = 0  # characters so far; current line and position in it
        self.missing = list(plan.required)
        self.final = plan.rhyme if isinstance(plan.rhyme, str) else None
        self.done = False

    def copy(self) -> Tracker:
        new = copy.copy(self)  # the plan is shared
        new.missing = list(self.missing)
        return new

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the characters the next position may take."""
        p = self.plan
        remaining = p.max_chars - self.produced
        if p.layout is not None:
            kind = p.layout[self.produced]
            if kind == "s":
                return p.sep_only
            if kind == "f":
                return p.rhyme_mask(self.final) if self.final else p.has_final
            assert p.slots_from is not None  # computed with the layout
            mask, slots = p.content, p.slots_from[self.produced]
        elif p.lines is not None:
            lines_after = p.lines - self.line - 1
            if self.pos > 0 and remaining <= 1 + 2 * lines_after:
                return p.sep_only  # close the line, or the rest would not fit in max_chars
            last_line_open = lines_after == 0 and self.missing
            mask = p.content if self.pos == 0 or last_line_open else p.allowed_any
            slots = remaining - (lines_after + 1)
        else:
            mask, slots = p.allowed_any, remaining
        if self.missing and len(self.missing) >= slots:
            forced = torch.zeros_like(mask)
            forced[self.missing] = True
            return forced & mask
        return mask

    def push(self, index: int) -> None:
        p = self.plan
        self.produced += 1
        if index in self.missing:
            self.missing.remove(index)
        if p.structured and p.vocab.idx_to_char[index] == p.sep:
            self.line, self.pos = self.line + 1, 0
            self.done = self.line == p.lines
        else:
            if p.rhyme is True and self.final is None and p.layout is not None and p.layout[self.produced - 1] == "f":
                self.final = p.finals[index]
            self.pos += 1


def mask_logits(logits: torch.Tensor, trackers: Sequence[Tracker | None]) -> torch.Tensor:
    """Logits with every character a row's tracker forbids set to -inf (rows without one untouched)."""
    rows = [i for i, t in enumerate(trackers) if t is not None]
    if not rows:
        return logits
    allowed = torch.stack([t.allowed() for t in trackers if t is not None])
    index = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, masked)
