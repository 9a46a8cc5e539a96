"""Where the service's time goes under load: py-spy samples of `lyrics serve` at concurrency 64.

Starts `lyrics serve` on one checkpoint (the bundled GRU by default), drives it as
bench/serve_load.py does (aiohttp clients, 50- and 200-character requests, greedy then sampled),
and while the load runs records two py-spy profiles of the server (`--rate` samples/s, the process
paused for each sample, which slows it by about a tenth): one of the thread holding the GIL
(`py-spy --gil`), one of every thread that is not idle. Prints, for the event loop (the main
thread) and the scheduler thread, the share of the wall time each holds the GIL and is busy, and
the functions (the innermost Python frame) those shares are spent in. A torch or C call shows as
the Python function that made it; the OpenMP worker thread is not Python and is not sampled.

    .venv/bin/python bench/serve_profile.py
    .venv/bin/python bench/serve_profile.py --out /tmp/profiles   # also keeps the raw profiles
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import MODES, drive, start, stop  # noqa: E402

ROLES = {"MainThread": "event loop", "lyrics-batch": "scheduler"}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: make install (it is a dev dependency)")
    return found


def record(pid: int, seconds: float, rate: int, gil: bool, out: Path) -> Path:
    subprocess.run([py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
                    "--format", "raw", "--output", str(out), "--threads", "--function", *(["--gil"] if gil else [])],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def shares(raw: Path, wall_samples: float) -> dict[str, Counter]:
    """Each thread's samples by innermost function, as shares of the wall time; threads by role."""
    by_thread: dict[str, Counter] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1]  # "thread (TID): NAME"
        role = next((r for prefix, r in ROLES.items() if name.startswith(prefix)), name)
        by_thread[role][frames[-1] if len(frames) > 1 else "(no Python frame)"] += int(count) / wall_samples
    return by_thread


def top(functions: Counter, n: int) -> str:
    return "; ".join(f"{f} {s:.1%}" for f, s in functions.most_common(n) if s >= 0.005)


def profile_mode(url: str, pid: int, mode: str, args, work: Path) -> str:
    body = MODES[mode]
    calm = asyncio.run(drive(url, args.concurrency, 1024, body, args.model, pid))  # warm-up, and unprofiled pace
    requests = int(calm["rps"] * (2 * args.seconds + 6))  # outlasts both recordings
    loaded = threading.Thread(target=lambda: asyncio.run(drive(url, args.concurrency, requests, body, args.model, pid)))
    loaded.start()
    time.sleep(1.0)
    wall = args.seconds * args.rate
    gil = shares(record(pid, args.seconds, args.rate, True, work / f"{mode}-gil.txt"), wall)
    busy = shares(record(pid, args.seconds, args.rate, False, work / f"{mode}-busy.txt"), wall)
    loaded.join()
    held = {role: sum(c.values()) for role, c in gil.items()}
    lines = [f"### {mode}: {calm['cps']:,.0f} characters/s, {calm['rps']:,.0f} requests/s unprofiled", "",
             "| thread | holds the GIL | busy (not idle) |", "|---|---|---|"]
    for role in ("event loop", "scheduler"):
        lines.append(f"| {role} | {held.get(role, 0):.0%} | {sum(busy[role].values()):.0%} |")
    others = sum(v for role, v in held.items() if role not in ("event loop", "scheduler"))
    lines += [f"| other threads | {others:.0%} | |", f"| none | {max(0.0, 1 - sum(held.values())):.0%} | |", ""]
    for role in ("event loop", "scheduler"):
        lines.append(f"* {role}, holding the GIL: {top(gil[role], args.top)}")
        lines.append(f"* {role}, busy: {top(busy[role], args.top)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "model_store" / "checkpoints" / "gru.safetensors"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=int, default=5, help="length of each recording")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=8, help="functions listed per thread")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", type=Path, help="keep the raw py-spy profiles here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serve_profile-"))
    models = work / "models"
    models.mkdir()
    shutil.copy(args.checkpoint, models)
    args.model = Path(args.checkpoint).stem
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_")}
    env.update(LYRICS_LOG_LEVEL="warning", LYRICS_MAX_QUEUE=str(args.concurrency * 8))
    process, url, _ = start([str(Path(sys.executable).parent / "lyrics"), "serve", "--model-dir", str(models),
                             "--device", "cpu"], env, work / "server.log")
    print(f"`lyrics serve` on {args.model}, {len(os.sched_getaffinity(0))} cores, concurrency {args.concurrency}; "
          f"py-spy {args.rate} samples/s for {args.seconds} s (--gil), then {args.seconds} s (busy threads)\n")
    try:
        for mode in args.modes:
            print(profile_mode(url, process.pid, mode, args, work), "\n", flush=True)
    finally:
        stop(process)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for raw in work.glob("*.txt"):
            shutil.copy(raw, args.out / raw.name)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
