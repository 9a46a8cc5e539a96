"""Character vocabulary: the sorted distinct characters of a training corpus.

The vocabulary is stored inside every checkpoint, so a model always decodes with the
characters it was trained on. `one_hot` is the tutorial's function, kept as the
reference for what the model's input step means; the model itself never builds a
vocabulary-wide one-hot matrix (a row lookup gives the same product).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

NEWLINE_POLICIES = ("keep", "space")


def normalise_newlines(text: str, newlines: str = "keep") -> str:
    """Text as a model reads it: \\r\\n and \\r become \\n; with the `space` policy (the
    tutorial's) every newline then becomes a space. Training and serving apply the same rule."""
    if newlines not in NEWLINE_POLICIES:
        raise ValueError(f"newlines must be one of {NEWLINE_POLICIES}, not {newlines!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", " ") if newlines == "space" else text


class UnknownCharactersError(ValueError):
    """Raised when text holds characters the vocabulary does not have."""

    def __init__(self, unknown: Sequence[str]):
        self.unknown = list(unknown)
        shown = " ".join(repr(c) for c in self.unknown[:20])
        more = f" (+{len(self.unknown) - 20} more)" if len(self.unknown) > 20 else ""
        super().__init__(f"characters not in the model's vocabulary: {shown}{more}")


class Vocabulary:
    """Maps characters to indices and back; index order is the sorted characters."""

    def __init__(self, chars: Iterable[str]):
        self.idx_to_char: list[str] = list(chars)
        if any(len(c) != 1 for c in self.idx_to_char):
            raise ValueError("every vocabulary entry must be exactly one character")
        if len(set(self.idx_to_char)) != len(self.idx_to_char):
            raise ValueError("vocabulary entries must be distinct")
        self.char_to_idx = {c: i for i, c in enumerate(self.idx_to_char)}

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.idx_to_char)

    def __contains__(self, char: str) -> bool:
        return char in self.char_to_idx

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` missing from the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.char_to_idx))

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise UnknownCharactersError(missing)
        return [self.char_to_idx[c] for c in text]

    def decode(self, indices: Iterable[int]) -> str:
        return "".join(self.idx_to_char[i] for i in indices)

    def as_string(self) -> str:
        return "".join(self.idx_to_char)

    def sha256(self) -> str:
        return hashlib.sha256(self.as_string().encode("utf-8")).hexdigest()


def one_hot(x: torch.Tensor, n_class: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tutorial's one-hot: row i has a 1 at column x[i]. Shape (len(x), n_class)."""
    result = torch.zeros(x.shape[0], n_class, dtype=dtype, device=x.device)
    result.scatter_(1, x.view(-1, 1).long(), 1)
    return result
