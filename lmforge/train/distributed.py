"""torchrun integration: one process is simply world size 1.

Under `torchrun` the environment carries RANK, LOCAL_RANK and WORLD_SIZE; we start the
process group (NCCL on GPUs, gloo on CPU), and the Trainer wraps the model in DDP or shards it
with FSDP2 (`shard_model`). Without them nothing is started and the helpers below reduce to
identities.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh


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


def any_rank(flag: bool, info: Dist, device: torch.device) -> bool:
    """Whether `flag` is set on any rank: ranks agree on when to stop, or some would wait
    for the others forever."""
    return bool(all_max(int(flag), info, device))


def all_max(value: int, info: Dist, device: torch.device) -> int:
    """The largest of the ranks' values (on `device`, where the backend reduces)."""
    if info.world == 1:
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_sum(value: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.world == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def lost_ranks(info: Dist, wait: float = 5.0) -> list[int] | None:
    """After a collective operation failed: the ranks that do not answer within `wait`
    seconds (each rank still running marks itself present in the job's key-value store,
    which torchrun's agent keeps), or None when that store is gone too."""
    try:
        store = dist.distributed_c10d._get_default_store()
        # Keys of their own per attempt: torchrun may restart the job in the same store.
        prefix = f"lmforge/present/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(prefix + str(info.rank), "1")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(info.world) if not store.check([prefix + str(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError, OSError):
        return None


def barrier(info: Dist) -> None:
    if info.world > 1:
        dist.barrier()


def shutdown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, device: torch.device, bf16: bool, offload: bool) -> None:
    """FSDP2 in place: every block of the model (each member of a `ModuleList`: decoder,
    encoder and vision blocks) is sharded on its own, then the root with what is left
    (embeddings, final norm, output projection). A block's parameters are gathered just for
    its forward and backward, so a rank holds one block in full at a time. bf16: parameters
    are computed with in bf16, gradients reduced in fp32. offload: shards, gradients and
    optimizer state live in host memory (GPU only)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every sharded part of `model` whole until the block ends: for work that calls a model's
    methods besides `forward` (generation, a seq2seq model's encoder and cross-attention
    memory), which FSDP's hooks would not gather for. Every rank must enter it."""
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()
            # what fully_shard chose: the root stays whole from forward to backward
            part.set_reshard_after_forward(part is not model, recurse=False)
