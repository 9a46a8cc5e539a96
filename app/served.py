"""The models the service answers with: loaded once at startup, looked up by name only."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.errors import ApiError
from app.settings import Settings
from model_store.checkpoint import Checkpoint
from model_store.registry import checkpoint_paths, load_directory, resolve_device

log = logging.getLogger("app.models")


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to change."""


@dataclass
class ServedModels:
    models: dict[str, Checkpoint]
    default: str
    device: str

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
    loaded = load_directory(directory, device)
    for name, reason in loaded.skipped.items():
        log.warning("skipped %s: %s", name, reason)
    for name, ck in loaded.models.items():
        c = ck.config
        log.info("loaded %s: %s %dx%d, vocabulary %d, %s parameters, newlines=%s, on %s", name, c.cell, c.num_layers,
                 c.hidden_size, c.vocab_size, f"{ck.model.num_parameters():,}", ck.newlines, device)
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
    return ServedModels(models=loaded.models, default=default, device=str(device))
