"""Data-parallel training under `torchrun`: process group, ranks, batch sharding.

`lyrics train` run by `torchrun --nproc_per_node N` (environment RANK, WORLD_SIZE,
LOCAL_RANK) joins a process group (NCCL on CUDA, gloo on a CPU), wraps the model in
torch's DistributedDataParallel, which averages the gradients over the ranks during
backward, and gives each rank its own rows of every global batch. Run any other way,
every function here is the single-process case: rank 0 of 1, no wrapping, no sharding.

`--batch-size` stays the global batch B; each of the N ranks computes B / N of its rows.
Rank r owns rows r*B/N ... (r+1)*B/N - 1 of every batch (B = 4, N = 2)::

    global batch   row 0  [a b c]  rank 0      consecutive sampling: row i of every batch
                   row 1  [g h i]  rank 0      continues row i of the last one, so a rank
                   row 2  [m n o]  rank 1      owns the same streams all epoch and carries
                   row 3  [s t u]  rank 1      their state itself
                                               random sampling: every rank shuffles with the
                                               same seed, so the ranks' rows are disjoint
                                               examples of one global batch

Each rank's loss is the mean over its B/N rows; DDP averages the ranks' gradients, which
is the mean over all B rows: the gradient one process computes with batch B. Clipping
after backward sees the averaged gradients, so every rank clips and steps alike and the
weights stay identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model_store.registry import resolve_device
from training.batches import Batch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and shows progress."""
    return rank() == 0


def training_device(device: str) -> torch.device:
    """`--device` resolved; under torchrun a CUDA device is this node's GPU number LOCAL_RANK."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return resolved


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Under torchrun, be a member of the process group for the duration; otherwise do nothing.
    torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) says where to meet."""
    if not launched_by_torchrun():
        yield
        return
    resolved = training_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield
        # leave together: a rank that tore the group down while rank 0 still wrote its files could abort
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_batch_size(batch_size: int, ranks: int | None = None) -> None:
    ranks = world_size() if ranks is None else ranks
    if batch_size % ranks:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must divide evenly among the "
                         f"{ranks} processes: use a multiple of {ranks}")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel when there are several ranks, else the model itself.
    Wrapping copies rank 0's weights to every rank."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_rows(batches: Iterator[Batch], rank_: int | None = None, ranks: int | None = None) -> Iterator[Batch]:
    """This rank's rows of every global batch (see the picture above)."""
    rank_ = rank() if rank_ is None else rank_
    ranks = world_size() if ranks is None else ranks
    for X, Y in batches:
        yield X.chunk(ranks)[rank_], Y.chunk(ranks)[rank_]


def seed_dropout(seed: int, epoch: int) -> None:
    """Ranks other than 0 start every epoch from their own torch random stream, derived from
    (seed, rank, epoch), so their dropout masks differ from rank 0's and a resumed run draws
    the same ones as an uninterrupted run. Rank 0 keeps the stream a single process uses
    (the one the resume state saves). A no-op for a single process."""
    if rank() > 0:
        torch.manual_seed(random.Random(f"dropout {seed} {rank()} {epoch}").getrandbits(63))


def mean_over_ranks(mean: float, count: int, device: torch.device) -> tuple[float, int]:
    """The mean over all ranks of a per-rank mean over `count` items, and the total count;
    the same on every rank."""
    if world_size() == 1:
        return mean, count
    totals = torch.tensor([mean * count, count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    total, count = totals.tolist()
    return total / count, int(count)


def from_main(compute: Callable[[], float | None], device: torch.device) -> float | None:
    """`compute()` run on rank 0 alone, its result given to every rank, so that every rank takes
    the same decisions from it (best epoch, stopping)."""
    if world_size() == 1:
        return compute()
    value = compute() if is_main() else None
    message = torch.tensor([value is None, math.nan if value is None else value], dtype=torch.float64,
                           device=device)
    dist.broadcast(message, src=0)
    missing, value = message.tolist()
    return None if missing else value
