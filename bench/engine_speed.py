"""The batching engine in process (no HTTP) against the bare model step it runs, by device and thread count.

For each device and each torch thread count: the bare batched step at `--concurrency` rows (the
service's own `model.step` + argmax, no sampler, no engine: bench/serve_load.py's ceiling), then
`--concurrency` concurrent generations of `--chars` characters through `app.engine.Engine`,
greedy and sampled (temperature 0.8, top-p 0.9), each the best of `--repeats` rounds. Reports
characters/s and the ratio engine / bare step from the same run. Where serve_load.py measures the
whole server on this CPU, this isolates the engine, and runs on a GPU too.

With `--http-rates`, the engine is measured again while other processes serve that many HTTP
requests a second beside it (bench/http_floor.py: a FastAPI endpoint with no model work, under an
open-loop load): what the cheapest HTTP front end, sharing the cores but not the GIL, leaves the
model. The ratios stay against the bare step timed with no load. With `--parts`, what one engine
step is made of instead: `model.step` alone, `Batch.step` greedy and sampled (the model step plus
choosing, pushing and marking the characters), and the prefill of one request, in microseconds.

    .venv/bin/python bench/engine_speed.py --threads 1 2
    .venv/bin/python bench/engine_speed.py --threads 2 --http-rates 0 700 1000 0 700 1000
    .venv/bin/python bench/engine_speed.py --threads 2 --parts   # also the lyric defaults' rules, one by one
    python bench/engine_speed.py --devices cuda cpu --threads 1 2 4 8 16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import PREFIXES, bare_step, start, stop, thread_cpu  # noqa: E402

from app.engine import Engine  # noqa: E402
from model_store.batch import Batch, prefill_rows  # noqa: E402
from model_store.checkpoint import load_checkpoint  # noqa: E402
from model_store.generate import Generation, Request  # noqa: E402
from model_store.registry import BUNDLED_DIR  # noqa: E402
from model_store.sampling import SamplingParams, decoding  # noqa: E402

HTTP_FLOOR = str(ROOT / "bench" / "http_floor.py")
MODES = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.8, top_p=0.9)}
# --parts also steps rows under the lyric defaults' per-row rules (one row per request), with and without the
# newest, so that its cost is measured against the same run
RULE_MODES = {"lyric rules": decoding(best_of=1), "lyric rules, min_line_chars off": decoding(best_of=1, min_line_chars=0)}


def in_own_thread(fn, *args):
    """fn(*args) in a thread that exits afterwards, as the engine's scheduler threads do. A thread
    that ran torch on several threads keeps its OpenMP team, and with more team threads than cores
    libgomp stops spin-waiting: an engine measured after a bare step in this thread ran a quarter slower."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def usable_prefixes(vocab) -> list[str]:
    """serve_load.py's prefixes that the vocabulary can read (its first character if none can)."""
    return [p for p in PREFIXES if not vocab.unknown(p)] or [vocab.idx_to_char[0]]


def bare_step_with_threads(model, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    return bare_step(model, batch, steps=200, repeats=3)


async def through_engine(engine: Engine, ck, requests: list[Request]) -> float:
    began = time.perf_counter()
    results = await asyncio.gather(*(engine.complete(ck, r) for r in requests))
    return sum(len(c.generated) for r in results for c in r) / (time.perf_counter() - began)


def engine_speed(ck, threads: int, params: SamplingParams, concurrency: int, chars: int, repeats: int) -> float:
    engine = Engine(max_batch=concurrency, max_queue=concurrency, threads=threads)
    engine.start()
    prefixes = usable_prefixes(ck.vocab)

    def load(n: int) -> list[Request]:
        return [Request(prefixes[i % len(prefixes)], chars, params, seed=i) for i in range(n)]

    try:
        asyncio.run(through_engine(engine, ck, load(8)))  # warm-up
        return max(asyncio.run(through_engine(engine, ck, load(concurrency))) for _ in range(repeats))
    finally:
        engine.stop()


class HttpBeside:
    """bench/http_floor.py's endpoint in a subprocess, loaded at a given rate by another subprocess."""

    def __init__(self, log: Path):
        self.server, self.url, _ = start([sys.executable, HTTP_FLOOR, "serve"], dict(os.environ), log)

    def load(self, rate: float, seconds: float) -> subprocess.Popen:
        driver = subprocess.Popen([sys.executable, HTTP_FLOOR, "drive", self.url, str(rate), str(seconds)],
                                  stdout=subprocess.PIPE, text=True)
        if driver.stdout.readline().strip() != "ready":
            raise RuntimeError("bench/http_floor.py drive did not start")
        self.cpu_before = sum(thread_cpu(self.server.pid).values())
        return driver

    def cost(self, driver: subprocess.Popen) -> tuple[float, float]:
        """Requests/s answered and the server's CPU milliseconds per request, once the driver is done."""
        answered, took = (float(x) for x in driver.communicate()[0].split())
        if driver.returncode:
            raise RuntimeError("bench/http_floor.py drive failed")
        return answered / took, 1000 * (sum(thread_cpu(self.server.pid).values()) - self.cpu_before) / answered


def best_time(fn, calls: int, repeats: int = 5) -> float:
    """The best of `repeats` timings of `calls` calls of fn, in microseconds per call."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - began) / calls)
    return best * 1e6


def step_parts(ck, batch: int, threads: int) -> dict[str, float]:
    """Microseconds of the parts of one engine step at `batch` rows, and of one request's prefill."""
    torch.set_num_threads(threads)
    prefixes = usable_prefixes(ck.vocab)
    parts = {}
    with torch.inference_mode():
        for mode, params in (MODES | RULE_MODES).items():
            generations = [Generation(ck.model, ck.vocab, Request(prefixes[0], 10**6, params, seed=i)) for i in range(batch)]
            rows = [row for g in generations for row in g.rows(owner=g)]
            stepped = Batch(ck.model, ck.vocab)
            stepped.add(rows, *prefill_rows(ck.model, generations))
            parts[f"Batch.step {mode}"] = best_time(stepped.step, 300)
        ids, state = torch.zeros(batch, dtype=torch.long), stepped.state
        parts["model.step"] = best_time(lambda: ck.model.step(ids, state), 300)

        def prefill_each():
            for prefix in prefixes:
                prefill_rows(ck.model, [Generation(ck.model, ck.vocab, Request(prefix, 50, MODES["greedy"]))])

        parts["prefill of one request"] = best_time(prefill_each, 40) / len(prefixes)
    return parts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(BUNDLED_DIR / "gru.safetensors"))
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--threads", type=int, nargs="+", default=[len(os.sched_getaffinity(0))])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chars", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--http-rates", type=float, nargs="+", default=[],
                   help="measure the engine again beside HTTP load of these requests/s (0: none), on the CPU")
    p.add_argument("--http-seconds", type=float, default=10.0, help="how long each HTTP load lasts")
    p.add_argument("--parts", action="store_true", help="time the parts of one engine step instead (CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # this thread only loads and waits, as the service's threads do
    if args.http_rates:
        return beside_http(args)
    if args.parts:
        ck = load_checkpoint(args.checkpoint, device="cpu", pack=True)
        for threads in args.threads:
            parts = in_own_thread(step_parts, ck, args.concurrency, threads)
            print(f"{threads} torch threads, batch {args.concurrency}: "
                  + ", ".join(f"{name} {us:,.0f} us" for name, us in parts.items()))
        return
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


def beside_http(args) -> None:
    """The engine on the CPU with each of `args.http_rates` requests/s of HTTP load in other processes."""
    ck = load_checkpoint(args.checkpoint, device="cpu", pack=True)
    print(f"{Path(args.checkpoint).name}, {os.cpu_count()} cores, torch {torch.__version__}; {args.concurrency} "
          f"concurrent generations of {args.chars} characters beside bench/http_floor.py's endpoint under load")
    with tempfile.TemporaryDirectory() as tmp:
        http = HttpBeside(Path(tmp) / "http_floor.log")
        try:
            for threads in args.threads:
                ceiling = in_own_thread(bare_step_with_threads, ck.model, args.concurrency, threads)
                print(f"\n{threads} torch threads, bare step with no load: {ceiling:,.0f} chars/s\n")
                print("| HTTP requests/s beside | its CPU ms/request | engine greedy (ratio) | engine sampled (ratio) |")
                print("|---|---|---|---|")
                for rate in args.http_rates:
                    driver = http.load(rate, args.http_seconds) if rate > 0 else None
                    time.sleep(0.5 if driver else 0.0)  # the load is running before the engine starts
                    speeds = [engine_speed(ck, threads, params, args.concurrency, args.chars, args.repeats)
                              for params in MODES.values()]
                    if driver is not None and driver.poll() is not None:
                        raise SystemExit("the HTTP load ended before the engine: raise --http-seconds")
                    served, cost = http.cost(driver) if driver else (0.0, 0.0)
                    print(f"| {served:,.0f} | {cost:.3f} | "
                          + " | ".join(f"{s:,.0f} ({s / ceiling:.2f})" for s in speeds) + " |", flush=True)
        finally:
            stop(http.server)


if __name__ == "__main__":
    main()
