"""Data parallel over torch.distributed: the same command on one process or N ranks.

Under ``torchrun --nproc_per_node N -m memlens label ...`` each rank takes every N-th batch
(whole batches, so every batch holds the same sequences as in a single-process run and
gives the same numbers); per-sequence results are gathered in their original order and
sums are all-reduced, so outputs equal a single-process run. Rank 0 writes the artifacts.
Outside torchrun every function here is the identity.

Example:
    >>> init()                                   # reads torchrun's RANK / WORLD_SIZE
    >>> mine = shard(seqs, batch_size=32)        # this rank's batches
    >>> scores = gather([f(s) for s in mine], len(seqs), batch_size=32)  # all, in order
    >>> all_reduce_sum(total)                    # in place, summed over ranks
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch

__all__ = ["active", "all_reduce_sum", "barrier", "device", "gather", "init", "is_main",
           "main_first", "mine", "only_main", "rank", "shard", "shutdown", "total", "world_size"]


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether this process is one rank of several."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(timeout_minutes: float = 60) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment):
    NCCL on GPUs, gloo on CPUs. Returns whether this process is one rank of several."""
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    if active():
        _dist().destroy_process_group()


def device(requested: str | None = None) -> str:
    """The device this rank computes on: ``requested``, or ``auto`` -> this rank's GPU
    (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if requested not in (None, "auto"):
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def mine(n_items: int, batch_size: int, of_rank: int | None = None) -> list[int]:
    """Indices of the items this rank (or ``of_rank``) handles: the whole batches ``b``
    with ``b % world_size == rank``, in order (all of them outside torchrun)."""
    size, r = world_size(), rank() if of_rank is None else of_rank
    return [i for b, start in enumerate(range(0, n_items, batch_size)) if b % size == r
            for i in range(start, min(start + batch_size, n_items))]


def shard(items: list, batch_size: int) -> list:
    """This rank's share of ``items`` (see :func:`mine`). Batching it again with the same
    ``batch_size`` gives exactly the batches a single process would have formed."""
    return items if world_size() == 1 else [items[i] for i in mine(len(items), batch_size)]


def gather(results: list, n_items: int, batch_size: int) -> list:
    """The per-item ``results`` of every rank's :func:`shard`, in the items' original order,
    on every rank."""
    size = world_size()
    if size == 1:
        return results
    parts = [None] * size
    _dist().all_gather_object(parts, results)
    out = [None] * n_items
    for r, part in enumerate(parts):
        indices = mine(n_items, batch_size, of_rank=r)
        if len(part) != len(indices):
            raise RuntimeError(f"rank {r} returned {len(part)} results for {len(indices)} items")
        for i, value in zip(indices, part, strict=True):
            out[i] = value
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it."""
    if world_size() == 1:
        return tensor
    dist = _dist()
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(device())
        dist.all_reduce(moved)
        tensor.copy_(moved)
    else:
        dist.all_reduce(tensor)
    return tensor


def total(value: float | int) -> float:
    """A Python number summed over ranks."""
    if world_size() == 1:
        return value
    return all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64)).item()


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. creating a directory every rank then reads);
    the others run it once rank 0 is through."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def only_main(context):
    """``context`` on rank 0 (a lock on the output, say); a no-op context elsewhere."""
    return context if is_main() else nullcontext()
