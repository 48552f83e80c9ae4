"""Training checkpoints: a model directory plus what it takes to continue the run.

A checkpoint is `run/checkpoints/step_NNNNNNN/` holding what the task writes of the model
(a model directory: config.json, model.safetensors, tokenizer.json; or a LoRA adapter
directory), `optimizer.pt` (tensors only, loaded with weights_only=True), `rng.pt` and
`trainer.json`.

Every change survives a kill at any point:
- a checkpoint is written into `.tmp-step_NNNNNNN/`, with `trainer.json` landing last once the
  rest is on disk, and renamed into place: a directory without `trainer.json` is not a
  checkpoint;
- a directory is deleted (pruned, or replaced by a new save of the same step) by first renaming
  it to `.trash-...` and then removing it, so no half-deleted `step_` directory is ever seen;
- `recover_checkpoints`, run before a run starts, finishes what a killed save left: a complete
  `.tmp-step_N` is the newest copy of step N and takes its place; other leftovers are removed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CorruptFile
from lmforge.files import disk_full_reported, read_json_object
from lmforge.modeldir import CHECKPOINT_DONE, CHECKPOINTS, checkpoint_dirs

TMP, TRASH = ".tmp-", ".trash-"
DISK_FULL_ADVICE = ("free some space (or set keep_checkpoints lower), then continue the run "
                    "with --resume; the last complete checkpoint is untouched")


def save_checkpoint(run_dir: str | Path, step: int, write_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (see the module docstring), keeping the newest
    `keep` (0 = all); write_model(directory) writes the model's files."""
    tmp = start_checkpoint(run_dir, step)
    try:
        with disk_full_reported(tmp.parent, f"checkpoint step {step}", DISK_FULL_ADVICE):
            write_model(tmp)
            save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            save_torch(rng_state(), tmp / "rng.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(tmp, trainer_state, keep)


def start_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The empty temporary directory checkpoint `step` is written into."""
    tmp = temporary_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    tmp.mkdir()
    return tmp


def temporary_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{TMP}step_{step:07d}"


def finish_checkpoint(tmp: Path, trainer_state: dict[str, Any], keep: int) -> Path:
    """Flush a fully written temporary checkpoint, mark it complete and rename it into place;
    then prune to the newest `keep` (0 = all)."""
    final = tmp.with_name(tmp.name.removeprefix(TMP))
    step = int(final.name.removeprefix("step_"))
    try:
        with disk_full_reported(tmp.parent, f"checkpoint step {step}", DISK_FULL_ADVICE):
            _fsync_tree(tmp)
            _write_last(tmp / CHECKPOINT_DONE, json.dumps({**trainer_state, "step": step},
                                                          indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, final)
    for old in checkpoint_dirs(tmp.parent.parent)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def recover_checkpoints(run_dir: str | Path) -> None:
    """Finish what a run killed while saving left in its checkpoints folder: a complete
    `.tmp-step_N` replaces `step_N` (missing, half-deleted or the older copy of that step);
    incomplete temporary, trash and `step_` directories are removed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for tmp in sorted(root.glob(f"{TMP}step_*")):
        if (tmp / CHECKPOINT_DONE).is_file():
            _move_into_place(tmp, root / tmp.name.removeprefix(TMP))
    for leftover in root.iterdir():
        complete = (leftover / CHECKPOINT_DONE).is_file()
        if leftover.name.startswith((TMP, TRASH)) or (leftover.name.startswith("step_")
                                                       and not complete):
            _remove(leftover)


def load_checkpoint(directory: str | Path, read_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore the model with read_model(directory) (and optimizer and RNG state when
    given); return trainer state."""
    directory = Path(directory)
    read_model(directory)
    if optimizer is not None:
        optimizer.load_state_dict(load_torch(directory / "optimizer.pt"))
        set_rng_state(load_torch(directory / "rng.pt"))
    return read_json_object(directory / CHECKPOINT_DONE)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(obj: Any, path: Path) -> None:
    # Through a Python file: given a path, torch reports a full disk only as "unexpected pos".
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CorruptFile(f"{path} is damaged ({err}); move its checkpoint directory away to "
                          "resume from the one before, or start the run over") from err


def _write_last(path: Path, text: str) -> None:
    """Write the file that marks a checkpoint complete: whole or not at all, then flushed."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    _fsync(partial)
    os.replace(partial, path)
    _fsync(path.parent)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a complete checkpoint to its name, setting an existing one aside first."""
    trash = _set_aside(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a directory so that no kill leaves it half-deleted under its own name."""
    trash = _set_aside(path)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _set_aside(path: Path) -> Path | None:
    """Rename `path` (if it exists) to its `.trash-` name, atomically; return that name."""
    if not path.exists():
        return None
    if path.name.startswith(TRASH):
        return path
    trash = path.with_name(TRASH + path.name)
    shutil.rmtree(trash, ignore_errors=True)  # a leftover of an earlier kill
    os.replace(path, trash)
    return trash


def _fsync_tree(path: Path) -> None:
    """Flush a directory's files and entries (and its subdirectories') so a rename survives a
    power cut, not just a crash."""
    for child in path.iterdir():
        if child.is_file():
            _fsync(child)
        elif child.is_dir():
            _fsync_tree(child)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
