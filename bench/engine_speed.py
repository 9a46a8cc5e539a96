"""The batching engine in process (no HTTP) against the bare model step it runs, by device and thread count.

For each device and each torch thread count: the bare batched step at `--concurrency` rows (the
service's own `model.step` + argmax, no sampler, no engine: bench/serve_load.py's ceiling), then
`--concurrency` concurrent generations of `--chars` characters through `app.engine.Engine`,
greedy and sampled (temperature 0.8, top-p 0.9), each the best of `--repeats` rounds. Reports
characters/s and the ratio engine / bare step from the same run. Where serve_load.py measures the
whole server on this CPU, this isolates the engine, and runs on a GPU too.

    .venv/bin/python bench/engine_speed.py --threads 1 2
    python bench/engine_speed.py --devices cuda cpu --threads 1 2 4 8 16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import PREFIXES, bare_step  # noqa: E402

from app.engine import Engine  # noqa: E402
from model_store.checkpoint import load_checkpoint  # noqa: E402
from model_store.generate import Generation  # noqa: E402
from model_store.registry import BUNDLED_DIR  # noqa: E402
from model_store.sampling import SamplingParams  # noqa: E402

MODES = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.8, top_p=0.9)}


def in_own_thread(fn, *args):
    """fn(*args) in a thread that exits afterwards, as the engine's scheduler threads do. A thread
    that ran torch on several threads keeps its OpenMP team, and with more team threads than cores
    libgomp stops spin-waiting: an engine measured after a bare step in this thread ran a quarter slower."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def bare_step_with_threads(model, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    return bare_step(model, batch, steps=200, repeats=3)


async def through_engine(engine: Engine, generations: list[Generation]) -> float:
    began = time.perf_counter()
    results = await asyncio.gather(*(engine.complete(g) for g in generations))
    return sum(len(c.generated) for r in results for c in r) / (time.perf_counter() - began)


def engine_speed(ck, threads: int, params: SamplingParams, concurrency: int, chars: int, repeats: int) -> float:
    engine = Engine(max_batch=concurrency, max_queue=concurrency, threads=threads)
    engine.start()
    prefixes = [p for p in PREFIXES if not ck.vocab.unknown(p)] or [ck.vocab.idx_to_char[0]]

    def load(n: int) -> list[Generation]:
        return [Generation(ck.model, ck.vocab, prefixes[i % len(prefixes)], chars, params, seed=i) for i in range(n)]

    try:
        asyncio.run(through_engine(engine, load(8)))  # warm-up
        return max(asyncio.run(through_engine(engine, load(concurrency))) for _ in range(repeats))
    finally:
        engine.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(BUNDLED_DIR / "gru.safetensors"))
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--threads", type=int, nargs="+", default=[len(os.sched_getaffinity(0))])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chars", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # this thread only loads and waits, as the service's threads do
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"{Path(args.checkpoint).name}, {os.cpu_count()} cores, torch {torch.__version__}, {name}; "
          f"{args.concurrency} concurrent generations of {args.chars} characters")
    print("| device | torch threads | bare step | greedy (ratio) | sampled (ratio) |")
    print("|---|---|---|---|---|")
    for device in args.devices:
        ck = load_checkpoint(args.checkpoint, device=device, pack=True)  # as the service loads it
        for threads in args.threads:
            ceiling = in_own_thread(bare_step_with_threads, ck.model, args.concurrency, threads)
            speeds = [engine_speed(ck, threads, params, args.concurrency, args.chars, args.repeats)
                      for params in MODES.values()]
            print(f"| {device} | {threads} | {ceiling:,.0f} | "
                  + " | ".join(f"{s:,.0f} ({s / ceiling:.2f})" for s in speeds) + " |", flush=True)


if __name__ == "__main__":
    main()
