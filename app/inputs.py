"""What a model reads: line endings, newline policy and unknown characters, applied alike everywhere.

Line endings are normalised as the training corpus was (\\r\\n and \\r become \\n). Models
trained with newlines='space' have no line break in their vocabulary: for them every
newline becomes a space, as in training. Characters outside the vocabulary are either an
error that names them (422) or dropped and reported.
"""

from __future__ import annotations

from model_store.checkpoint import Checkpoint
from model_store.vocab import UnknownCharactersError, normalise_newlines


def model_text(ck: Checkpoint, text: str) -> str:
    return normalise_newlines(text, ck.newlines)


def unknown_error(ck: Checkpoint, missing: list[str], loc: list) -> dict:
    """A field error naming the characters the model cannot read."""
    return {"loc": loc, "msg": f"{UnknownCharactersError(missing)} (model {ck.name!r}; send \"unknown\": \"skip\" "
                               f"to drop them)", "type": "unknown_characters", "characters": missing[:100]}


def drop_unknown(ck: Checkpoint, text: str) -> tuple[str, int]:
    kept = "".join(c for c in text if c in ck.vocab)
    return kept, len(text) - len(kept)
