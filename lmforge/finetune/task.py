"""What every fine-tuning task shares: a base model (trained whole, or frozen under LoRA
adapters), examples held in memory, batches drawn epoch by epoch, checkpoints that are model
or adapter directories.

Subclasses (`sft.ChatTask`, `classify.ClassifyTask`) read their examples and say how a
batch is made and scored; the `Trainer` loop runs them like any task.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.loader import in_order
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.lora import LoraConfig, apply_lora, load_adapter, read_adapter_config, save_adapter
from lmforge.modeldir import GENERATION_CONFIG, WEIGHTS, is_adapter_dir, load_weights, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import OpenedModel, open_model, resolve_model
from lmforge.train import distributed as distr
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_indices(n: int, batch: int, seed: int, step: int, slot: int, slots_per_step: int
                    ) -> list[int]:
    """Which examples micro-batch `slot` of optimizer step `step` reads: the examples in a
    seeded order, reshuffled every epoch, so each is seen once per epoch whatever the
    batch size, accumulation or number of processes (and a resumed run reads the same)."""
    first = (step * slots_per_step + slot) * batch
    picks = []
    for g in range(first, first + batch):
        epoch, i = divmod(g, n)
        picks.append(int(_permutation(n, seed, epoch)[i]))
    return picks


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-padded (len(rows), longest) int64 tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def base_spec(init_from: str) -> str:
    """How an adapter names its base: a path made absolute, a registry name as it is."""
    path = Path(init_from).expanduser()
    return str(path.resolve()) if path.exists() else init_from


class ExampleBatches:
    """Training and validation batches of a task that holds its examples in memory:
    `examples` and `val_examples` rows, made into tensors by the task's `collate`."""

    def train_batch(self, step: int, slot: int) -> tuple[torch.Tensor, ...]:
        slots = self.cfg.grad_accum * self.dist.world
        picks = example_indices(len(self.examples), self.cfg.batch_size, self.cfg.seed, step,
                                slot, slots)
        return self.collate([self.examples[i] for i in picks])

    def eval_batches(self, n_batches: int, rank: int, world: int) -> Iterator[tuple]:
        for rows in in_order(self.val_examples, self.cfg.batch_size, n_batches, rank, world):
            yield self.collate(rows)


class FinetuneTask(ExampleBatches):
    """Base of the fine-tuning tasks. Subclasses set `examples`, `val_examples` and implement
    `collate(examples) -> batch`, `loss`, `count`, `tokens`."""

    task_type = "CAUSAL_LM"  # PEFT's name for what the adapter is for

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        if not cfg.init_from:
            raise ConfigError("fine-tuning needs a base model: `lmforge finetune MODEL ...` "
                              "(or init_from=MODEL in a recipe)")
        if not cfg.data:
            raise ConfigError("no training data: pass --data FILE (or data=FILE)")
        self.cfg, self.dist = cfg, dist
        self.lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                               cfg.lora_targets) if cfg.lora_rank > 0 else None
        base = open_base(cfg.init_from, dist)
        self.base, self.base_dir, self.tokenizer = base.model, base.directory, base.tokenizer
        self.base_cfg = self.base.cfg
        self.context = min(cfg.context_length or self.base_cfg.context_length,
                           self.base_cfg.context_length)
        self.pad_id = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id)
                            if i is not None), 0)
        self.examples, self.val_examples, self.notes = self.read_examples()
        if not self.examples:
            raise ConfigError(f"{cfg.data} gave no training examples" + self._notes_text())
        if cfg.epochs > 0:
            per_step = cfg.batch_size * cfg.grad_accum * dist.world
            cfg.max_steps = max(1, math.ceil(cfg.epochs * len(self.examples) / per_step))

    # What subclasses provide ---------------------------------------------------------------

    def read_examples(self) -> tuple[list, list, dict[str, Any]]:
        raise NotImplementedError

    def collate(self, examples: list) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def head_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weights of a task head trained beside the base (saved with the adapter)."""
        return {}

    def wrap(self, decoder: nn.Module) -> nn.Module:
        return decoder

    # The Task protocol ---------------------------------------------------------------------

    def build_model(self, device: torch.device) -> nn.Module:
        decoder = self.base.to(device).train()
        if self.lora is not None:
            apply_lora(decoder, self.lora)
        return self.wrap(decoder).to(device)

    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        return {}

    def sample(self, model: nn.Module) -> str | None:
        return None

    def save(self, directory: Path, model: nn.Module) -> None:
        decoder = getattr(model, "decoder", model)
        if self.lora is not None:
            save_adapter(directory, decoder, self.lora, base_spec(self.cfg.init_from),
                         extra=self.head_tensors(model), task_type=self.task_type)
            self.tokenizer.save(directory)
        else:
            save_model(directory, decoder, self.tokenizer)
        if (self.base_dir / GENERATION_CONFIG).is_file():
            shutil.copyfile(self.base_dir / GENERATION_CONFIG, directory / GENERATION_CONFIG)
        self.save_head(directory, model)

    def save_head(self, directory: Path, model: nn.Module) -> None:
        """Files a task head needs beside the weights (labels...)."""

    def load(self, directory: Path, model: nn.Module) -> None:
        decoder = getattr(model, "decoder", model)
        check_resumed_adapter(directory, self.lora)
        if self.lora is None:
            load_weights(decoder, directory / WEIGHTS)
            self.load_head(directory, model, None)
            return
        self.load_head(directory, model, load_adapter(decoder, directory))

    def load_head(self, directory: Path, model: nn.Module,
                  adapter_extra: dict[str, torch.Tensor] | None) -> None:
        """Restore a task head from a checkpoint (adapter_extra: tensors saved beside the
        adapter, or None for a full model directory)."""

    def describe(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "val_examples": len(self.val_examples),
                **self.notes}

    def _notes_text(self) -> str:
        return "".join(f"; {k}: {v}" for k, v in self.notes.items())


def check_resumed_adapter(directory: Path, lora: LoraConfig | None) -> None:
    """Refuse a checkpoint whose adapter, or lack of one, is not the one the recipe trains."""
    if lora is None:
        if is_adapter_dir(directory):
            raise CheckpointMismatch(f"{directory} holds a LoRA adapter but the recipe asks "
                                     "for full fine-tuning: resume with lora_rank set")
        return
    if not is_adapter_dir(directory):
        raise CheckpointMismatch(f"{directory} holds no LoRA adapter but the recipe sets "
                                 f"lora_rank={lora.rank}: resume with the run's own settings")
    saved, _ = read_adapter_config(directory)
    if (saved.rank, saved.alpha, sorted(saved.targets)) != (
            lora.rank, lora.alpha, sorted(lora.targets)):
        raise CheckpointMismatch(
            f"{directory} holds a rank {saved.rank} (alpha {saved.alpha}) adapter on "
            f"{saved.targets}; the recipe asks for rank {lora.rank} (alpha "
            f"{lora.alpha}) on {lora.targets}: resume with the run's own settings")


def open_base(spec: str, dist: Dist) -> OpenedModel:
    """The decoder-only model a fine-tuning run starts from, in float32 on the CPU (the
    Trainer moves it). Rank 0 pulls or converts it once; the others then find it cached."""
    directory = resolve_model(spec) if dist.is_main else None
    distr.barrier(dist)
    if is_adapter_dir(directory or resolve_model(spec)):
        raise ConfigError(f"{spec} is a LoRA adapter: fold it into its base first "
                          "(`lmforge merge`) and fine-tune the merged model")
    base = open_model(spec, "cpu", torch.float32)
    if not isinstance(base.model, Decoder):
        kind = type(base.model).__name__
        raise ConfigError(f"{spec} is a {kind} model; finetune takes a decoder-only language "
                          "model (encoder-decoders train with `lmforge train task=seq2seq`)")
    if base.tokenizer is None:
        raise FileNotFoundError(f"{spec} has no tokenizer.json to encode the data with")
    return base


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share of `examples` (at least one when there are two or more)."""
    if val_fraction <= 0 or len(examples) < 2:
        return examples, []
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(max(1, round(len(examples) * val_fraction)), len(examples) - 1)
    val = {int(i) for i in order[:n_val]}
    return ([e for i, e in enumerate(examples) if i not in val],
            [e for i, e in enumerate(examples) if i in val])


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a bad line is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: invalid JSON ({err.msg} at column "
                                  f"{err.colno})") from None
