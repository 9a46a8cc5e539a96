"""Reading a corpus: UTF-8 text, line endings normalised, a newline policy, a contiguous split.

Newline policies: `keep` (default) keeps line breaks, which carry a lyric's structure;
`space` turns each one into a space, as the tutorial does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from model_store.vocab import NEWLINE_POLICIES, Vocabulary, normalise_newlines


class CorpusError(ValueError):
    """A corpus that cannot be trained on, with the reason."""


@dataclass
class Corpus:
    text: str  # after normalisation, policy and --max-chars
    vocab: Vocabulary  # from all of `text`, so validation characters are known
    train_ids: list[int]
    val_ids: list[int]
    sha256: str  # of the file's bytes, to tie a checkpoint to its corpus
    file_chars: int  # characters in the file after normalisation


def load_corpus(path: str | Path, newlines: str = "keep", val_frac: float = 0.1,
                max_chars: int | None = None) -> Corpus:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror or e}") from e
    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path} is not UTF-8 text: {e}") from e
    if newlines not in NEWLINE_POLICIES:
        raise CorpusError(f"newlines must be one of {NEWLINE_POLICIES}, not {newlines!r}")
    text = normalise_newlines(decoded, newlines)
    file_chars = len(text)
    if max_chars is not None:
        if max_chars < 2:
            raise CorpusError("--max-chars must be at least 2")
        text = text[:max_chars]
    if not 0.0 <= val_frac < 1.0:
        raise CorpusError(f"--val-frac must be in [0, 1), not {val_frac}")
    if len(text) < 2:
        raise CorpusError(f"corpus {path} is empty or has a single character: nothing to learn")
    vocab = Vocabulary.from_text(text)
    ids = vocab.encode(text)
    n_val = int(len(ids) * val_frac)
    split = len(ids) - n_val
    return Corpus(text=text, vocab=vocab, train_ids=ids[:split], val_ids=ids[split:],
                  sha256=hashlib.sha256(raw).hexdigest(), file_chars=file_chars)
