"""Which torch thread count serves better: `lyrics serve` on the bundled models, paired runs.

Each round starts the server once per `--threads` value (LYRICS_TORCH_THREADS) and drives every
workload against it (`--models` x `--modes` x `--chars` x `--concurrency`, `--requests` each,
prefixes rotating, the same seeds), so the settings alternate in time and share the VM's noise.
Per workload it reports the median over rounds of characters/s, p50/p99 latency and the server's
CPU per request (process CPU time over the run / requests), and each setting's ratio against the
first. `--before DIR` adds another checkout of the project (for example the commit before a change),
served by this interpreter with the first `--threads` value, as the reference: a before/after table
measured on the same machine in the same run. `--variant NAME=VALUE` adds this checkout served with
the first `--threads` value and that environment variable (for example GOMP_SPINCOUNT=1000).

    .venv/bin/python bench/serve_threads.py --threads 2 1 --rounds 3
    git worktree add /tmp/before <commit> && .venv/bin/python bench/serve_threads.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import MODES, drive, start, stop  # noqa: E402


def workloads(args) -> list[tuple[str, str, int, int]]:
    return [(model, mode, chars, c) for model in args.models for mode in args.modes
            for chars in args.chars for c in args.concurrency]


def run_round(args, checkout: str | None, threads: int, variant: str, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_")}
    if variant:
        name, _, value = variant.partition("=")
        env[name] = value
    env.update(LYRICS_TORCH_THREADS=str(threads), LYRICS_LOG_LEVEL="warning",
               LYRICS_MAX_QUEUE=str(max(args.concurrency) * 8), LYRICS_MAX_NEW_CHARS=str(max(args.chars)))
    if checkout:
        root = Path(checkout).resolve()  # that checkout's packages first on the path, this interpreter's libraries
        env["PYTHONPATH"] = str(root)
        cli = "lyrics_cli" if (root / "lyrics_cli.py").exists() else "training.cli"  # where it was before
        # -P: the server starts in this checkout's root, whose packages must not come first on the path
        command = [sys.executable, "-P", "-c", f"import sys; from {cli} import main; sys.exit(main())", "serve",
                   "--model-dir", str(root / "model_store" / "checkpoints")]
    else:
        command = [str(Path(sys.executable).parent / "lyrics"), "serve"]
    process, url, _ = start(command, env, log)
    results = {}
    try:
        for model, mode, chars, c in workloads(args):
            r = asyncio.run(drive(url, c, args.requests, MODES[mode], model, process.pid, chars))
            results[model, mode, chars, c] = r
            print(f"{'before' if checkout else 'this'} threads {threads} {variant} {model:4} {mode:7} {chars:4} "
                  f"chars c={c:<3} {r['cps']:8.0f} chars/s  "
                  f"p50 {r['p50']:7.1f} p99 {r['p99']:7.1f} ms  CPU {r['cpu_ms_per_request']:6.2f} ms/request  "
                  f"errors {r['errors']}", flush=True)
    finally:
        stop(process)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="LYRICS_TORCH_THREADS values; the first "
                                                                           "is the reference of the ratios")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["gru", "lstm"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--chars", type=int, nargs="+", default=[50, 200])
    p.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    p.add_argument("--requests", type=int, default=256, help="requests per workload and round")
    p.add_argument("--before", metavar="DIR", help="another checkout of the project, served as the reference")
    p.add_argument("--variant", nargs="+", default=[], metavar="NAME=VALUE",
                   help="also serve this checkout with the first --threads value and this environment variable set")
    args = p.parse_args(argv)
    settings = ([("before", args.before, args.threads[0], "")] if args.before else []) + \
        [("this", None, t, "") for t in args.threads] + [("this", None, args.threads[0], v) for v in args.variant]
    work = Path(tempfile.mkdtemp(prefix="serve_threads-"))
    rounds: dict[tuple, list[dict]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            label, checkout, threads, variant = setting
            log = work / f"server-{label}-{threads}-{variant.replace('=', '-')}-{r}.log"
            rounds[setting].append(run_round(args, checkout, threads, variant, log))

    def median(setting: tuple, key: tuple, field: str) -> float:
        return statistics.median(run[key][field] for run in rounds[setting])

    reference = settings[0]
    print(f"\nCommand: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', 'bench/serve_threads.py', *sys.argv[1:]])}`"
          f"\nMachine: {len(os.sched_getaffinity(0))} cores; medians of {args.rounds} paired rounds, "
          f"{args.requests} requests per workload and round.\n")
    print("| model | mode | chars | clients | server, torch threads | chars/s | ratio | p50 / p99 ms "
          "| server CPU ms/request | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors = 0
    for key in workloads(args):
        base = median(reference, key, "cps")
        for setting in settings:
            cps = median(setting, key, "cps")
            failed = sum(run[key]["errors"] for run in rounds[setting])
            errors += failed
            label = ", ".join(str(part) for part in setting if part and part != args.before)
            print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {label} | {cps:,.0f} | "
                  f"{cps / base:.2f} | {median(setting, key, 'p50'):.0f} / {median(setting, key, 'p99'):.0f} | "
                  f"{median(setting, key, 'cpu_ms_per_request'):.2f} | {failed} |")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
