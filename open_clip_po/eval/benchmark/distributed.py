"""Data-parallel evaluation under ``torchrun``: which process this is, and the one gather of the results.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) it is one process and nothing is initialised. Under
torchrun each process evaluates its share of the images (``samples``) and the per-image predictions are gathered
once, at the end, onto every rank; rank 0 writes the report. gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a list of one without torchrun)."""
        if not self.initialised:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
        self.initialised = False


def init_world(device: str) -> tuple[World, str]:
    """``(world, device of this process)``: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return World(rank, size, local_rank, True), device
