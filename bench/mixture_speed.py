"""What a mixture costs: generation and scoring speed of a recurrent model alone, with a cache,
and with the n-gram and the cache, all in one run on the same weights.

Generation runs `n` continuations of one prefix as one batch (what the engine does with `n`
concurrent requests) through model_store's `Generation`, greedy, so no sampling cost is
mixed in; scoring runs `score_ids` over the validation text. Reports characters per second
and each mixture's ratio to the recurrent model alone measured in the same run.

    python bench/mixture_speed.py --plain P.safetensors --cache C.safetensors --mixture M.safetensors \\
        --corpus ../shared/data/jaychou_lyrics.txt [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, if not installed

from model_store.checkpoint import load_checkpoint  # noqa: E402
from model_store.generate import generate  # noqa: E402
from model_store.scoring import score_ids  # noqa: E402
from training.corpus import load_corpus  # noqa: E402


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plain", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--mixture", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chars", type=int, default=100)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: load_checkpoint(path, pack=True) for name, path in  # as the service loads them
              (("recurrent alone", args.plain), ("+ cache", args.cache), ("+ n-gram + cache", args.mixture))}
    corpus = load_corpus(args.corpus, next(iter(models.values())).newlines)
    val = corpus.train_ids[-1:] + corpus.val_ids
    rows = []
    with torch.inference_mode():
        for name, ck in models.items():
            generate(ck.model, ck.vocab, "分开", 20, n=4)  # warm-up: first calls allocate and pick kernels
            row = {"model": name}
            for n in args.batches:
                seconds = best_of(args.repeats, lambda ck=ck, n=n: generate(ck.model, ck.vocab, "分开", args.chars, n=n))
                row[f"generate n={n}"] = n * args.chars / seconds
            row["score"] = (len(val) - 1) / best_of(args.repeats, lambda ck=ck: score_ids(ck.model, val))
            rows.append(row)
    keys = [k for k in rows[0] if k != "model"]
    print(f"torch threads {args.threads}; characters per second (ratio to the recurrent model alone)")
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        print(f"| {row['model']} | " + " | ".join(f"{row[k]:,.0f} ({row[k] / rows[0][k]:.2f}x)" for k in keys) + " |")


if __name__ == "__main__":
    main()
