"""The files a training run keeps beside its checkpoint: the resumable state (NAME.resume), the
metrics lines (NAME.metrics.jsonl), the curves (NAME.curves.png), and the clean-up of temp
files a killed run left behind."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from model_store.checkpoint import atomic_write_bytes
from model_store.model import CharLM
from training.corpus import Corpus

if TYPE_CHECKING:
    from training.train import TrainConfig

# Resumable state: tensors in a safetensors file, everything else in its JSON header.

# options a resumed run must share with the run it continues, or it would not be the same run
RESUME_FIXED = ("cell", "hidden_size", "num_layers", "embed_size", "dropout", "num_steps", "batch_size", "lr",
                "optimizer", "clip", "weight_decay", "init_std", "label_smoothing", "weight_drop", "tie_weights",
                "schedule", "precision", "sampling", "val_frac", "newlines",
                "max_chars", "seed")


def save_resume_state(path: Path, model: CharLM, optimizer: torch.optim.Optimizer, rng: random.Random,
                      cfg: TrainConfig, corpus: Corpus, epoch: int, best_val: float | None, best_epoch: int,
                      seconds: float) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.weight_tensors().items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = rng.getstate()
    meta = {"epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "seconds": seconds,
            "model_config": model.config.to_dict(), "corpus_sha256": corpus.sha256,
            "optimizer": cfg.optimizer, "options": {k: getattr(cfg, k) for k in RESUME_FIXED},
            "param_groups": opt["param_groups"], "optim_scalars": opt_scalars,
            "python_rng": [version, list(internal), gauss]}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"resume": json.dumps(meta)}))


def load_resume_state(path: Path, model: CharLM, optimizer: torch.optim.Optimizer, rng: random.Random,
                      cfg: TrainConfig, corpus: Corpus, device: torch.device) -> tuple[int, float | None, int, float]:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {path} (it is written after every epoch)")
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = json.loads((f.metadata() or {})["resume"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["model_config"] != model.config.to_dict():
        raise ValueError(f"--resume: {path} holds a {meta['model_config']} model; these options build "
                         f"{model.config.to_dict()}")
    if meta["corpus_sha256"] != corpus.sha256:
        raise ValueError(f"--resume: {path} was trained on another corpus (sha256 {meta['corpus_sha256'][:12]}...)")
    changed = {k: (v, getattr(cfg, k)) for k, v in meta["options"].items() if getattr(cfg, k) != v}
    if changed:
        listed = ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"--resume: options differ from the run being resumed: {listed}")
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
                          strict=not model.config.tie_weights)
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value.to(device)
    for pid, scalars in meta["optim_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    return meta["epoch"], meta["best_val"], meta["best_epoch"], meta["seconds"]


def remove_stale_temps(paths: dict[str, Path]) -> None:
    """Delete the temp files a killed run left half-written (`.NAME.*.tmp` from atomic writes, the plot's
    `.NAME.tmp.png`). They are never loaded (dot names), only clutter; the real files are whole."""
    for path in paths.values():
        for stale in (*path.parent.glob(f".{path.name}.*.tmp"), path.with_name(f".{path.name}.tmp.png")):
            stale.unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict]:
    """The metrics lines; a line a killed run left half-written is skipped."""
    if not path.is_file():
        return []
    history = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:
            continue
    return [h for h in history if isinstance(h, dict) and "epoch" in h]


def write_metrics(path: Path, history: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(h) + "\n" for h in history).encode())


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_perplexity"] for h in history], label="train")
    val = [(h["epoch"], h["val_perplexity"]) for h in history if h["val_perplexity"] is not None]
    if val:
        ax.plot(*zip(*val, strict=True), label="validation", marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
