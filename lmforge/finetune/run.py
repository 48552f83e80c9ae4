"""Fine-tuning entry points: a recipe with fine-tuning defaults, and folding an adapter into
its base model (`lmforge merge`).

Fine-tuning is the one training loop (`lmforge.train.trainer.Trainer`) with a fine-tuning
task; only the defaults differ from pretraining: a smaller learning rate, epochs rather than
a step count, the whole validation split, frequent evaluations.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.finetune.classify import read_head
from lmforge.lora import load_adapter, merge_lora
from lmforge.modeldir import (
    CLASSIFIER_CONFIG,
    CLASSIFIER_WEIGHTS,
    copy_settings,
    is_adapter_dir,
    read_model,
    read_tokenizer,
    resolve_model_dir,
    save_model,
)
from lmforge.open import adapter_base, resolve_model
from lmforge.train.config import TrainConfig, load_recipe
from lmforge.train.sharded import consolidate, sharded_checkpoint

# Pretraining's defaults suit a model learning from scratch; these suit one adapting.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "task": "sft", "epochs": 1.0, "batch_size": 8, "lr": 2e-4, "min_lr": 2e-5,
    "warmup_steps": 10, "weight_decay": 0.0, "eval_interval": 50, "eval_batches": 0,
    "log_interval": 5, "sample_tokens": 64, "lora_rank": 16,
}
# Full fine-tuning moves every weight: a much smaller step than LoRA's adapters take.
FULL_FINETUNE_LR = 2e-5


def finetune_recipe(model: str, data: str, recipe: str | Path | None = None,
                    overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig fine-tuning `model` on `data`: fine-tuning defaults, then the recipe
    file's values, then key=value overrides."""
    defaults = dict(FINETUNE_DEFAULTS, init_from=model, data=data,
                    out_dir=f"runs/finetune-{Path(data).stem}")
    cfg = load_recipe(recipe, overrides, defaults)
    if cfg.lora_rank == 0 and (cfg.lr, cfg.min_lr) == (defaults["lr"], defaults["min_lr"]):
        cfg.lr, cfg.min_lr = FULL_FINETUNE_LR, FULL_FINETUNE_LR / 10
    return cfg


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter (an adapter or run directory) into its base model and write a
    plain model directory: no adapter needed at inference, and it quantizes and exports."""
    if Path(adapter).exists() and sharded_checkpoint(adapter):
        with tempfile.TemporaryDirectory(prefix="lmforge-adapter-") as scratch:
            return merge(consolidate(adapter, Path(scratch) / "adapter"), out, base)
    adapter_dir = resolve_model_dir(adapter)
    if not is_adapter_dir(adapter_dir):
        raise ConfigError(f"{adapter} holds no LoRA adapter (adapter_config.json); it is already "
                          "a plain model")
    base_dir = resolve_model(base) if base is not None else adapter_base(adapter_dir)
    out = Path(out)
    if out.resolve() in (adapter_dir.resolve(), base_dir.resolve()):
        raise ConfigError(f"merge would overwrite its input {out}; pass another --out")
    model = read_model(base_dir)
    load_adapter(model, adapter_dir)
    save_model(out, merge_lora(model), read_tokenizer(adapter_dir) or read_tokenizer(base_dir))
    copy_settings(adapter_dir, out)
    if (adapter_dir / CLASSIFIER_CONFIG).is_file():
        from lmforge.files import save_safetensors

        _, weight = read_head(adapter_dir)
        shutil.copyfile(adapter_dir / CLASSIFIER_CONFIG, out / CLASSIFIER_CONFIG)
        save_safetensors({"score.weight": weight.contiguous()}, out / CLASSIFIER_WEIGHTS)
    return out
