"""What a training task is: how batches are made, how their loss is computed, what the model
is and how it is saved. The one `Trainer` loop runs any of them.

Tasks register themselves by name with `register_task`: `lm` (next-token prediction on
token shards, `lmforge.train.lm`) and `seq2seq` (`lmforge.train.seq2seq`) here; fine-tuning
tasks from the packages above (`sft`, `classify` in `lmforge.finetune`), and distillation
(`distill`, `lmforge.compress.distill`), so the loop never imports the code it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmforge.config import closest_hint
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist

Batch = tuple[torch.Tensor, ...]


class Task(Protocol):
    tokenizer: Tokenizer
    context: int  # positions per row

    def build_model(self, device: torch.device) -> nn.Module:
        """The model to train, on `device`, with only the parameters that train requiring grad."""

    def train_batch(self, step: int, slot: int) -> Batch:
        """Micro-batch `slot` of optimizer step `step`: a pure function of (seed, step, slot),
        so a resumed or distributed run reads exactly the batches a single run would."""

    def eval_batches(self, n_batches: int, rank: int, world: int) -> Iterator[Batch]:
        """This rank's share of the validation batches (n_batches 0 = the whole split)."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss over the batch's scored targets."""

    def count(self, batch: Batch) -> int:
        """How many targets `loss` averages over (to weight validation batches)."""

    def tokens(self, batch: Batch) -> int:
        """Tokens the model reads for this batch, padding excluded (for tokens/s)."""

    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        """Validation figures beyond the loss (bits per byte, accuracy...) of the model after
        `step` optimizer steps."""

    def sample(self, model: nn.Module) -> str | None:
        """A short text showing what the model does now, or None."""

    def save(self, directory: Path, model: nn.Module) -> None:
        """Write what a checkpoint needs of the model into `directory`."""

    def load(self, directory: Path, model: nn.Module) -> None:
        """Restore `model` from a checkpoint directory, refusing one from another setup."""

    def describe(self) -> dict[str, Any]:
        """A few facts for the log (examples, skipped...)."""


TASKS: dict[str, type[Task]] = {}


def register_task(name: str, task: type[Task]) -> None:
    """Make `task=name` in a recipe train `task`, built as task(cfg, dist)."""
    TASKS[name] = task


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: {closest_hint(name, list(TASKS))}"
                          f"tasks are {', '.join(sorted(TASKS))} (a task is known once its "
                          "module is imported; `import lmforge.api` imports all of lmforge's)")
    return TASKS[name]


def load_task(cfg: TrainConfig, dist: Dist) -> Task:
    return task_class(cfg.task)(cfg, dist)
