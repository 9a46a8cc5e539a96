"""Training speed of `lyrics train`'s default recipe: characters/s and its share of the matmul peak.

The recipe (training.train.RECIPE: LSTM 256 wide with a tied 256-wide embedding, dropout and weight
drop 0.5, label smoothing 0.1, AdamW, 70 steps, batch 32; what `lyrics train --cell lstm` runs on a
lyric-sized corpus) on the whole corpus, through the project's own loop (training.train.setup and
train_epoch), against a baseline measured in the same run. Each round trains every setting in its
own process, one after the other, so that the settings share the VM's drifts; the report gives
the median over rounds and each setting's ratio against the baseline.

* baseline `torch` (the default): the same model on torch's nn.LSTM (impl fused). nn.LSTM cannot
  drop its recurrent weights, so this runs without weight drop: the path the recipe's LSTM took
  before it ran on the project's kernels.
* `--before DIR`: another checkout of the project (for example the commit before a change), its
  recipe run by this interpreter, as the baseline instead. Build its kernels first
  (`python setup.py build_ext --inplace` in DIR), or it runs on the torch fallback (reported).

Useful FLOPs per character (E embedding, H hidden, V vocabulary): forward 2*E*4H (input product)
+ 2*H*4H (recurrent) + 2*H*V (output layer); training 3x forward. The share of the peak is set
against the best 2048 x 2048 float32 product measured before and after the rounds
(bench/train_speed.py's matmul_peak).

    .venv/bin/python bench/recipe_speed.py --corpus ../shared/data/jaychou_lyrics.txt
    git worktree add /tmp/before <commit> && (cd /tmp/before && "$OLDPWD"/.venv/bin/python setup.py build_ext \\
        --inplace) && .venv/bin/python bench/recipe_speed.py --corpus ... --before /tmp/before
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
HIDDEN = EMBED = 256
GATES = 4  # an LSTM's gate blocks


def worker(spec: dict) -> dict:
    """One setting's run, in this process: `epochs` epochs of the recipe, the first left out as warm-up."""
    import torch

    from model_store import kernels
    from training.corpus import load_corpus
    from training.train import RECIPE, TrainConfig, setup, train_epoch

    options = {k: v for k, v in RECIPE.items() if k not in ("embed_size", "tie_weights", "epochs", "patience")}
    if spec["impl"] == "fused":
        options["weight_drop"] = 0.0  # nn.LSTM takes its weights as they are
    cfg = TrainConfig(corpus=spec["corpus"], cell="lstm", out="unused", impl=spec["impl"], hidden_size=HIDDEN,
                      embed_size=EMBED, tie_weights=True, epochs=spec["epochs"], device="cpu", progress=False,
                      **options)
    corpus = load_corpus(cfg.corpus, cfg.newlines, cfg.val_frac, cfg.max_chars)
    device = torch.device("cpu")
    model, optimizer, rng = setup(cfg, corpus, device)
    seconds, chars, losses = [], [], []
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        loss, _, n_chars = train_epoch(model, optimizer, corpus, cfg, rng, device)
        seconds.append(time.perf_counter() - t0)
        chars.append(n_chars)
        losses.append(loss)
    timed = slice(1, None) if cfg.epochs > 1 else slice(None)
    return {"chars_per_sec": sum(chars[timed]) / sum(seconds[timed]), "vocab": len(corpus.vocab),
            "train_perplexity": math.exp(min(losses[-1], 700)), "kernels": bool(kernels.ENABLED),
            "threads": torch.get_num_threads()}


def run_setting(name: str, checkout: Path, impl: str, args) -> dict:
    spec = {"corpus": str(Path(args.corpus).resolve()), "impl": impl, "epochs": args.epochs}
    env = dict(os.environ, PYTHONPATH=str(checkout))
    # -P: the checkout's packages come from PYTHONPATH, not from wherever this script lies
    out = subprocess.run([sys.executable, "-P", str(HERE), "--worker", json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"{name}: {result['chars_per_sec']:,.0f} chars/s, train perplexity {result['train_perplexity']:.1f}"
          f"{'' if result['kernels'] else ' (kernels off: torch fallback)'}", flush=True)
    return result


def useful_flops_per_char(vocab: int) -> float:
    return 3 * (2 * EMBED * GATES * HIDDEN + 2 * HIDDEN * GATES * HIDDEN + 2 * HIDDEN * vocab)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="the lyrics corpus (UTF-8 text)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setting and round, the first as warm-up")
    parser.add_argument("--before", metavar="DIR", help="another checkout, its recipe as the baseline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not args.corpus:
        parser.error("--corpus is required")
    sys.path.insert(0, str(HERE.parent))  # train_speed's matmul_peak
    sys.path.insert(1, str(HERE.parent.parent))
    from train_speed import busy_warnings, cpu_model, matmul_peak

    this = HERE.parent.parent
    settings = {"baseline: before": (Path(args.before).resolve(), "scratch")} if args.before else \
        {"baseline: torch nn.LSTM, no weight drop": (this, "fused")}
    settings["the recipe"] = (this, "scratch")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()[0]
    peak_before = matmul_peak()
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds}", flush=True)
        for name, (checkout, impl) in settings.items():
            runs[name].append(run_setting(name, checkout, impl, args))
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    baseline = statistics.median(r["chars_per_sec"] for r in next(iter(runs.values())))
    print(f"\nMachine: {cpu_model()}, torch threads {runs['the recipe'][0]['threads']}, {started}; matmul peak "
          f"{peak_before / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s before / after; {args.rounds} rounds of "
          f"{args.epochs} epochs (the first as warm-up); medians.")
    for warning in busy_warnings(load_before, peak_before, peak_after):
        print(f"Warning: the machine looked busy: {warning}")
    print("\n| setting | chars/s | ratio | useful GFLOP/s | % of matmul peak | train ppl (last epoch) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        cps = statistics.median(r["chars_per_sec"] for r in results)
        flops = cps * useful_flops_per_char(results[0]["vocab"])
        ppl = statistics.median(r["train_perplexity"] for r in results)
        print(f"| {name} | {cps:,.0f} | {cps / baseline:.2f}x | {flops / 1e9:.1f} | {100 * flops / peak:.1f}% "
              f"| {ppl:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
