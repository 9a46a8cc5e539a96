"""Finding and loading checkpoints: by name in a model directory, or by path.

A model's name is its file's stem (`gru.safetensors` is `gru`). `load_directory` loads
every valid checkpoint and reports, rather than raises, the files it had to skip, so
one broken file never hides the good ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_store.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model_store.mixture import MixtureLM

BUNDLED_DIR = Path(__file__).parent / "checkpoints"
SUFFIX = ".safetensors"


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def checkpoint_paths(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))


def resolve(name_or_path: str, directory: str | os.PathLike = BUNDLED_DIR) -> Path:
    """A path to an existing file, or the checkpoint named `name_or_path` in `directory`."""
    candidate = Path(name_or_path)
    if candidate.suffix == SUFFIX or os.sep in name_or_path:
        return candidate
    return Path(directory) / f"{name_or_path}{SUFFIX}"


@dataclass
class LoadedModels:
    models: dict[str, Checkpoint] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> reason

    @property
    def default(self) -> str | None:
        """The model with the lowest validation perplexity (models without one come last)."""
        def key(name):
            ppl = self.models[name].training.get("val_perplexity")
            return (ppl is None, ppl if ppl is not None else 0.0, name)
        return min(self.models, key=key) if self.models else None


def describe(ck: Checkpoint, default: str | None = None) -> dict:
    """A model's public description: the CLI's `models --json` and the service's /models entries."""
    c, t, weight = ck.config, ck.training, ck.model.dense.weight
    return {"name": ck.name, "default": ck.name == default, "cell": c.cell, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "embed_size": c.embed_size, "vocab_size": c.vocab_size,
            "parameters": ck.model.num_parameters(), "newlines": ck.newlines, "impl": ck.model.impl,
            "packed": ck.model.is_packed,
            "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
            "train_perplexity": t.get("train_perplexity"), "val_perplexity": t.get("val_perplexity"),
            "training": t, "mixture": mixture_description(ck.model)}


def mixture_description(model) -> dict | None:
    if not isinstance(model, MixtureLM):
        return None
    return {"components": ["rnn", "ngram", "cache"] if model.ngram else ["rnn", "cache"],
            "ngram_order": model.ngram.order if model.ngram else None, **model.mixture.to_dict()}


def outside_directory(path: Path, directory: str | os.PathLike) -> bool:
    """Whether `path` (a symbolic link, say) resolves to a file outside `directory`."""
    return not path.resolve().is_relative_to(Path(directory).resolve())


def load_directory(directory: str | os.PathLike, device: str | torch.device = "cpu", pack: bool = False) -> LoadedModels:
    loaded = LoadedModels()
    for path in checkpoint_paths(directory):
        if outside_directory(path, directory):
            loaded.skipped[path.name] = "a symbolic link to a file outside the model directory: refused"
            continue
        try:
            ck = load_checkpoint(path, device=device, pack=pack)
        except CheckpointError as e:
            loaded.skipped[path.name] = str(e)
            continue
        loaded.models[ck.name] = ck
    return loaded
