"""The training loop: minibatches, cross-entropy, real gradient clipping, validation,
best-checkpoint keeping, resumable state, progress, samples, metrics and curves.

Outputs for `--out NAME.safetensors`:
  NAME.safetensors     the best model so far by validation perplexity (the last one
                       when there is no validation split), a self-describing checkpoint
  NAME.resume          the latest weights, optimizer state, epoch and RNG states, for
                       `--resume` (safetensors too: no pickle)
  NAME.metrics.jsonl   one JSON line per epoch
  NAME.curves.png      train and validation perplexity against epoch
(written by run_files.py).

Under torchrun, training is data-parallel (training/distributed.py): rank 0 alone writes
these files, logs and shows progress, and rank 0 alone evaluates, telling the others.
"""

from __future__ import annotations

import ctypes
import math
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model_store import kernels
from model_store.checkpoint import finite_or_none, load_checkpoint, read_metadata, save_checkpoint
from model_store.generate import generate
from model_store.model import CharLM, ModelConfig
from model_store.scoring import score_ids
from model_store.vocab import Vocabulary

if TYPE_CHECKING:  # imported by train(): the `[train]` extra, which a serving install goes without
    from tqdm import tqdm
from training import distributed
from training.batches import data_iter_consecutive, data_iter_random, num_batches
from training.corpus import Corpus, CorpusError, load_corpus
from training.poetry import source_record
from training.run_files import (
    append_metrics,
    load_resume_state,
    plot_curves,
    read_metrics,
    remove_stale_temps,
    save_resume_state,
    write_metrics,
)

DEFAULT_LR = {"sgd": 100.0, "adam": 1e-3, "adamw": 3e-3}  # sgd: the tutorial's 1e2 for its scratch RNN


# The defaults of `lyrics train`: the regularised recipe of docs/quality.md, which holds out-of-sample
# perplexity far better than the tutorial's settings (those overfit after two epochs on this corpus).
# TrainConfig's own field defaults stay the plain model, for code that builds one field by field.
RECIPE = {"embed_size": None, "tie_weights": None, "dropout": 0.5, "weight_drop": 0.5, "label_smoothing": 0.1,
          "optimizer": "adamw", "weight_decay": 0.01, "schedule": "cosine", "num_steps": 70,
          "epochs": 30, "patience": 5}
# embed_size None: the hidden size; tie_weights None: tie when the embedding is as wide as the hidden layer

# The recipe's regularisation as the training part grows, for the options `lyrics train` is not given
# (TrainConfig.sized): (value at SIZED_RANGE[0] characters or fewer, value at SIZED_RANGE[1] or more),
# log-linear between. The small end is RECIPE, tuned on the lyrics (56,954 training characters); on 2.1 M
# characters of Song ci and Yuan qu it underfits (docs/quality.md, "Regularisation by corpus size").
SIZED = {"dropout": (0.5, 0.2), "weight_drop": (0.5, 0.2), "label_smoothing": (0.1, 0.0)}
SIZED_RANGE = (60_000, 2_000_000)


@dataclass
class TrainConfig:
    """The options of `lyrics train`; stored in the checkpoint's training summary."""

    corpus: str
    cell: str
    out: str
    impl: str = "auto"
    hidden_size: int = 256
    num_layers: int = 1
    embed_size: int = 0
    dropout: float = 0.0
    num_steps: int = 35
    batch_size: int = 32
    epochs: int = 50
    lr: float | None = None
    optimizer: str = "adam"
    clip: float = 1.0
    weight_decay: float = 0.0
    init_std: float = 0.0  # > 0: weights drawn from N(0, init_std), biases zero (the tutorial's 0.01)
    single_bias: bool = False  # hold the recurrent biases b_hh at zero: one bias per gate, as the tutorial's cells
    label_smoothing: float = 0.0  # share of each target's probability spread evenly over the vocabulary
    weight_drop: float = 0.0
    tie_weights: bool = False
    schedule: str = "constant"  # cosine: the learning rate decays to zero over --epochs
    patience: int = 0  # > 0: stop after this many evaluations without a better validation perplexity
    precision: str = "fp32"  # bf16: forward matmuls in bfloat16 (autocast), weights and loss in float32
    sampling: str = "consecutive"
    val_frac: float = 0.1
    newlines: str = "keep"
    max_chars: int | None = None
    device: str = "auto"
    seed: int = 0
    init_from: str | None = None  # a checkpoint whose weights start this run (fine-tuning a pretrained model)
    resume: bool = False
    eval_every: int = 1
    sample_every: int = 10
    sample_chars: int = 50
    prefixes: list[str] = field(default_factory=lambda: ["分开", "不分开"])
    progress: bool = True
    command: str = ""
    sized: tuple[str, ...] = ()  # options of SIZED chosen by the training part's size (lyrics train's defaults)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


@dataclass
class TrainResult:
    best_val_perplexity: float | None
    best_epoch: int
    final_train_perplexity: float
    epochs_run: int
    history: list[dict]


def paths_for(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.parent / out.name.removesuffix(".safetensors")
    return {"checkpoint": out, "resume": Path(f"{stem}.resume"),
            "metrics": Path(f"{stem}.metrics.jsonl"), "curves": Path(f"{stem}.curves.png")}


def sized_regularisation(train_chars: int) -> dict[str, float]:
    """The SIZED options' values for a training part of `train_chars` characters."""
    small, large = SIZED_RANGE
    t = min(max(math.log(max(train_chars, 1) / small) / math.log(large / small), 0.0), 1.0)
    return {name: round(at_small + (at_large - at_small) * t, 3) for name, (at_small, at_large) in SIZED.items()}


def make_optimizer(cfg: TrainConfig, model: CharLM) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # Adam's fused kernel updates each tensor in one pass: ~10x faster than its per-tensor loop on a CPU
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in model.parameters())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', not {cfg.optimizer!r}")


def learning_rate_at(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate for epoch `epoch` (0-based); stateless, so a resumed run follows the same schedule."""
    if cfg.schedule == "cosine":
        return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.learning_rate


def setup(cfg: TrainConfig, corpus: Corpus, device: torch.device) -> tuple[CharLM, torch.optim.Optimizer, random.Random]:
    """The seeded model, its optimizer and the sampler's random stream, in the order a run makes them."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    config = ModelConfig(cell=cfg.cell, vocab_size=len(corpus.vocab), hidden_size=cfg.hidden_size,
                         num_layers=cfg.num_layers, embed_size=cfg.embed_size, dropout=cfg.dropout,
                         weight_drop=cfg.weight_drop, tie_weights=cfg.tie_weights)
    model = CharLM(config, impl=cfg.impl)
    if cfg.init_std > 0:
        for param in model.parameters():
            if param.dim() > 1:
                torch.nn.init.normal_(param, 0.0, cfg.init_std)
            else:
                torch.nn.init.zeros_(param)
    if cfg.single_bias:
        # torch's cells add two biases (b_ih + b_hh), the tutorial's one (b_h): with both trained, SGD
        # moves the gates' bias twice as fast and counts its gradient twice in the clipped norm
        for name, param in model.named_parameters():
            if name.startswith("rnn.bias_hh"):
                torch.nn.init.zeros_(param)
                param.requires_grad_(False)
    model.to(device)
    keep_freed_memory()
    return model, make_optimizer(cfg, model), rng


# weights with a vocabulary-sized dimension, and which one (the one-hot W_xh's columns are characters)
VOCAB_DIMS = {"embedding.weight": 0, "dense.weight": 0, "dense.bias": 0}


@torch.no_grad()
def initialise_from(model: CharLM, vocab: Vocabulary, path: str) -> dict:
    """Start `model` from a trained checkpoint of the same architecture. The recurrent weights are
    copied; each character's rows (embedding, output layer) are copied by character, so the
    vocabularies may differ: a character the checkpoint lacks keeps its fresh initialisation and a
    character of the checkpoint this corpus lacks is dropped (pretraining on a larger text, then
    fine-tuning with the corpus's own, smaller, output layer). Returns what was shared."""
    source = load_checkpoint(path)
    if not isinstance(source.model, CharLM):
        raise ValueError(f"--init-from {path} is a mixture: give the recurrent model it was built from")
    fields = ("cell", "hidden_size", "num_layers", "embed_size", "tie_weights")
    differ = [f"{f} {getattr(source.config, f)!r} (this run: {getattr(model.config, f)!r})" for f in fields
              if getattr(source.config, f) != getattr(model.config, f)]
    if differ:
        raise ValueError(f"--init-from {path} has another architecture: " + ", ".join(differ))
    pairs = [(i, source.vocab.char_to_idx[c]) for i, c in enumerate(vocab.idx_to_char) if c in source.vocab]
    if not pairs:
        raise ValueError(f"--init-from {path} shares no character with this corpus")
    device = model.dense.weight.device
    mine, theirs = (torch.tensor(p, device=device) for p in zip(*pairs, strict=True))
    dims = dict(VOCAB_DIMS, **({"rnn.weight_ih_l0": 1} if not model.config.embed_size else {}))
    weights = source.model.state_dict()
    for name, tensor in model.state_dict().items():
        if name in dims:
            tensor.index_copy_(dims[name], mine, weights[name].to(device).index_select(dims[name], theirs))
        else:
            tensor.copy_(weights[name])
    return {"path": str(path), "chars_shared": len(pairs), "chars_new": len(vocab) - len(pairs)}


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the OS. Every batch
    allocates the same few-MB tensors (logits, their gradient) and frees them; by default
    glibc returns such blocks (mmap, heap trimming) and the next batch page-faults them in
    again, which cost ~1 ms of a ~11 ms batch (the one-hot RNN of bench/train_speed.py).
    No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (its maximum) from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: trim the heap only past 1 GB free at its top
    except (OSError, AttributeError):
        pass


def clip_gradients(params: Iterable[torch.nn.Parameter], theta: float) -> float:
    """Scale all gradients together so their global L2 norm is at most theta; returns the
    norm before clipping. Takes any iterable: the tutorial's concise loop passed a one-shot
    generator, which its norm loop used up, so it never clipped. theta <= 0: no clipping, the norm
    is only measured (clip_grad_norm_ with an infinite theta would still multiply every gradient by 1)."""
    params = list(params)  # a generator would be used up by the norm (the tutorial's bug)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if theta > 0:
        torch.nn.utils.clip_grads_with_norm_(params, theta, norm)
    return float(norm)


def detach_state(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, corpus: Corpus, cfg: TrainConfig,
                rng: random.Random, device: torch.device, progress: tqdm | None = None) -> tuple[float, float, int]:
    """One pass over the training ids: (mean loss, mean pre-clip gradient norm, characters). `progress`,
    a bar counting the epoch's characters (all ranks'), moves after every batch."""
    model.train()
    params = list(model.parameters())
    if cfg.sampling == "random":
        batches = data_iter_random(corpus.train_ids, cfg.batch_size, cfg.num_steps, rng, device)
    else:
        batches = data_iter_consecutive(corpus.train_ids, cfg.batch_size, cfg.num_steps, device)
    batches = distributed.shard_rows(batches)  # this rank's rows of each global batch
    state = None
    loss_sum, norm_sum, n_chars, n_batches = 0.0, 0.0, 0, 0
    for X, Y in batches:
        # random: each batch starts from a zero state; consecutive: carry it, cut the graph
        state = None if cfg.sampling == "random" else detach_state(state)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            logits, state = model(X, state)
        # the loss in float32 (a bfloat16 log-softmax over the vocabulary visibly slows convergence);
        # nll without label smoothing, for the reported perplexity
        loss, nll = kernels.cross_entropy(*flat_positions(logits, Y), cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm_sum += clip_gradients(params, cfg.clip)
        optimizer.step()
        loss_sum += nll.item() * Y.numel()
        n_chars += Y.numel()
        n_batches += 1
        if progress is not None:
            progress.set_postfix_str(f"batch {n_batches}/{progress.total // (cfg.batch_size * cfg.num_steps)}",
                                     refresh=False)
            progress.update(cfg.batch_size * cfg.num_steps)
    if n_batches == 0:
        raise CorpusError(f"the training part ({len(corpus.train_ids)} characters) is too short for one batch "
                          f"of {cfg.batch_size} x {cfg.num_steps}: lower --batch-size or --num-steps")
    return loss_sum / n_chars, norm_sum / n_batches, n_chars


def flat_positions(logits: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (batch, steps, vocab) as (positions, vocab) and targets as (positions,), in the order
    the logits lie in memory: the loss is a mean over positions, and the scratch model's logits
    are time-major underneath (CharLM.linear), so flattening them batch-major would copy them."""
    if not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        logits, Y = logits.transpose(0, 1), Y.t()
    return logits.reshape(-1, logits.shape[-1]), Y.reshape(-1)


def evaluate(model: CharLM, corpus: Corpus) -> float | None:
    """Validation perplexity: every validation character predicted from the validation text
    before it, starting from a zero state at the last training character."""
    if not corpus.val_ids:
        return None
    return score_ids(model, corpus.train_ids[-1:] + corpus.val_ids).perplexity


def train(cfg: TrainConfig, log=None) -> TrainResult:
    from tqdm import tqdm

    main = distributed.is_main()
    log = (log or (lambda msg: tqdm.write(msg, file=sys.stderr))) if main else (lambda msg: None)
    if cfg.sampling not in ("random", "consecutive"):
        raise ValueError(f"sampling must be 'random' or 'consecutive', not {cfg.sampling!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {cfg.schedule!r}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {cfg.precision!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.num_steps < 1:
        raise ValueError("epochs, batch size and num steps must be positive")
    distributed.check_batch_size(cfg.batch_size)
    device = distributed.training_device(cfg.device)
    corpus = load_corpus(cfg.corpus, cfg.newlines, cfg.val_frac, cfg.max_chars)
    if cfg.sized:
        chosen: dict[str, Any] = {k: v for k, v in sized_regularisation(len(corpus.train_ids)).items()
                                  if k in cfg.sized}
        cfg = replace(cfg, **chosen)
        log(f"for {len(corpus.train_ids):,} training characters: "
            + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in chosen.items()) + " (an option given wins)")
    if num_batches(len(corpus.train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling) < 1:
        raise CorpusError(f"the training part ({len(corpus.train_ids)} characters) is too short for one batch "
                          f"of {cfg.batch_size} x {cfg.num_steps}: lower --batch-size or --num-steps")
    paths = paths_for(cfg.out)
    if main:
        remove_stale_temps(paths)

    model, optimizer, rng = setup(cfg, corpus, device)
    config = model.config
    start_epoch, best_val, best_epoch, history, seconds = 0, None, 0, [], 0.0
    if cfg.init_from and not cfg.resume:
        shared = initialise_from(model, corpus.vocab, cfg.init_from)
        log(f"starting from {cfg.init_from}: {shared['chars_shared']:,} characters shared, "
            f"{shared['chars_new']:,} new to it")
    if cfg.resume:
        start_epoch, best_val, best_epoch, seconds = load_resume_state(paths["resume"], model, optimizer, rng,
                                                                       cfg, corpus, device)
        history = [h for h in read_metrics(paths["metrics"]) if h["epoch"] <= start_epoch]
        log(f"resuming {paths['resume']} after epoch {start_epoch} of {cfg.epochs}")
    if main:
        write_metrics(paths["metrics"], history)
    net = distributed.wrap(model, device)

    prefixes = [p for p in cfg.prefixes if p and not corpus.vocab.unknown(p)]
    for p in set(cfg.prefixes) - set(prefixes):
        log(f"sample prefix {p!r} skipped: characters not in this corpus's vocabulary")
    log(f"training {cfg.cell} ({config.num_layers}x{config.hidden_size}, {model.num_parameters():,} parameters, "
        f"impl {model.impl}) on {device}: {len(corpus.train_ids):,} train / {len(corpus.val_ids):,} val characters, "
        f"vocabulary {len(corpus.vocab):,}")
    if net is not model:
        log(f"data-parallel: {distributed.world_size()} processes, {cfg.batch_size // distributed.world_size()} of "
            f"the {cfg.batch_size} rows of each batch per process")

    bar = tqdm(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs, desc="epochs",
               disable=not (cfg.progress and main), file=sys.stderr, dynamic_ncols=True)
    train_ppl = math.nan
    for epoch in bar:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(cfg, epoch)
        distributed.seed_dropout(cfg.seed, epoch)
        # inside the epoch: batches done, characters/s and the epoch's time left (a large corpus's epoch is minutes)
        batches = num_batches(len(corpus.train_ids), cfg.batch_size, cfg.num_steps, cfg.sampling)
        with tqdm(total=batches * cfg.batch_size * cfg.num_steps, desc=f"epoch {epoch + 1}", unit="char",
                  unit_scale=True, leave=False, disable=not (cfg.progress and main), file=sys.stderr,
                  dynamic_ncols=True, mininterval=0.5) as within:
            loss, grad_norm, n_chars = train_epoch(net, optimizer, corpus, cfg, rng, device, within)
        loss, n_chars = distributed.mean_over_ranks(loss, n_chars, device)
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        train_ppl = math.exp(min(loss, 700))
        number = epoch + 1
        evaluate_now = number % cfg.eval_every == 0 or number == cfg.epochs
        val_ppl = distributed.from_main(lambda: evaluate(model, corpus), device) if evaluate_now else None
        record = {"epoch": number, "train_perplexity": train_ppl, "val_perplexity": finite_or_none(val_ppl),
                  "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": grad_norm, "chars_per_sec": n_chars / elapsed, "seconds": elapsed}
        history.append(record)
        improved = evaluate_now and (not corpus.val_ids or best_val is None or
                                     (val_ppl is not None and val_ppl < best_val))
        if improved:
            best_val, best_epoch = val_ppl, number
            if main:
                save_checkpoint(paths["checkpoint"], model, corpus.vocab, cfg.newlines,
                                training_summary(cfg, corpus, history, best_val, best_epoch, seconds, device))
        # metrics first: a crash between the two leaves a metrics line past the resume state, which a resumed
        # run drops and writes again, never a resume state whose epoch has no metrics line
        if main:
            append_metrics(paths["metrics"], record)
            save_resume_state(paths["resume"], model, optimizer, rng, cfg, corpus, number, best_val, best_epoch,
                              seconds)
        bar.set_postfix(train_ppl=f"{train_ppl:.2f}", val_ppl=f"{val_ppl:.1f}" if val_ppl else "-",
                        chars_s=f"{n_chars / elapsed:,.0f}")
        if main and prefixes and cfg.sample_every and number % cfg.sample_every == 0:
            model.eval()
            for p in prefixes:
                text = generate(model, corpus.vocab, p, cfg.sample_chars)[0].text
                log(f"epoch {number} sample: {text!r}")
        if cfg.patience and best_val is not None and number - best_epoch >= cfg.patience * cfg.eval_every:
            log(f"early stop after epoch {number}: no better validation perplexity in {cfg.patience} evaluations "
                f"(best {best_val:.2f} at epoch {best_epoch})")
            break
    bar.close()
    if start_epoch >= cfg.epochs:
        log(f"nothing to do: {paths['resume']} already reached epoch {start_epoch} (raise --epochs to go on)")
        train_ppl = history[-1]["train_perplexity"] if history else math.nan
    if main:
        plot_curves(paths["curves"], history)
    return TrainResult(best_val_perplexity=best_val, best_epoch=best_epoch, final_train_perplexity=train_ppl,
                       epochs_run=len(history) - min(start_epoch, len(history)), history=history)


def training_summary(cfg: TrainConfig, corpus: Corpus, history: list[dict], best_val: float | None,
                     best_epoch: int, seconds: float, device: torch.device) -> dict:
    options = {k: v for k, v in asdict(cfg).items() if k not in ("command", "progress", "resume")}
    return {
        "command": cfg.command,
        "corpus_sha256": corpus.sha256,
        "corpus_chars": corpus.file_chars,
        "train_chars": len(corpus.train_ids),
        "val_chars": len(corpus.val_ids),
        "epochs": history[-1]["epoch"],
        "best_epoch": best_epoch,
        "train_perplexity": finite_or_none(history[-1]["train_perplexity"]),
        "val_perplexity": finite_or_none(best_val),
        "train_seconds": round(seconds, 2),
        "device": str(device),
        "torch_version": torch.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": options,
        # where the text came from (lyrics poetry-corpus) and the run this one started from: the whole recipe
        **({"corpus_source": source} if (source := source_record(cfg.corpus)) else {}),
        **({"init_from": read_metadata(cfg.init_from).get("training", {})} if cfg.init_from else {}),
    }
