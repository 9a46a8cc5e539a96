"""Held-out quality benchmark: the protocol of docs/quality.md, every number from one run.

For each newline policy (`keep`, `space`) on the corpus, split contiguously (first 90%
train, last 10% validation, vocabulary from the whole file), it measures validation
perplexity (every validation character, state carried through the validation text) of:

1. an interpolated modified Kneser-Ney character n-gram, orders 2..8 (model_store/ngram.py);
2. the tutorial's settings: GRU, 256 hidden, one-hot input, Adam 1e-2, 35 steps, batch 32,
   consecutive sampling, no effective clipping, 250 epochs: its best and its final epoch;
3. the project's defaults: `lyrics train --corpus C --cell lstm` and nothing else;
4. that model with a cache of the text (`lyrics mix --no-ngram`) and with the n-gram and
   the cache (`lyrics mix`), their weights fitted on a tuning model trained on the training
   part alone (`--max-chars <training characters>`), never on the validation text.

Every model is trained by the `lyrics` CLI with the command printed here. `--reuse` keeps a
checkpoint that already exists in --out-dir instead of training it again (its metadata
records the command that made it). Writes quality.json, quality_curves.png and samples to
--out-dir and prints the markdown tables of docs/quality.md.

    python bench/quality.py --corpus ../shared/data/jaychou_lyrics.txt --out-dir /tmp/quality [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, if not installed

from model_store.checkpoint import load_checkpoint, read_metadata  # noqa: E402
from model_store.generate import generate  # noqa: E402
from model_store.mixture import MixtureLM  # noqa: E402
from model_store.ngram import KneserNey  # noqa: E402
from model_store.sampling import SamplingParams  # noqa: E402
from model_store.scoring import score_ids  # noqa: E402
from training.corpus import load_corpus  # noqa: E402
from training.mix import fit_weights, target_probs  # noqa: E402

TUTORIAL = ["--cell", "gru", "--hidden-size", "256", "--embed-size", "0", "--no-tie-weights", "--dropout", "0",
            "--weight-drop", "0", "--label-smoothing", "0", "--optimizer", "adam", "--lr", "1e-2", "--weight-decay",
            "0", "--schedule", "constant", "--patience", "0", "--num-steps", "35", "--batch-size", "32", "--epochs",
            "250", "--sampling", "consecutive", "--clip", "0"]
PROJECT = ["--cell", "lstm"]
# one change each to the project's defaults (newlines kept): what each part of the recipe is worth
ABLATIONS = {"no label smoothing": ["--label-smoothing", "0"], "no weight drop": ["--weight-drop", "0"],
             "untied output layer": ["--no-tie-weights"], "constant learning rate": ["--schedule", "constant"]}
PREFIXES = ("分开", "不分开", "我想")
LYRICS = [sys.executable, "-m", "lyrics_cli"]


def run(argv: list[str], out: Path, reuse: bool) -> float:
    """Run one `lyrics` command unless --reuse finds its output; seconds taken (0 when reused)."""
    if reuse and out.is_file():
        print(f"reusing {out} (made by: {read_metadata(out)['training'].get('command')})", flush=True)
        return 0.0
    print("$ lyrics " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    subprocess.run(LYRICS + argv, check=True, cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - t0


def ngram_table(corpus_path: str, policy: str) -> dict[int, float]:
    corpus = load_corpus(corpus_path, policy)
    ids = corpus.train_ids + corpus.val_ids
    start = len(corpus.train_ids)
    table = {}
    for order in range(2, 9):
        model = KneserNey.fit(corpus.train_ids, order, len(corpus.vocab))
        table[order] = math.exp(-sum(model.log_probs(ids, start)) / len(corpus.val_ids))
    return table


def metrics(checkpoint: Path) -> list[dict]:
    path = checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def unseen_share(checkpoint: Path, corpus_path: str, policy: str) -> dict:
    """How a model treats validation characters that never occur in the training part."""
    ck, corpus = load_checkpoint(checkpoint), load_corpus(corpus_path, policy)
    seen = set(corpus.train_ids)
    nll = score_ids(ck.model, corpus.train_ids[-1:] + corpus.val_ids, per_char=True).nll
    unseen = [x for x, target in zip(nll, corpus.val_ids, strict=True) if target not in seen]
    return {"count": len(unseen), "mean_nll": sum(unseen) / len(unseen), "share_of_loss": sum(unseen) / sum(nll)}


def bucket_ablation(files: dict[str, Path], corpus_path: str, policy: str) -> dict:
    """The mixture with one weight triple for every position against one per cache bucket, both fitted
    on the tuning text as `lyrics mix` does."""
    mixture = load_checkpoint(files["mixture"]).model
    tuner, final = load_checkpoint(files["tune"]), load_checkpoint(files["project"])
    tune_corpus = load_corpus(corpus_path, policy, max_chars=len(load_corpus(corpus_path, policy).train_ids))
    corpus = load_corpus(corpus_path, policy)
    settings = mixture.mixture
    tune_model = MixtureLM(tuner.model, KneserNey.fit(tune_corpus.train_ids, mixture.ngram.order, len(tune_corpus.vocab)),
                           settings)
    tune_probs, tune_buckets = target_probs(tune_model, tune_corpus.train_ids[-1:] + tune_corpus.val_ids)
    val_probs, val_buckets = target_probs(MixtureLM(final.model, mixture.ngram, settings),
                                          corpus.train_ids[-1:] + corpus.val_ids)
    out = {}
    for name, n in (("one weight triple", 1), ("a triple per cache bucket", settings.cache_order + 1)):
        weights = fit_weights(tune_probs, tune_buckets.clamp(max=n - 1), n)
        out[name] = {"val": (weights[val_buckets.clamp(max=n - 1)] * val_probs.double()).sum(1).log().mean()
                     .neg().exp().item(), "weights": weights.tolist()}
    return out


def samples(checkpoint: Path) -> dict[str, list[str]]:
    ck = load_checkpoint(checkpoint)
    out = {}
    for prefix in PREFIXES:
        greedy = generate(ck.model, ck.vocab, prefix, 60)[0].text
        sampled = generate(ck.model, ck.vocab, prefix, 60, SamplingParams(temperature=0.8, top_p=0.9), seed=1)[0].text
        out[prefix] = [greedy, sampled]
    return out


def bench_policy(args, policy: str) -> dict:
    d, corpus = Path(args.out_dir), args.corpus
    train_chars = len(load_corpus(corpus, policy).train_ids)
    files = {name: d / f"{name}-{policy}.safetensors" for name in ("tutorial", "project", "tune", "cache", "mixture")}
    seconds = {
        "tutorial": run(["train", "--corpus", corpus, *TUTORIAL, "--newlines", policy, "--out", str(files["tutorial"]),
                         "--sample-every", "0", "--no-progress"], files["tutorial"], args.reuse),
        "project": run(["train", "--corpus", corpus, *PROJECT, "--newlines", policy, "--out", str(files["project"]),
                        "--no-progress"], files["project"], args.reuse),
        "tune": run(["train", "--corpus", corpus, *PROJECT, "--newlines", policy, "--max-chars", str(train_chars),
                     "--out", str(files["tune"]), "--no-progress"], files["tune"], args.reuse),
    }
    mix = ["mix", "--corpus", corpus, "--model", str(files["project"]), "--tune-model", str(files["tune"])]
    seconds["cache"] = run([*mix, "--no-ngram", "--out", str(files["cache"])], files["cache"], args.reuse)
    seconds["mixture"] = run([*mix, "--out", str(files["mixture"])], files["mixture"], args.reuse)

    tutorial = metrics(files["tutorial"])
    best = min((h for h in tutorial if h["val_perplexity"] is not None), key=lambda h: h["val_perplexity"])
    project = metrics(files["project"])
    training = {name: read_metadata(path)["training"] for name, path in files.items()}
    return {
        "ngram": ngram_table(corpus, policy),
        "tutorial": {"best": best["val_perplexity"], "best_epoch": best["epoch"],
                     "final": tutorial[-1]["val_perplexity"], "final_epoch": tutorial[-1]["epoch"],
                     "final_train": tutorial[-1]["train_perplexity"], "curve": tutorial},
        "project": {"val": training["project"]["val_perplexity"], "best_epoch": training["project"]["best_epoch"],
                    "epochs": training["project"]["epochs"], "train_seconds": training["project"]["train_seconds"],
                    "command": training["project"]["command"], "curve": project},
        "cache": {"val": training["cache"]["val_perplexity"], "detail": training["cache"]["mixture"]},
        "mixture": {"val": training["mixture"]["val_perplexity"], "detail": training["mixture"]["mixture"]},
        "samples": {name: samples(files[name]) for name in ("tutorial", "project", "mixture")},
        "unseen": {name: unseen_share(files[name], corpus, policy) for name in ("tutorial", "project", "cache",
                                                                                 "mixture")},
        "buckets": bucket_ablation(files, corpus, policy),
        "ablations": ablations(args, policy) if args.ablations and policy == "keep" else {},
        "seconds": seconds,
    }


def ablations(args, policy: str) -> dict:
    out = {}
    for name, change in ABLATIONS.items():
        path = Path(args.out_dir) / f"ablation-{change[0].strip('-')}-{policy}.safetensors"
        run(["train", "--corpus", args.corpus, *PROJECT, "--newlines", policy, *change, "--out", str(path),
             "--no-progress"], path, args.reuse)
        training = read_metadata(path)["training"]
        out[name] = {"val": training["val_perplexity"], "best_epoch": training["best_epoch"],
                     "command": training["command"]}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (policy, r) in zip(axes[0], results.items(), strict=True):
        for name, style in (("tutorial", "tab:red"), ("project", "tab:blue")):
            curve = r[name]["curve"]
            ax.plot([h["epoch"] for h in curve], [h["train_perplexity"] for h in curve], color=style, linestyle=":",
                    label=f"{name} train")
            ax.plot([h["epoch"] for h in curve], [h["val_perplexity"] for h in curve], color=style,
                    label=f"{name} validation")
        ax.axhline(min(r["ngram"].values()), color="gray", linestyle="--", label="Kneser-Ney (best order)")
        ax.axhline(r["cache"]["val"], color="tab:olive", linestyle="--", label="LSTM + cache")
        ax.axhline(r["mixture"]["val"], color="tab:green", linestyle="--", label="LSTM + n-gram + cache")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("perplexity")
        ax.set_title(f"newlines={policy}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tables(results: dict) -> str:
    lines = ["| model | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]

    def row(label, get):
        lines.append(f"| {label} | " + " | ".join(get(r) for r in results.values()) + " |")

    row("Kneser-Ney n-gram, best order", lambda r: "{1:.1f} (order {0})".format(*min(r["ngram"].items(),
                                                                                  key=lambda kv: kv[1])))
    row("tutorial settings, best epoch", lambda r: f"{r['tutorial']['best']:.1f} (epoch {r['tutorial']['best_epoch']})")
    row("tutorial settings, final epoch", lambda r: f"{r['tutorial']['final']:,.1f} (epoch {r['tutorial']['final_epoch']})")
    row("project defaults (static LSTM)", lambda r: f"{r['project']['val']:.1f} (epoch {r['project']['best_epoch']})")
    row("LSTM + cache of the text", lambda r: f"{r['cache']['val']:.1f}")
    row("LSTM + n-gram + cache (served mixture)", lambda r: f"{r['mixture']['val']:.1f}")
    for name, r in results.items():
        for label, a in r["ablations"].items():
            lines.append(f"| ablation ({name}): {label} | {a['val']:.1f} (epoch {a['best_epoch']}) |")
    orders = ["", "| order | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for order in range(2, 9):
        orders.append(f"| {order} | " + " | ".join(f"{r['ngram'][order]:.1f}" for r in results.values()) + " |")
    return "\n".join(lines + orders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--policies", nargs="+", default=["keep", "space"], choices=["keep", "space"])
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints already in --out-dir")
    parser.add_argument("--ablations", action="store_true", help="also train the recipe's ablations (newlines kept)")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    results = {policy: bench_policy(args, policy) for policy in args.policies}
    (Path(args.out_dir) / "quality.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
    plot(results, Path(args.out_dir) / "quality_curves.png")
    print(tables(results))


if __name__ == "__main__":
    main()
