"""Data-parallel training through torch.distributed, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m ekdaa train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`setup` joins the process group (gloo on CPU, nccl on CUDA). Every rank holds
the whole dataset in memory and trains on its slice of each global batch; the
model is wrapped in DistributedDataParallel, whose all-reduce averages the rules'
``.grad`` (error kernels and learned feedback are parameters too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (a copy; ``t`` itself is left alone)."""
        t = t.clone()
        if self.world > 1:
            dist.all_reduce(t)
        return t


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (or stay alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(finished: bool = False) -> None:
    """Leave the process group; after a finished run every rank first waits for the others, so that
    none tears down the group while another still uses it (a failed run leaves at once)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
