"""Data-parallel training: `lyrics train` under torchrun with two CPU processes (gloo).

Two processes with the global batch split between them must compute what one process
computes with the whole batch, rank 0 alone must write and log, and a run must resume
under torchrun. The small corpus is written here; torch runs one thread per process.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training import distributed
from training.batches import data_iter_consecutive, data_iter_random
from training.train import paths_for

LYRIC = ("分开的夜里 我唱着歌\n不分开的风 吹过山坡\nla la love you baby\n"
         "我想就这样陪你走到海边\n爱可不可以像星星一样明亮\n")
EPOCHS = 4
# the plain model, not the CLI's regularised defaults: one-hot input, no dropout, a constant rate, no early stop
PLAIN = ["--embed-size", "0", "--dropout", "0", "--weight-drop", "0", "--label-smoothing", "0", "--optimizer", "adam",
         "--weight-decay", "0", "--schedule", "constant", "--patience", "0"]


def train_command(corpus: Path, out: Path, epochs: int, processes: int = 1, resume: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "lyrics_cli", "train", "--corpus", str(corpus), "--cell", "rnn", "--out", str(out),
        "--hidden-size", "16", "--batch-size", "8", "--num-steps", "8", "--epochs", str(epochs), "--lr", "0.01",
        "--seed", "0", "--no-progress", "--sample-every", "2", "--device", "cpu", *PLAIN]
    return command + ["--resume"] if resume else command


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in paths_for(out)["metrics"].read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """One process for EPOCHS epochs; two processes for half of them, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("distributed")
    corpus = tmp / "lyrics.txt"
    corpus.write_text(LYRIC * 12, encoding="utf-8")
    single, double = tmp / "one" / "rnn.safetensors", tmp / "two" / "rnn.safetensors"
    run(train_command(corpus, single, EPOCHS))
    first = run(train_command(corpus, double, EPOCHS // 2, processes=2))
    first_metrics = metrics(double)
    resumed = run(train_command(corpus, double, EPOCHS, processes=2, resume=True))
    return SimpleNamespace(single=single, double=double, first=first, first_metrics=first_metrics, resumed=resumed)


@pytest.mark.slow
def test_two_processes_compute_what_one_computes_with_the_same_global_batch(runs):
    one, two = metrics(runs.single)[: EPOCHS // 2], runs.first_metrics
    assert [m["epoch"] for m in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("train_perplexity", "val_perplexity", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        # and between them they read each training character once: each did half the batch
        assert round(b["chars_per_sec"] * b["seconds"]) == round(a["chars_per_sec"] * a["seconds"])


@pytest.mark.slow
def test_a_run_resumed_under_torchrun_ends_with_the_single_process_weights(runs):
    assert f"resuming {paths_for(runs.double)['resume']} after epoch {EPOCHS // 2}" in runs.resumed.stderr
    a, b = load_file(paths_for(runs.single)["resume"]), load_file(paths_for(runs.double)["resume"])
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and sorted(model_keys) == sorted(k for k in b if k.startswith("model."))
    for key in model_keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    with safe_open(paths_for(runs.double)["resume"], framework="pt") as f:
        assert json.loads(f.metadata()["resume"])["epoch"] == EPOCHS


@pytest.mark.slow
def test_training_under_torchrun_converges(runs):
    history = metrics(runs.double)
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    train_ppl = [m["train_perplexity"] for m in history]
    val_ppl = [m["val_perplexity"] for m in history]
    assert train_ppl == sorted(train_ppl, reverse=True) and train_ppl[-1] < 0.5 * train_ppl[0]
    assert val_ppl[-1] < 0.5 * val_ppl[0]


@pytest.mark.slow
def test_only_rank_0_writes_files_and_logs(runs):
    # both ranks appending would double the metrics lines; both logging would double every line
    assert len(paths_for(runs.double)["metrics"].read_text().splitlines()) == EPOCHS
    assert sorted(p.name for p in runs.double.parent.iterdir()) == sorted(
        p.name for p in paths_for(runs.double).values())
    for done in (runs.first, runs.resumed):
        assert done.stdout.count("done: best validation perplexity") == 1
        assert done.stderr.count("training rnn (1x16") == 1
        assert done.stderr.count("data-parallel: 2 processes, 4 of the 8 rows of each batch per process") == 1
        # each launch ends on an even epoch (sample-every 2): one sample line per prefix
        assert done.stderr.count("sample: '分开") == 1 and done.stderr.count("sample: '不分开") == 1


@pytest.mark.slow
def test_every_rank_stops_early_after_the_same_epoch(tmp_path):
    # the validation part is shuffled text: its perplexity soon rises while training fits the lyric, and
    # --patience stops the run; a rank that went on alone would wait for the others until the timeout
    shuffled = list(LYRIC * 2)
    random.Random(1).shuffle(shuffled)
    corpus = tmp_path / "lyrics.txt"
    corpus.write_text(LYRIC * 12 + "".join(shuffled), encoding="utf-8")
    out = tmp_path / "rnn.safetensors"
    options = ["--val-frac", "0.15", "--patience", "1", "--hidden-size", "64", "--lr", "0.02"]
    done = run(train_command(corpus, out, 40, processes=2) + options)
    assert done.stderr.count("early stop after epoch") == 1
    stopped = len(metrics(out))
    assert 1 < stopped < 40 and f"early stop after epoch {stopped}:" in done.stderr


# The sharding and the single-process case, in this process ----------------------------------

CORPUS = list(range(1000, 1203))


def test_consecutive_sampling_gives_each_rank_the_same_streams_all_epoch():
    global_batches = list(data_iter_consecutive(CORPUS, 6, 5))
    for rank in range(3):
        mine = list(distributed.shard_rows(iter(global_batches), rank, 3))
        for (X, Y), (GX, GY) in zip(mine, global_batches, strict=True):
            assert X.equal(GX[2 * rank: 2 * rank + 2]) and Y.equal(GY[2 * rank: 2 * rank + 2])
        for (X, _), (X_next, _) in itertools.pairwise(mine):  # each row goes on where it left off: its state carries
            assert X_next[:, 0].equal(X[:, -1] + 1)


def test_random_sampling_gives_the_ranks_disjoint_rows_of_the_same_global_batch():
    global_batches = list(data_iter_random(CORPUS, 4, 5, random.Random(7)))
    shards = [list(distributed.shard_rows(data_iter_random(CORPUS, 4, 5, random.Random(7)), rank, 2))
              for rank in range(2)]
    for i, (GX, GY) in enumerate(global_batches):
        assert torch.cat([shards[0][i][0], shards[1][i][0]]).equal(GX)
        assert torch.cat([shards[0][i][1], shards[1][i][1]]).equal(GY)
        assert not set(shards[0][i][0][:, 0].tolist()) & set(shards[1][i][0][:, 0].tolist())


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused():
    distributed.check_batch_size(8, 2)
    with pytest.raises(ValueError, match="--batch-size 5 is the global batch .* among the 2 processes"):
        distributed.check_batch_size(5, 2)


def test_without_torchrun_a_process_is_rank_0_of_1_and_nothing_is_wrapped_or_sharded(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
    batches = list(data_iter_consecutive(CORPUS, 4, 5))
    assert all(X.equal(GX) for (X, _), (GX, _) in zip(distributed.shard_rows(iter(batches)), batches, strict=True))
    assert distributed.mean_over_ranks(2.5, 10, torch.device("cpu")) == (2.5, 10)
    assert distributed.from_main(lambda: 3.0, torch.device("cpu")) == 3.0
    with distributed.process_group("cpu"):
        assert not torch.distributed.is_initialized()
