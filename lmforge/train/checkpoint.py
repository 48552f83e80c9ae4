"""Training checkpoints: a model directory plus what it takes to continue the run.

A checkpoint is `run/checkpoints/step_NNNNNNN/` holding what the task writes of the model
(a model directory: config.json, model.safetensors, tokenizer.json; or a LoRA adapter
directory), `optimizer.pt` (tensors only, loaded
with weights_only=True), `rng.pt` and `trainer.json`. It is written into a temporary
directory and renamed into place, so a crash or Ctrl-C mid-write leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.modeldir import CHECKPOINTS, checkpoint_dirs


def save_checkpoint(run_dir: str | Path, step: int, write_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; write_model(directory) writes the model's files."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    for stale in root.glob(".tmp-*"):  # left by a run that died mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step:07d}"
    tmp.mkdir()
    write_model(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: str | Path, read_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore the model with read_model(directory) (and optimizer and RNG state when
    given); return trainer state."""
    directory = Path(directory)
    read_model(directory)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        set_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return json.loads((directory / "trainer.json").read_text())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries so the rename survives a power cut, not just a crash."""
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
