"""torchrun integration: one process is simply world size 1.

Under `torchrun` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; we start the
process group (NCCL on GPUs, gloo on CPU) and wrap the model in DDP. Without them nothing
is started and the helpers below reduce to identities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun process group if this process was started by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def all_mean(value: torch.Tensor, info: Dist) -> torch.Tensor:
    """Mean of a tensor over all ranks (the tensor itself when alone)."""
    if info.world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world


def all_sum(value: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: Dist) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
