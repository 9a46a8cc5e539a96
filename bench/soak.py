"""Soak: `lyrics serve` on the bundled models under steady load for minutes; memory, errors and p99 over time.

32 clients send 50-character requests (greedy and sampled alternating, prefixes rotating) for
`--minutes`; every `--every` seconds the server's resident memory and that window's p50/p99
and error count are printed. The verdict compares resident memory at the end with that after
the first window (warm-up): flat within 5%, no errors, p99 stable. On demand, not in CI:

    .venv/bin/python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PREFIXES, rss_mib, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "best_of": 1}]


async def soak(url: str, pid: int, minutes: float, every: float, clients: int, chars: int) -> list[dict]:
    windows: list[dict] = []
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + minutes * 60
    counter = 0

    async def client(http: aiohttp.ClientSession):
        nonlocal errors, counter
        while time.monotonic() < end:
            counter += 1
            body = {"prefix": PREFIXES[counter % len(PREFIXES)], "max_chars": chars, "model": "gru",
                    **MODES[counter % 2]}
            began = time.perf_counter()
            try:
                async with http.post(f"{url}/generate", json=body) as r:
                    r.raise_for_status()
                    await r.read()
                latencies.append(time.perf_counter() - began)
            except aiohttp.ClientError:
                errors += 1

    async def watch():
        nonlocal latencies, errors
        while time.monotonic() < end:
            await asyncio.sleep(every)
            done, latencies = latencies, []
            failed, errors = errors, 0
            q = statistics.quantiles(done, n=100, method="inclusive") if len(done) > 1 else [0.0] * 99
            window = {"t": len(windows) * every + every, "requests": len(done), "errors": failed,
                      "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "rss_mib": rss_mib(pid)}
            windows.append(window)
            print(f"t={window['t']:5.0f} s  {window['requests']:5d} requests  errors {failed}  "
                  f"p50 {window['p50_ms']:6.1f} ms  p99 {window['p99_ms']:6.1f} ms  rss {window['rss_mib']:.0f} MiB",
                  flush=True)

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(watch(), *(client(http) for _ in range(clients)))
    return windows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=30.0, help="seconds per reported window")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--chars", type=int, default=50)
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_")}
    env.update(LYRICS_LOG_LEVEL="warning", LYRICS_MAX_QUEUE=str(args.clients * 8))
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    process, url, _ = start([str(Path(sys.executable).parent / "lyrics"), "serve"], env, log)
    try:
        windows = asyncio.run(soak(url, process.pid, args.minutes, args.every, args.clients, args.chars))
    finally:
        stop(process)
    warm, last = windows[0], windows[-1]
    growth = last["rss_mib"] / warm["rss_mib"] - 1
    p99s = [w["p99_ms"] for w in windows[1:]] or [warm["p99_ms"]]
    errors = sum(w["errors"] for w in windows)
    print(f"\n{sum(w['requests'] for w in windows)} requests in {args.minutes:g} min, {errors} errors; resident memory "
          f"{warm['rss_mib']:.0f} MiB after warm-up, {last['rss_mib']:.0f} MiB at the end ({growth:+.1%}); p99 after "
          f"warm-up {min(p99s):.0f}-{max(p99s):.0f} ms (median {statistics.median(p99s):.0f})")
    return 0 if errors == 0 and abs(growth) <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
