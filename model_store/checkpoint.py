"""Self-describing checkpoints: one `.safetensors` file per model, written atomically.

The file holds the model's tensors and, in the safetensors header, one JSON metadata
entry: format version, `ModelConfig`, vocabulary, newline policy and training summary.
A mixture (mixture.py) also stores its n-gram's count tables as integer tensors named
`ngram.*` and its weights in a `mixture` metadata entry.
Loading never unpickles anything: safetensors stores raw tensors and a JSON header,
so a model file cannot run code. Every way a file can be wrong (truncated, corrupt,
missing metadata, mismatched shapes) raises `CheckpointError` with the reason.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from model_store.mixture import LanguageModel, MixtureConfig, MixtureLM
from model_store.model import CharLM, ModelConfig
from model_store.ngram import KneserNey
from model_store.vocab import NEWLINE_POLICIES, Vocabulary

FORMAT_VERSION = 1
METADATA_KEY = "lyrics"


class CheckpointError(ValueError):
    """A model file that cannot be used, with the reason."""


@dataclass
class Checkpoint:
    """A loaded model with everything its file says about it."""

    model: LanguageModel
    vocab: Vocabulary
    newlines: str = "keep"
    training: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".safetensors") if self.path else "model"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`, so a
    crash leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model file is meant to be read by others (a service user)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, model: CharLM | MixtureLM, vocab: Vocabulary,
                    newlines: str = "keep", training: dict | None = None) -> None:
    if len(vocab) != model.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} characters, model expects {model.config.vocab_size}")
    if newlines not in NEWLINE_POLICIES:
        raise ValueError(f"newlines must be one of {NEWLINE_POLICIES}")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "vocab": vocab.as_string(),
        "newlines": newlines,
        "training": training or {},
    }
    rnn = model.rnn if isinstance(model, MixtureLM) else model
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rnn.weight_tensors().items()}
    if isinstance(model, MixtureLM):  # the n-gram's count tables ride along as integer tensors
        meta["mixture"] = model.mixture.to_dict()
        tensors.update(model.ngram.to_tensors() if model.ngram else {})
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta, ensure_ascii=False)}))


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint, without loading its tensors."""
    meta, _ = _open(path, read_tensors=False)
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", impl: str = "auto",
                    pack: bool = False) -> Checkpoint:
    """Load and validate a checkpoint onto `device` (a GPU-trained file loads on a CPU). `pack`: for
    generation and scoring, keep the weight matrices in oneDNN's layout too (`CharLM.pack`)."""
    meta, tensors = _open(path, read_tensors=True)
    ngram_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("ngram.")]}
    try:
        config = ModelConfig(**meta["config"])
        vocab = Vocabulary(meta["vocab"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid model config or vocabulary in metadata: {e}") from e
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {len(vocab)} characters but config says {config.vocab_size}")
    newlines = meta.get("newlines", "keep")
    if newlines not in NEWLINE_POLICIES:
        raise CheckpointError(f"{path}: unknown newline policy {newlines!r}")
    model = CharLM(config, impl=impl)
    expected = model.weight_tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} has dtype {got.dtype}, expected a float type")
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=not config.tie_weights)
    if ngram_tensors and "mixture" not in meta:
        raise CheckpointError(f"{path}: n-gram tables without a 'mixture' entry in the metadata")
    served: LanguageModel = load_mixture(path, model, meta["mixture"], ngram_tensors) if "mixture" in meta else model
    served.to(device).eval()
    if pack:
        served.pack()
    training = meta.get("training") or {}
    if not isinstance(training, dict):
        raise CheckpointError(f"{path}: training summary must be a JSON object")
    return Checkpoint(model=served, vocab=vocab, newlines=newlines, training=training, path=Path(path))


def load_mixture(path, rnn: CharLM, settings, ngram_tensors: dict[str, torch.Tensor]) -> MixtureLM:
    try:
        config = MixtureConfig(**{**settings, "weights": tuple(tuple(w) for w in settings["weights"])})
        ngram = KneserNey.from_tensors(ngram_tensors) if ngram_tensors else None
        return MixtureLM(rnn, ngram, config)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: invalid mixture (weights or n-gram tables): {e}") from e


def _open(path: str | os.PathLike, read_tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path}: no '{METADATA_KEY}' metadata: not a lyrics checkpoint")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is not supported (this build reads {FORMAT_VERSION})")
    return meta, tensors


def finite_or_none(x: float | None) -> float | None:
    """JSON has no infinity: perplexities that overflowed are stored as null."""
    return x if x is not None and math.isfinite(x) else None
