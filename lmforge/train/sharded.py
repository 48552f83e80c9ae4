"""Sharded checkpoints (`parallel: fsdp`): every rank writes its own part.

A sharded checkpoint is `run/checkpoints/step_NNNNNNN/` holding `shards/` (model and
optimizer state, written by `torch.distributed.checkpoint`: each rank's pieces in a file of
its own, and a metadata file), `rng-R.pt` for each rank R, and `trainer.json`, which rank 0
writes last, once every rank is done. The directory is written under a temporary name and
renamed into place as an ordinary checkpoint is (`lmforge.train.checkpoint`), so a kill at
any point leaves the last complete checkpoint as it was. For a run on several machines,
`out_dir` must be on a file system they share.

The state names tensors by their place in the model, not by rank, so a run resumes on any
number of ranks (the library reshards), or in one process. Frozen parameters (a LoRA run's
base model) are not saved: they are on disk already. `consolidate` makes an ordinary model
directory of a sharded checkpoint, which every other command reads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge.config import from_dict
from lmforge.files import disk_full_reported, read_json_object
from lmforge.modeldir import CHECKPOINT_DONE, SHARDS, checkpoint_dirs, is_sharded_checkpoint
from lmforge.train.checkpoint import (
    DISK_FULL_ADVICE,
    finish_checkpoint,
    load_torch,
    rng_state,
    save_torch,
    set_rng_state,
    start_checkpoint,
    temporary_dir,
)
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist, barrier
from lmforge.train.task import load_task

OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen parameters stay as they are; a missing trainable tensor fails in dcp.load already.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)

# Loading in one process is what we mean when no process group is running.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class ShardedCheckpointer:
    """Writes a run's sharded checkpoints; with `background`, the files are written by a
    thread while training goes on (the state is copied to host memory first), and the
    checkpoint is completed when the next one starts or the run ends."""

    def __init__(self, run_dir: Path, keep: int, info: Dist, background: bool) -> None:
        self.run_dir, self.keep, self.info = run_dir, keep, info
        # A group of its own, so the writer thread's messages never interleave with training's.
        self.group = dist.new_group(backend="gloo") if background and info.world > 1 else None
        self.pending: tuple[Any, Path, dict[str, Any]] | None = None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Checkpoint `step` (every rank calls this); its final path."""
        self.wait()
        d = self.info
        tmp = start_checkpoint(self.run_dir, step) if d.is_main else \
            temporary_dir(self.run_dir, step)
        barrier(d)
        state = {"world": d.world, **trainer_state}
        with disk_full_reported(tmp.parent, f"checkpoint step {step}", DISK_FULL_ADVICE):
            save_torch(rng_state(), tmp / f"rng-{d.rank}.pt")
            if self.group is not None:
                future = dcp.async_save(training_state(model, optimizer),
                                        checkpoint_id=tmp / SHARDS, process_group=self.group)
                self.pending = (future, tmp, state)
                return tmp.with_name(tmp.name.removeprefix(".tmp-"))
            dcp.save(training_state(model, optimizer), checkpoint_id=tmp / SHARDS)
        return self._finish(tmp, state)

    def wait(self) -> None:
        """Complete the checkpoint being written in the background, if any."""
        if self.pending is not None:
            future, tmp, state = self.pending
            self.pending = None
            with disk_full_reported(tmp.parent, "a checkpoint", DISK_FULL_ADVICE):
                future.result()
            self._finish(tmp, state)

    def _finish(self, tmp: Path, trainer_state: dict[str, Any]) -> Path:
        barrier(self.info)  # every rank's shards are on disk
        final = finish_checkpoint(tmp, trainer_state, self.keep) if self.info.is_main else \
            tmp.with_name(tmp.name.removeprefix(".tmp-"))
        barrier(self.info)
        return final


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": trainable(model, model_state), "optimizer": optimizer_state}


def trainable(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` without frozen parameters, including a frozen one's tied alias (a LoRA run's
    output projection that is its embedding), which the library keeps."""
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 rank: int) -> dict[str, Any]:
    """Restore a sharded checkpoint into `model` and `optimizer` (sharded over any number of
    ranks, or whole in one process) and this rank's random state; return trainer state."""
    state = training_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory / SHARDS)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=LOAD_OPTIONS)
    rng = directory / f"rng-{rank}.pt"
    set_rng_state(load_torch(rng if rng.is_file() else directory / "rng-0.pt"))
    return read_json_object(directory / CHECKPOINT_DONE)


def sharded_checkpoint(path: str | Path) -> Path | None:
    """The sharded checkpoint `path` names (itself, or a run directory's latest), or None."""
    checkpoints = checkpoint_dirs(path)
    latest = checkpoints[-1] if checkpoints else Path(path)
    return latest if is_sharded_checkpoint(latest) else None


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write the model of a sharded checkpoint (a run directory's latest, or the checkpoint
    directory itself) as an ordinary model or adapter directory, in one process. The run's
    task rebuilds the model from its recipe and writes it, so the run's data and base model
    must be where they were."""
    path, out = Path(path), Path(out)
    checkpoint = sharded_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path} is neither a sharded checkpoint nor a run whose latest "
                                "checkpoint is one (parallel: fsdp); a model directory needs no "
                                "consolidating")
    recipe = read_json_object(checkpoint / CHECKPOINT_DONE)["recipe"]
    cfg = from_dict(TrainConfig, {**recipe, "progress": False, "device": "cpu"},
                    where=str(checkpoint / CHECKPOINT_DONE))
    task = load_task(cfg, Dist())
    model = task.build_model(torch.device("cpu"))
    state = {"model": trainable(model, get_model_state_dict(model, options=OPTIONS))}
    dcp.load(state, checkpoint_id=checkpoint / SHARDS)
    set_model_state_dict(model, state["model"], options=LOAD_OPTIONS)
    out.mkdir(parents=True, exist_ok=True)
    task.save(out, model.eval())
    return out
