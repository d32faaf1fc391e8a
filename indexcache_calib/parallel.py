"""Candidate-parallel search: several processes (torchrun / accelerate launch), each with one model
replica, split every step's candidates and gather the scores. All ranks run the same search code on
the same gathered scores, so they take the same decisions; rank 0 writes the artifact."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate.utils import get_max_memory

from indexcache_calib.search import Score


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world() -> World:
    """Join the process group that torchrun or accelerate launch set up; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        # Only small Python objects (scores) cross processes: gloo carries them without tying a rank
        # to a GPU, which NCCL's object collectives would.
        dist.init_process_group("gloo")
    return World(
        dist.get_rank(), dist.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
    )


def replica_max_memory(world: World, max_memory: dict | None) -> dict | None:
    """Give each local replica its own slice of the node's GPUs (8 GPUs, 2 replicas: 0-3 and 4-7)."""
    if world.local_size <= 1 or not torch.cuda.is_available():
        return max_memory
    per = torch.cuda.device_count() // world.local_size
    if per < 1:
        raise ValueError(f"{world.local_size} processes per node but only {torch.cuda.device_count()} GPUs")
    mine = range(world.local_rank * per, (world.local_rank + 1) * per)
    if max_memory:
        return {k: v for k, v in max_memory.items() if not isinstance(k, int) or k in mine}
    return {k: v for k, v in get_max_memory().items() if not isinstance(k, int) or k in mine}


class ParallelEvaluator:
    """Wraps a `PatternRunner`: every rank keeps the base cache, candidates are dealt round-robin."""

    def __init__(self, runner, world: World):
        self.runner, self.world = runner, world
        self.parallel = world.size
        self.num_batches, self.batch_size = runner.num_batches, runner.batch_size

    def set_base(self, pattern: str) -> Score:
        return self.runner.set_base(pattern)

    def rebase(self, pattern: str) -> None:
        self.runner.rebase(pattern)

    def base_losses(self, batches: list[int]) -> list[float]:
        """Every rank runs the committed pattern where it needs it (each keeps its own cache); the losses the
        search decides on are rank 0's, so that every rank takes the same decisions."""
        return broadcast(self.runner.base_losses(batches))

    def score(self, pattern: str, batches: list[int] | None = None) -> Score:
        return self.score_many([pattern], batches)[0]

    def score_many(self, patterns: list[str], batches: list[int] | None = None) -> list[Score]:
        """Score each pattern on every batch, or only on `batches` (a race's round)."""
        extra = {} if batches is None else {"batches": batches}
        mine = {i: self.runner.score(p, **extra) for i, p in enumerate(patterns) if i % self.world.size == self.world.rank}
        merged = gather_dict(mine)
        return [merged[i] for i in range(len(patterns))]


def gather_dict(mine: dict) -> dict:
    if not dist.is_initialized():
        return dict(mine)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def broadcast(value):
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_counters(counters: dict) -> dict:
    """Work done by all ranks together."""
    if not dist.is_initialized():
        return counters
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counters)
    # Work adds up; time and cache are per process, so the slowest and the largest count.
    total = {k: sum(p[k] for p in parts) for k in counters if k not in ("peak_cache_bytes", "seconds")}
    total["peak_cache_bytes"] = max(p["peak_cache_bytes"] for p in parts)
    total["seconds"] = max(p["seconds"] for p in parts)
    return total
