"""Serving load test: the continuous-batching service against the tutorial's per-request baseline.

One run, all on loopback:
  1. trains a one-hot GRU (256 hidden, vocabulary of the whole corpus) for a few epochs with the
     project's own `training.train` into a temp dir (speed does not depend on its quality);
  2. measures the bare batched model step (input lookup + GRU cell + dense + argmax, no server)
     at the largest concurrency, before the servers and again after the service's load (the
     higher counts): the ceiling a server could reach;
  3. starts (a) bench/baseline_server.py (the tutorial's predict_rnn_pytorch behind FastAPI) and
     (b) `lyrics serve` on the same weights, each as a uvicorn subprocess on a free port;
  4. drives each with the same bounded load: `--requests` requests per level (50 and 200
     characters alternating, prefixes rotating) at each concurrency, greedy and sampled
     (temperature 0.8, top-p 0.9), and reports p50/p99 latency, requests/s, generated
     characters/s, errors and the service/baseline ratios;
  5. records start-up time and resident memory of the service with the bundled models.

    .venv/bin/python bench/serve_load.py --corpus ../shared/data/jaychou_lyrics.txt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model_store.checkpoint import load_checkpoint  # noqa: E402
from model_store.kernels import argmax  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

PREFIXES = ["分开", "不分开", "你说", "手中的铅笔", "窗外的麻雀", "我用几行字", "天青色等烟雨", "故事的小黄花"]
# every field explicit: the service's defaults (sampled, best of 8) are not what the baseline server does
MODES = {"greedy": {"temperature": 0},
         "sampled": {"temperature": 0.8, "top_p": 0.9, "no_repeat_ngram": 0, "no_blank_runs": False, "best_of": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(command: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, float]:
    """Start a server on a free loopback port; return it, its URL and the seconds until /readyz answered 200."""
    port = free_port()
    began = time.perf_counter()
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - began
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, by thread id."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def cpu_split(pid: int, before: dict[int, float], after: dict[int, float], client: float, wall: float) -> dict:
    """Cores used during a load: the server's main thread (its event loop), its other threads (busiest
    first: the scheduler and torch's OpenMP worker) and the load generator (this process)."""
    used = {tid: (after[tid] - before.get(tid, 0.0)) / wall for tid in after}
    others = sorted((c for tid, c in used.items() if tid != pid), reverse=True)
    return {"main": used.get(pid, 0.0), "others": [c for c in others if c >= 0.01], "client": client / wall}


async def drive(url: str, concurrency: int, requests: int, mode: dict, model: str | None, pid: int,
                chars: int | None = None) -> dict:
    """`requests` requests from `concurrency` clients; latency per request, totals over the wall time,
    and the cores the server's threads and the load generator used meanwhile (`cpu_split`).

    The load generator is aiohttp: httpx's async client saturated one of this machine's two cores at
    about 400 requests/s (against a bare ASGI app), which would have measured the client, not the server."""
    bodies = [{"prefix": PREFIXES[i % len(PREFIXES)], "max_chars": chars or (50, 200)[i % 2], **mode,
               **({"model": model, "seed": i} if model else {})} for i in range(requests)]
    latencies, chars, errors = [], 0, 0
    todo = iter(bodies)

    async def client(http: aiohttp.ClientSession):
        nonlocal chars, errors
        for body in todo:
            began = time.perf_counter()
            try:
                async with http.post(f"{url}/generate", json=body) as r:
                    r.raise_for_status()
                    chars += (await r.json())["usage"]["generated_chars"]
                latencies.append(time.perf_counter() - began)
            except aiohttp.ClientError:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.post(f"{url}/generate", json={**bodies[0], "max_chars": 5}) as r:  # warm-up
            r.raise_for_status()
        server_before, client_before = thread_cpu(pid), time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - began
        cpu = cpu_split(pid, server_before, thread_cpu(pid), time.process_time() - client_before, wall)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    server_cpu = (cpu["main"] + sum(cpu["others"])) * wall  # seconds, over the run
    return {"p50": q[49] * 1000, "p99": q[98] * 1000, "rps": len(latencies) / wall, "cps": chars / wall,
            "errors": errors, "n": requests, "cpu": cpu, "cpu_ms_per_request": server_cpu / requests * 1000,
            "client_ms_per_request": cpu["client"] * wall / requests * 1000}


def model_step_ceiling(path: Path, batch: int) -> float:
    """`bare_step` of the checkpoint as the service loads it, on the CPU."""
    return bare_step(load_checkpoint(path, "cpu", pack=True).model, batch)


def bare_step(model, batch: int, steps: int = 300, repeats: int = 5) -> float:
    """Characters/s of the bare batched step: lookup + cell + dense + argmax (the service's own, for greedy
    rows), no sampler, no server. The best of `repeats` timings of `steps` steps: one short timing on this
    VM moves by a fifth from one second to the next."""
    best = 0.0
    with torch.inference_mode():
        ids = torch.zeros(batch, dtype=torch.long, device=model.dense.weight.device)
        state = model.init_state(batch)
        for _ in range(20):
            logits, state = model.step(ids, state)
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(steps):
                logits, state = model.step(ids, state)  # the service's own step (model_store.batch.Batch)
                ids = argmax(logits)
            ids.tolist()  # waits for a GPU to finish
            best = max(best, batch * steps / (time.perf_counter() - began))
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="the shared lyrics corpus (read only)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, nargs="+", default=[32, 64, 256, 512],
                   help="requests per concurrency level (one number, or one per level)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in every process")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--chars", type=int, default=None,
                   help="characters per request (default: 50 and 200 alternating)")
    args = p.parse_args(argv)
    counts = args.requests if len(args.requests) > 1 else args.requests * len(args.concurrency)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    models = work / "models"
    ckpt = models / "gru.safetensors"

    began = time.perf_counter()
    train(TrainConfig(corpus=args.corpus, cell="gru", out=str(ckpt), hidden_size=256, embed_size=0,
                      epochs=args.epochs, newlines="space", seed=0, progress=False, sample_every=0),
          log=lambda _: None)
    for extra in models.glob("*.*"):
        if not extra.name.endswith(".safetensors"):
            extra.unlink()
    print(f"trained GRU 256, {args.epochs} epochs in {time.perf_counter() - began:.0f} s", flush=True)
    vocab = load_checkpoint(ckpt).config.vocab_size
    ceilings = [model_step_ceiling(ckpt, max(args.concurrency))]
    print(f"bare model step at batch {max(args.concurrency)}: {ceilings[0]:,.0f} chars/s", flush=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_")}
    env.update(BENCH_CHECKPOINT=str(ckpt), BENCH_TORCH_THREADS=str(args.threads), LYRICS_TORCH_THREADS=str(args.threads),
               LYRICS_LOG_LEVEL="warning", LYRICS_MAX_QUEUE=str(max(args.concurrency) * 8))
    uvicorn = [sys.executable, "-m", "uvicorn", "--no-access-log", "--log-level", "warning"]
    lyrics = [str(Path(sys.executable).parent / "lyrics"), "serve"]
    servers = {"baseline": [*uvicorn, "--app-dir", str(ROOT / "bench"), "--factory", "baseline_server:create_app"],
               "service": [*lyrics, "--model-dir", str(models), "--device", "cpu"]}
    results: dict = {}
    rss = {}
    for name, command in servers.items():
        process, url, _ = start(command, env, work / f"{name}.log")
        try:
            for mode in args.modes:
                for c, n in zip(args.concurrency, counts, strict=True):
                    r = asyncio.run(drive(url, c, n, MODES[mode], "gru" if name == "service" else None, process.pid,
                                          args.chars))
                    results[name, mode, c] = r
                    print(f"{name:8} {mode:7} c={c:<3} p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  "
                          f"{r['rps']:7.1f} req/s  {r['cps']:8.0f} chars/s  errors {r['errors']}  "
                          f"server CPU {r['cpu_ms_per_request']:.2f} ms/request", flush=True)
            rss[name] = rss_mib(process.pid)
        finally:
            stop(process)
        if name == "service":  # the ceiling again, right after the load it is compared with; the higher counts
            ceilings.append(model_step_ceiling(ckpt, max(args.concurrency)))
            print(f"bare model step at batch {max(args.concurrency)}, again: {ceilings[-1]:,.0f} chars/s", flush=True)

    bundled_env = {k: v for k, v in env.items() if k != "LYRICS_MAX_QUEUE"}
    process, url, startup = start(lyrics, bundled_env, work / "bundled.log")
    try:
        httpx.post(f"{url}/generate", json={"prefix": "分开"}, timeout=60).raise_for_status()
        bundled_rss = rss_mib(process.pid)
    finally:
        stop(process)

    print()
    print(report(args, results, ceilings, vocab, rss, startup, bundled_rss))


def report(args, results, ceilings, vocab, rss, startup, bundled_rss) -> str:
    ceiling = max(ceilings)
    lines = [f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
             f"torch {torch.__version__}, {args.threads} torch threads per process, GRU 256 one-hot, "
             f"vocabulary {vocab}, CPU.",
             f"Command: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', 'bench/serve_load.py', *sys.argv[1:]])}`",
             "",
             "| mode | conc. | requests | baseline p50 / p99 ms | service p50 / p99 ms | baseline chars/s | "
             "service chars/s | chars/s ratio | p50 ratio | service req/s | server CPU ms/request (b / s) | "
             "errors (b/s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (name, mode, c), s in results.items():
        if name != "service":
            continue
        b = results.get(("baseline", mode, c))
        if b is None:
            continue
        lines.append(f"| {mode} | {c} | {s['n']} | {b['p50']:.0f} / {b['p99']:.0f} | {s['p50']:.0f} / {s['p99']:.0f} | "
                     f"{b['cps']:,.0f} | {s['cps']:,.0f} | {s['cps'] / b['cps']:.1f}x | {s['p50'] / b['p50']:.2f} | "
                     f"{s['rps']:.1f} | {b['cpu_ms_per_request']:.2f} / {s['cpu_ms_per_request']:.2f} | "
                     f"{b['errors']} / {s['errors']} |")
    top = max(args.concurrency)
    lines += ["", f"Bare batched model step at batch {top} (same run, no server; best of 5 x 300 steps before the "
              f"servers and after the service's load: {' and '.join(f'{c:,.0f}' for c in ceilings)}): "
              f"{ceiling:,.0f} chars/s; the service "
              f"at concurrency {top}: " + ", ".join(f"{m} {results['service', m, top]['cps'] / ceiling:.0%}"
                                                     for m in args.modes if ('service', m, top) in results) + ".",
              "Cores in use at concurrency " + str(top) + " (of " + str(len(os.sched_getaffinity(0))) + "; the "
              "service's main thread runs its event loop, its busiest other threads are the scheduler and torch's "
              "OpenMP worker): " + "; ".join(
                  f"{m}: main {cpu['main']:.2f}, others {' + '.join(f'{c:.2f}' for c in cpu['others'])}, "
                  f"load generator {cpu['client']:.2f}"
                  for m in args.modes if ("service", m, top) in results
                  for cpu in [results["service", m, top]["cpu"]]) + ".",
              f"Resident memory after the load: baseline {rss.get('baseline', float('nan')):.0f} MiB, "
              f"service {rss.get('service', float('nan')):.0f} MiB.",
              f"Service with the bundled models: ready in {startup:.1f} s, {bundled_rss:.0f} MiB resident "
              f"after one request."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
