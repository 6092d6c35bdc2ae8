"""Rank helpers: the few collectives a training worker needs, one process or many.

Every helper works without a process group too (rank 0 of 1), so unit tests
and the benchmarks drive a :class:`dragons.train.worker.Worker` without Ray.
Each is collective when there are several ranks: every rank must call it, in
the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """``values`` reduced over all ranks (in float64: sums of losses stay exact enough)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world()[1] > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
    return t.tolist()


def mean_all(value: float) -> float:
    """The mean of one number over all ranks."""
    return all_reduce([value])[0] / world()[1]


def gather(arr: np.ndarray) -> np.ndarray:
    """Every rank's ``arr``, concatenated in rank order (the same result on every rank)."""
    size = world()[1]
    if size == 1:
        return arr
    parts: list[Any] = [None] * size
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)
