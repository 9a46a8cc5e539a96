"""The models the service answers with: loaded at startup, looked up by name only, and
rescanned by `rescan` (POST /admin/reload), which builds a new set rather than editing one."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.errors import ApiError
from app.settings import Settings
from model_store.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model_store.registry import SUFFIX, LoadedModels, checkpoint_paths, load_directory, outside_directory, resolve_device

log = logging.getLogger("app.models")


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to change."""


class ReloadError(RuntimeError):
    """A rescan found no model to serve; the previous set stays."""


@dataclass(frozen=True)
class FileStamp:
    """What a model was loaded from: a file counts as changed when its size or mtime moved and its hash did too."""

    size: int
    mtime_ns: int
    sha256: str


def stamp(path: Path, previous: FileStamp | None = None) -> FileStamp:
    st = path.stat()
    if previous is not None and (previous.size, previous.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return previous
    with path.open("rb") as f:
        return FileStamp(st.st_size, st.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest())


@dataclass
class ServedModels:
    models: dict[str, Checkpoint]
    default: str
    device: str
    stamps: dict[str, FileStamp] = field(default_factory=dict)  # by model name

    def get(self, name: str | None) -> Checkpoint:
        """The named model (the default for None); a 404 naming the loaded ones otherwise.
        Names are keys of the loaded dict, never paths."""
        name = self.default if name is None else name
        if name in self.models:
            return self.models[name]
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise ApiError(404, "model_not_found", f"no model named {shown!r}; loaded models: {', '.join(self.models)}")


def load_models(settings: Settings) -> ServedModels:
    try:
        device = resolve_device(settings.device)
    except (ValueError, RuntimeError) as e:
        raise StartupError(f"LYRICS_DEVICE={settings.device!r} cannot be used: {e}") from e
    directory = settings.model_dir
    log.info("loading models from %s onto %s", directory, device)
    loaded = load_directory(directory, device, pack=True)
    for name, reason in loaded.skipped.items():
        log.warning("skipped %s: %s", name, reason)
    for ck in loaded.models.values():
        log_loaded(ck, device)
    if not loaded.models:
        if not directory.is_dir():
            why = "the directory does not exist"
        elif not checkpoint_paths(directory):
            why = "it holds no .safetensors file"
        else:
            why = f"every checkpoint was skipped ({len(loaded.skipped)}; reasons logged above)"
        raise StartupError(f"no model to serve in {directory}: {why}. Set LYRICS_MODEL_DIR (or --model-dir) to a "
                           f"directory of checkpoints written by `lyrics train`.")
    default = settings.default_model or loaded.default
    if default not in loaded.models:
        raise StartupError(f"LYRICS_DEFAULT_MODEL={default!r} is not among the loaded models: "
                           f"{', '.join(loaded.models)}")
    log.info("default model: %s", default)
    stamps = {name: stamp(ck.path) for name, ck in loaded.models.items() if ck.path is not None}
    return ServedModels(models=loaded.models, default=default, device=str(device), stamps=stamps)


def log_loaded(ck: Checkpoint, device) -> None:
    c = ck.config
    log.info("loaded %s: %s %dx%d, vocabulary %d, %s parameters, newlines=%s, on %s", ck.name, c.cell, c.num_layers,
             c.hidden_size, c.vocab_size, f"{ck.model.num_parameters():,}", ck.newlines, device)


def rescan(settings: Settings, current: ServedModels) -> tuple[ServedModels, dict]:
    """A new set from LYRICS_MODEL_DIR, reusing the loaded Checkpoint of every unchanged file, and a report.
    A file that changed but no longer loads keeps its previous version in service. Raises ReloadError,
    changing nothing, when the new set would be empty."""
    torch.set_num_threads(1)  # only the engine's scheduler threads get torch's intra-op pool (app/engine.py)
    directory = settings.model_dir
    models: dict[str, Checkpoint] = {}
    stamps: dict[str, FileStamp] = {}
    loaded, unchanged, skipped = [], [], {}
    for path in checkpoint_paths(directory):
        name = path.name.removesuffix(SUFFIX)
        if outside_directory(path, directory):
            skipped[path.name] = "a symbolic link to a file outside the model directory: refused"
            continue
        try:
            new = stamp(path, current.stamps.get(name))
            if name in current.models and name in current.stamps and new.sha256 == current.stamps[name].sha256:
                models[name], stamps[name] = current.models[name], new
                unchanged.append(name)
                continue
            models[name], stamps[name] = load_checkpoint(path, device=current.device, pack=True), new
            loaded.append(name)
            log_loaded(models[name], current.device)
        except (CheckpointError, OSError) as e:
            skipped[path.name] = str(e)
            if name in current.models:
                models[name] = current.models[name]
                if name in current.stamps:
                    stamps[name] = current.stamps[name]
                skipped[path.name] += "; still serving the previously loaded version"
                unchanged.append(name)
            log.warning("reload skipped %s: %s", path.name, skipped[path.name])
    if not models:
        raise ReloadError(f"no model could be loaded from the model directory ({len(skipped)} file(s) skipped); "
                          f"still serving {', '.join(current.models)}")
    default = settings.default_model
    if default not in models:
        if default is not None:
            log.warning("LYRICS_DEFAULT_MODEL=%r is no longer loaded; the default is now the best by perplexity",
                        default)
        default = LoadedModels(models).default or next(iter(models))  # the best by perplexity
    removed = [name for name in current.models if name not in models]
    log.info("reloaded: %d loaded, %d unchanged, %d removed, %d skipped; default %s",
             len(loaded), len(unchanged), len(removed), len(skipped), default)
    report = {"loaded": loaded, "unchanged": unchanged, "removed": removed, "skipped": skipped, "default": default}
    return ServedModels(models=models, default=default, device=current.device, stamps=stamps), report
