"""Training throughput of one process against N data-parallel processes (torchrun, gloo).

Runs `lyrics train` with the same options and global batch as 1 process with N torch
threads, as 1 process with 1 thread, and as N processes (`torchrun --standalone
--nproc_per_node N`) with 1 thread each, in turn for --rounds rounds so that drifting load
on a shared machine hits all alike. Reports training characters per second (from
NAME.metrics.jsonl: training batches only, validation left out; the first epoch left out as
warm-up), the median over epochs, per round and configuration, and the machine's load
average before each run.

    python bench/train_scaling.py --corpus ../shared/data/jaychou_lyrics.txt [--processes 2]
        [--rounds 2] [-- lyrics train options, in place of DEFAULT_OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the bundled models' size without regularisation (the plain model measured in docs/scaling.md)
DEFAULT_OPTIONS = ["--cell", "gru", "--hidden-size", "256", "--embed-size", "64", "--batch-size", "32",
                   "--num-steps", "35", "--epochs", "3", "--seed", "0", "--dropout", "0", "--weight-drop", "0",
                   "--label-smoothing", "0", "--optimizer", "adam", "--weight-decay", "0", "--schedule", "constant",
                   "--patience", "0"]


def command(corpus: str, out: Path, processes: int, threads: int, options: list[str]) -> tuple[list[str], dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    argv = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "lyrics_cli", "train", "--corpus", corpus, "--out", str(out), "--device", "cpu",
        "--no-progress", "--sample-every", "0", *options]
    return argv, {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def chars_per_second(corpus: str, out: Path, processes: int, threads: int, options: list[str]) -> float:
    argv, env = command(corpus, out, processes, threads, options)
    print(f"# load average {os.getloadavg()[0]:.1f}\n$ OMP_NUM_THREADS={threads}", " ".join(argv), flush=True)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics_file = out.with_name(out.name.removesuffix(".safetensors") + ".metrics.jsonl")
    speeds = [json.loads(line)["chars_per_sec"] for line in metrics_file.read_text().splitlines()]
    return statistics.median(speeds[1:] or speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("options", nargs="*", help="lyrics train options (default: %(default)s)",
                        default=DEFAULT_OPTIONS)
    args = parser.parse_args()
    n = args.processes
    configurations = [(1, n), (1, 1), (n, 1)]  # (processes, threads per process)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            speeds = [chars_per_second(args.corpus, Path(tmp, f"r{round_}p{p}t{t}.safetensors"), p, t, args.options)
                      for p, t in configurations]
            rows.append((round_, speeds))
    print("\nround | " + " | ".join(f"{p} process(es) x {t} thread(s)" for p, t in configurations)
          + f" | ratio {n} processes / 1 process x {n} threads")
    for round_, speeds in rows:
        print(f"{round_} | " + " | ".join(f"{s:,.0f} chars/s" for s in speeds) + f" | {speeds[2] / speeds[0]:.2f}")


if __name__ == "__main__":
    main()
