"""State handles: a generation's recurrent state, sealed into an opaque string a client can send back.

A `Snapshot` is where one continuation stopped: the state after every character of its text
but the last, that last character (not yet fed), and which characters the text holds (for the
repetition penalty). Continuing from it feeds the last character and then the new prefix, so
the result is exactly that of generating from the whole text, and an empty new prefix works.

A handle is `ls1.<body>.<mac>`, both parts base64url without padding:

    body = 4-byte little-endian header length | JSON header | state tensors | packed seen bits
    mac  = HMAC-SHA256(key, "ls1." + base64url(body))

The header names the model (name, a SHA-256 of its weights, of its vocabulary, its sizes),
the expiry time and the text's last TEXT_KEPT characters (ids, for `no_repeat_ngram`). The
state tensors are raw little-endian bytes (float32; a mixture model's history is int32),
laid out as the model's own `init_state(1)`, which is also what a handle is checked against
when it is opened. Nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from model_store.mixture import LanguageModel
from model_store.model import State, state_parts
from model_store.vocab import Vocabulary

PREFIX = "ls1."
TEXT_KEPT = 4096  # characters of the text a handle carries for no_repeat_ngram
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StateError(ValueError):
    """A handle that cannot be used. `kind`: 'invalid' (malformed, forged or altered), 'expired',
    or 'model_mismatch' (made by another model, or by this one before its weights changed)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Snapshot:
    """One continuation's resumable position (tensors on the CPU)."""

    state: State  # the model's state for one row, after every character but the last
    last: int  # the last character's index: fed first when the text continues
    seen: torch.Tensor  # (vocab,) bool: the characters of the text so far
    # the ids before `last`, its last TEXT_KEPT at most: no_repeat_ngram bans the text's n-grams on continuing
    text: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    weights: str  # SHA-256 of the weights
    vocab: str  # SHA-256 of the vocabulary
    cell: str
    num_layers: int
    hidden_size: int
    vocab_size: int


def weights_sha256(model: LanguageModel) -> str:
    """SHA-256 over the model's tensors (names and float32 bytes), computed once per model object."""
    if model not in _fingerprints:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        _fingerprints[model] = digest.hexdigest()
    return _fingerprints[model]


def model_identity(name: str, model: LanguageModel, vocab: Vocabulary) -> ModelIdentity:
    c = model.config
    return ModelIdentity(name, weights_sha256(model), vocab.sha256(), c.cell, c.num_layers, c.hidden_size,
                         c.vocab_size)


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise StateError("invalid", "the state handle is not valid base64url: was it cut or changed?") from e


class StateCodec:
    """Seals snapshots into handles and opens them again, with one server key and a lifetime."""

    def __init__(self, key: bytes, ttl_s: float):
        if not key:
            raise ValueError("the state key must not be empty")
        self.key, self.ttl_s = key, ttl_s

    def mac(self, signed: str) -> bytes:
        return hmac.new(self.key, signed.encode("ascii"), hashlib.sha256).digest()

    def encode(self, snapshot: Snapshot, identity: ModelIdentity, now: float | None = None) -> str:
        now = time.time() if now is None else now
        header = {"model": identity.name, "weights": identity.weights, "vocab": identity.vocab,
                  "cell": identity.cell, "layers": identity.num_layers, "hidden": identity.hidden_size,
                  "vocab_size": identity.vocab_size, "last": snapshot.last, "text": snapshot.text[-TEXT_KEPT:],
                  "expires": int(now + self.ttl_s)}
        raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        tensors = b"".join(little_endian(p.detach().cpu().numpy()).tobytes() for p in state_parts(snapshot.state))
        seen = np.packbits(snapshot.seen.to("cpu").numpy().astype(bool), bitorder="little").tobytes()
        signed = PREFIX + b64encode(struct.pack("<I", len(raw)) + raw + tensors + seen)
        return signed + "." + b64encode(self.mac(signed))

    def open(self, handle: str, now: float | None = None) -> OpenedState:
        """Check the handle's signature and expiry; the model checks come with `OpenedState.snapshot`."""
        if not handle.startswith(PREFIX) or handle.count(".") != 2:
            raise StateError("invalid", "not a state handle of this service (expected 'ls1.<body>.<mac>', as "
                                        "returned in 'state' with return_state: true)")
        signed, _, mac = handle.rpartition(".")
        if not hmac.compare_digest(b64decode(mac), self.mac(signed)):
            raise StateError("invalid", "the state handle's signature does not match: it was altered, or made by "
                                        "a server with another LYRICS_STATE_KEY (or before a restart without one)")
        body = b64decode(signed[len(PREFIX):])
        try:
            (size,) = struct.unpack_from("<I", body)
            header = json.loads(body[4:4 + size].decode())
            expires = float(header["expires"])
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise StateError("invalid", "the state handle's header cannot be read") from e
        now = time.time() if now is None else now
        if now > expires:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))
            raise StateError("expired", f"the state handle expired at {when} (handles live {self.ttl_s:g} s, "
                                        "LYRICS_STATE_TTL_S): generate from the whole text again")
        return OpenedState(header, body[4 + size:])


@dataclass
class OpenedState:
    """A handle whose signature and expiry were checked."""

    header: dict
    payload: bytes

    @property
    def model(self) -> str:
        return str(self.header.get("model"))

    def snapshot(self, name: str, model: LanguageModel, vocab: Vocabulary) -> Snapshot:
        """The snapshot (on the CPU), if the handle was made by exactly this model; StateError('model_mismatch')
        if not. Its tensors must be laid out as the model's own `init_state(1)`."""
        h, identity, template = self.header, model_identity(name, model, vocab), model.init_state(1, "cpu")
        if h.get("model") != identity.name:
            raise StateError("model_mismatch", f"the state handle belongs to model {self.model!r}, not "
                                               f"{identity.name!r}: send it with model {self.model!r} (or none)")
        if h.get("weights") != identity.weights or h.get("vocab") != identity.vocab:
            raise StateError("model_mismatch", f"model {identity.name!r} has changed since the state handle was "
                                               "made (other weights or vocabulary): generate from the whole text again")
        shapes = [(little_endian(t.cpu().numpy()).dtype, t.shape) for t in state_parts(template)]
        sizes = [dtype.itemsize * int(np.prod(shape)) for dtype, shape in shapes]
        seen_bytes = (identity.vocab_size + 7) // 8
        last, text = h.get("last"), h.get("text", [])  # a handle made before "text" was kept has none
        if len(self.payload) != sum(sizes) + seen_bytes or not isinstance(last, int) \
                or not 0 <= last < identity.vocab_size or not isinstance(text, list) \
                or not all(isinstance(i, int) and 0 <= i < identity.vocab_size for i in text):
            raise StateError("invalid", "the state handle's contents do not fit the model")
        parts, offset = [], 0
        for (dtype, shape), size in zip(shapes, sizes, strict=True):
            values = np.frombuffer(self.payload, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            parts.append(torch.from_numpy(values.astype(dtype.newbyteorder("="))).reshape(shape))
            offset += size
        bits = np.unpackbits(np.frombuffer(self.payload, dtype=np.uint8, offset=offset), bitorder="little")
        seen = torch.from_numpy(bits[:identity.vocab_size].astype(bool))
        return Snapshot(tuple(parts) if isinstance(template, tuple) else parts[0], last, seen, text)


def little_endian(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("<"), copy=False)
