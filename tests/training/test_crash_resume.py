"""Crash safety: `lyrics train` killed with SIGKILL at several points, then resumed with `--resume`.

After every kill the files on disk must be usable (the checkpoint loads, the resume state is a
whole safetensors file, no temp file is where a loader would look), and the run resumed to the
end must hold, bit for bit, the weights of a run never interrupted (CPU, fixed seed, one thread).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model_store.checkpoint import load_checkpoint
from model_store.registry import checkpoint_paths
from training.train import paths_for

LYRIC = ("分开的夜里 我唱着歌\n不分开的风 吹过山坡\nla la love you baby\n"
         "我想就这样陪你走到海边\n爱可不可以像星星一样明亮\n")
EPOCHS = 8
KILL_SEED = 20240611


def train_command(corpus: Path, out: Path, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "lyrics_cli", "train", "--corpus", str(corpus), "--cell", "rnn",
               "--out", str(out), "--hidden-size", "16", "--batch-size", "4", "--num-steps", "8",
               "--epochs", str(EPOCHS), "--lr", "0.01", "--seed", "0", "--no-progress", "--sample-every", "0",
               "--device", "cpu"]
    return command + ["--resume"] if resume else command


def env() -> dict[str, str]:
    # one thread: the same reduction order in every run, so equal inputs give equal bits
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def resume_epoch(path: Path) -> int | None:
    """The epoch the resume state holds; None when there is none. Fails if the file is not whole."""
    if not path.exists():
        return None
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = json.loads(f.metadata()["resume"])
        for key in f.keys():
            f.get_tensor(key)
    return meta["epoch"]


def check_files(out: Path) -> dict:
    """What a crash may leave: whole files, temp files only under dot names that no loader picks up."""
    paths = paths_for(out)
    state = {"checkpoint": None, "resume_epoch": resume_epoch(paths["resume"]), "temps": []}
    if paths["checkpoint"].exists():
        ck = load_checkpoint(paths["checkpoint"])
        state["checkpoint"] = ck.training["epochs"]
    for f in out.parent.iterdir():
        if f.name.startswith("."):
            state["temps"].append(f.name)
        else:
            assert f in paths.values(), f"unexpected file {f.name}"
    assert checkpoint_paths(out.parent) == ([paths["checkpoint"]] if paths["checkpoint"].exists() else [])
    return state


def kill_when(process: subprocess.Popen, out: Path, condition, timeout: float = 60.0) -> str:
    """Poll until condition(out) holds, then SIGKILL; returns what happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"finished before the kill (rc {process.returncode})"
        try:
            fired = condition(out)
        except Exception:  # a file caught between rename and read: poll again
            fired = False
        if fired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return "killed"
        time.sleep(0.002)
    process.kill()
    process.wait()
    raise AssertionError("kill condition never held")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path):
    corpus = tmp_path / "lyrics.txt"
    corpus.write_text(LYRIC * 150, encoding="utf-8")
    rng = random.Random(KILL_SEED)

    baseline = tmp_path / "baseline" / "rnn.safetensors"
    done = subprocess.run(train_command(corpus, baseline), env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "crashed" / "rnn.safetensors"
    paths = paths_for(out)
    delay = rng.uniform(0.0, 0.15)
    # 1: mid-run, after a checkpoint exists, a random moment into a later epoch
    # 2: as soon as a temp file shows up (inside an atomic write), else at the next epoch
    # 3: a random moment after start (start-up, or anywhere in training)
    started: dict[str, float] = {}

    def mid_run(o: Path) -> bool:  # 1: a checkpoint exists, a random moment into a later epoch
        if (resume_epoch(paths["resume"]) or 0) < 2:
            return False
        return time.monotonic() - started.setdefault("seen", time.monotonic()) >= delay

    def in_a_write(o: Path) -> bool:  # 2: a temp file seen (inside an atomic write), else the next epoch's end
        if any(name.startswith(".") for name in os.listdir(o.parent)):
            return True
        epoch = resume_epoch(paths["resume"]) or 0
        return epoch > started.setdefault("epoch", epoch)

    after = rng.uniform(2.0, 4.0)

    def at_random(o: Path) -> bool:  # 3: a random moment after start (start-up, or anywhere in training)
        return time.monotonic() - started["start"] >= after

    plans = [(f"epoch >= 2 done, then {delay:.3f} s", mid_run), ("inside a write, or the next epoch", in_a_write),
             (f"{after:.2f} s after start", at_random)]
    observations = []
    for name, condition in plans:
        resume = paths["resume"].exists()
        started.clear()
        started["start"] = time.monotonic()
        process = subprocess.Popen(train_command(corpus, out, resume), env=env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        outcome = kill_when(process, out, condition)
        state = check_files(out)
        observations.append((name, outcome, state))
        for temp in state["temps"]:
            assert temp.endswith((".tmp", ".tmp.png")), temp
    print("\n".join(f"kill {i + 1} ({name}): {outcome}; on disk {state}"
                    for i, (name, outcome, state) in enumerate(observations)))
    assert observations[0][1] == "killed" and observations[0][2]["checkpoint"] is not None

    done = subprocess.run(train_command(corpus, out, resume=paths["resume"].exists()), env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert check_files(out)["temps"] == []  # a new run removes what killed writes left

    expected, got = paths_for(baseline), paths
    assert resume_epoch(got["resume"]) == resume_epoch(expected["resume"]) == EPOCHS
    a, b = load_file(expected["resume"]), load_file(got["resume"])
    model_keys = sorted(k for k in a if k.startswith("model."))
    assert model_keys and sorted(a) == sorted(b)
    for key in a:  # weights, Adam moments and step, RNG state: all bit for bit
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        assert a[key].view(-1).view(torch.uint8).equal(b[key].view(-1).view(torch.uint8)), key
    ca, cb = load_checkpoint(expected["checkpoint"]), load_checkpoint(got["checkpoint"])
    for (ka, ta), (kb, tb) in zip(ca.model.state_dict().items(), cb.model.state_dict().items(), strict=True):
        assert ka == kb and ta.equal(tb), ka
    assert ca.training["best_epoch"] == cb.training["best_epoch"]

    timing = ("seconds", "chars_per_sec")
    ma = [{k: v for k, v in json.loads(line).items() if k not in timing}
          for line in expected["metrics"].read_text().splitlines()]
    mb = [{k: v for k, v in json.loads(line).items() if k not in timing}
          for line in got["metrics"].read_text().splitlines()]
    assert mb == ma and [m["epoch"] for m in mb] == list(range(1, EPOCHS + 1))
