"""Rank helpers shared by the rollout stages, evaluation and the training step.

Every function works without a process group (one rank), so each stage runs the same in a notebook, a test
and a multi-process run. Rank-local work is always split by the same rules on every rank, because engines
that generate with a sharded model need identical ``generate`` calls everywhere (FSDP collectives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def shard_batches(items: Sequence[T], batch_size: int) -> list[tuple[list[T], int]]:
    """This rank's share of ``items`` in chunks, as (chunk, number of real items at its front).

    Every rank gets the same number of chunks of the same sizes: shorter shards are padded with
    ``items[0]``, which callers process but do not count.
    """
    rank, world = rank_and_world()
    shard = list(items)[rank::world]
    per_rank = math.ceil(len(items) / world)
    padded = shard + [items[0]] * (per_rank - len(shard))
    out = []
    for start in range(0, per_rank, batch_size):
        chunk = padded[start : start + batch_size]
        out.append((chunk, max(0, min(len(shard) - start, len(chunk)))))
    return out


def derive_seed(*parts: int) -> int:
    """A fixed mixing of (seed, iteration, round, rank, ...) into well-separated 31-bit seeds."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x7F4A7C15) % (2**31 - 1)
    return h
