"""The language-modeling task: next-token prediction on a prepared corpus (pretraining).

The corpus is prepared once (cached) by rank 0 while the other ranks wait; the model is
built from the recipe's `model` (or loaded from `init_from` to continue pretraining), its
vocabulary sized to the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quant import require_float
from lmforge.config import ModelConfig
from lmforge.data import loader
from lmforge.data.loader import TokenShards
from lmforge.errors import CheckpointMismatch
from lmforge.infer.engine import generate, prompt_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.modeldir import TOKENIZER, WEIGHTS, load_weights, read_config, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model, resolve_model
from lmforge.paths import cache_dir
from lmforge.tokenizer import Tokenizer
from lmforge.train import distributed as distr
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist
from lmforge.train.task import register_task


def prepare_data(cfg: TrainConfig) -> Path:
    """A prepared corpus directory for cfg.data, preparing (once, cached) when needed."""
    from lmforge.data.prepare import PrepareConfig, prepare

    if not cfg.data:
        raise FileNotFoundError("no data given: set data=PATH (a text file, folder, JSONL or "
                                "parquet, or a directory made by `lmforge prepare`)")
    path = Path(cfg.data).expanduser()
    if (path / "meta.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}; set data=PATH (each recipe in "
                                "configs/ says at its top where to get its data)")
    key = json.dumps([str(path.resolve()), cfg.tokenizer, cfg.vocab_size])
    out = cache_dir() / "prepared" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return prepare(PrepareConfig(inputs=[str(path)], out_dir=str(out), tokenizer=cfg.tokenizer,
                                 vocab_size=cfg.vocab_size), progress=cfg.progress)


def model_config_for_data(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The recipe's model, with its vocabulary sized to the tokenizer unless set larger."""
    model_cfg = cfg.model_config()
    explicit = isinstance(cfg.model, dict) and "vocab_size" in cfg.model
    if not explicit:
        model_cfg.vocab_size = vocab_size
    elif model_cfg.vocab_size < vocab_size:
        raise CheckpointMismatch(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}: remove model.vocab_size or set it >= {vocab_size}"
        )
    if cfg.context_length:
        model_cfg.context_length = max(model_cfg.context_length, cfg.context_length)
    return model_cfg


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, vocab) against targets (B, T), in float32 (bf16
    logits under autocast would round the log-sum-exp)."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


class LanguageModelingTask:
    """Next-token prediction on token shards: random windows, cross-entropy on every token."""

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg = cfg
        # Rank 0 prepares the corpus and fetches the base model; the others wait and then
        # find both cached.
        path = prepare_data(cfg) if dist.is_main else None
        if cfg.init_from and dist.is_main:
            resolve_model(cfg.init_from)
        distr.barrier(dist)
        self.shards = TokenShards(path or prepare_data(cfg))
        self.tokenizer = Tokenizer.load(self.shards.dir / TOKENIZER)
        self.base = self._open_base() if cfg.init_from else None
        self.model_cfg = self.base.cfg if self.base else \
            model_config_for_data(cfg, self.shards.vocab_size)
        self.context = cfg.context_length or self.model_cfg.context_length

    def _open_base(self) -> Decoder:
        """The model to continue pretraining (float32, on the CPU until build_model)."""
        spec = self.cfg.init_from
        base = open_model(spec, "cpu", torch.float32)
        if not isinstance(base.model, Decoder):
            raise CheckpointMismatch(f"{spec} is a {type(base.model).__name__} model; "
                                     "pretraining continues decoder-only models")
        require_float(base.model, spec, "training")
        if base.tokenizer is None or base.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise CheckpointMismatch(
                f"the corpus {self.shards.dir} was tokenized with another tokenizer than "
                f"{spec}'s: prepare it with tokenizer={base.directory}/{TOKENIZER}"
            )
        return base.model

    def build_model(self, device: torch.device) -> nn.Module:
        model = self.base if self.base is not None else Decoder(self.model_cfg)
        return model.to(device).train()

    def train_batch(self, step: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return loader.train_batch(self.shards.split("train"), self.context, self.cfg.batch_size,
                                  self.cfg.seed, step, slot)

    def eval_batches(self, n_batches: int, rank: int, world: int):
        if len(self.shards.split("val")) <= self.context + 1:
            return  # prepared with val_fraction=0: nothing to validate on
        yield from loader.eval_batches(self.shards.split("val"), self.context,
                                       self.cfg.batch_size, n_batches, self.cfg.seed, rank, world)

    @staticmethod
    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return next_token_loss(model(x), y)

    @staticmethod
    def count(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[1].numel()

    @staticmethod
    def tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        return {"val_bpb": val_loss / math.log(2) / self.shards.bytes_per_token("val")}

    def sample(self, model: nn.Module) -> str:
        prompt = prompt_ids(self.tokenizer, self.cfg.sample_prompt)
        out = generate(model, prompt, self.cfg.sample_tokens, SamplingConfig(), seed=self.cfg.seed)
        return self.tokenizer.decode(prompt + out) if self.cfg.sample_prompt else self.tokenizer.decode(out)

    def save(self, directory: Path, model: nn.Module) -> None:
        save_model(directory, model, self.tokenizer)

    def load(self, directory: Path, model: nn.Module) -> None:
        saved = read_config(directory).to_dict()
        wanted = self.model_cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)!r}, recipe {wanted[k]!r}"
                for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise CheckpointMismatch(f"{directory} was trained with another model config ("
                                     + "; ".join(diff) + "): resume with the run's own recipe")
        if Tokenizer.load(directory / TOKENIZER).fingerprint() != self.tokenizer.fingerprint():
            raise CheckpointMismatch(
                f"{directory} was trained with a different tokenizer than the data in "
                f"{self.shards.dir}: resume on the corpus the run was started with"
            )
        load_weights(model, directory / WEIGHTS)

    def describe(self) -> dict[str, Any]:
        return {"train_tokens": len(self.shards.split("train"))}


register_task("lm", LanguageModelingTask)
