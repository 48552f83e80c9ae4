"""Opening a model: the one way every command, training task and the Python API load one.

`open_model(spec)` accepts any way of naming a model: a model directory, a run directory
(its latest checkpoint), a LoRA adapter directory (its base is opened and the adapter put on
it; `adapter=False` opens the base alone), a Hugging Face directory or a `.gguf` file (converted once into the cache), a registry
name (`smollm2-135m-instruct`) or `hf:ORG/NAME` (pulled once). It then applies what the
directory declares through the hooks registered with `lmforge.modeldir` (quantized weights,
a classification head) and returns the model with its tokenizer and stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

# Registers the hook that reads quantized weights (see lmforge.modeldir.DirectoryHook).
import lmforge.compress.quant  # noqa: E402, F401, I001
from lmforge.allocator import give_back_freed_memory, keep_freed_memory
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.images import ImageProcessor, image_processor
from lmforge.interop.hub import resolve_model
from lmforge.lora import load_adapter, read_adapter_config
from lmforge.modeldir import (
    ADAPTER_CONFIG,
    GENERATION_CONFIG,
    declared_hooks,
    is_adapter_dir,
    is_model_dir,
    read_image_settings,
    read_model,
    read_tokenizer,
    resolve_model_dir,
    stop_token_ids,
)
from lmforge.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class OpenedModel:
    """A model ready to use (eval mode) and what goes with it."""

    model: nn.Module  # a LanguageModel, or what a directory's hook made of one (a classifier)
    tokenizer: Tokenizer | None
    stop_ids: tuple[int, ...]  # tokens that end generation
    directory: Path  # the model or adapter directory it was read from
    # How the model sees images (prompt text and pixel tiles); None for a text model.
    processor: ImageProcessor | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype from a name (fp32, bf16, fp16, or torch's float32...) or torch dtype; by default bf16 on a GPU and
    fp32 on a CPU, where bf16 decoding is no faster."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def adapter_base(directory: str | Path) -> Path:
    """The model directory of the base model an adapter directory names: the directory
    itself when it holds the weights too (a vision-language LoRA run's checkpoint)."""
    if is_model_dir(directory):
        return Path(directory)
    base = read_adapter_config(directory)[1].get("base_model_name_or_path")
    if not base:
        raise CheckpointMismatch(f"{directory}/{ADAPTER_CONFIG} names no base model "
                                 "(base_model_name_or_path): load the base and pass --adapter")
    try:
        return resolve_model(base)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the base model of the adapter in {directory} is not "
                                f"available: {err}") from None


def open_model(spec: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None,
               adapter: str | Path | Literal[False] | None = None,
               progress: bool = True) -> OpenedModel:
    """The model `spec` names (see the module docstring), on `device` (default: a GPU if
    there is one) in `dtype`, with the LoRA adapter directory `adapter` put on it (unmerged);
    adapter=False: without any adapter, even the one `spec` holds (its base model alone)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    if device.type == "cpu":
        keep_freed_memory()  # a CPU forward pass reuses its freed activations' pages
    directory = resolve_model(spec, progress)
    if adapter is False:
        adapter_dir = None
        weights_dir = adapter_base(directory) if is_adapter_dir(directory) else directory
    elif is_adapter_dir(directory):
        if adapter is not None:
            raise ConfigError(f"{spec} is itself an adapter; pass its base model with --adapter")
        adapter_dir, weights_dir = directory, adapter_base(directory)
    else:
        adapter_dir = resolve_model_dir(adapter) if adapter is not None else None
        weights_dir = directory
    top = adapter_dir or weights_dir
    # The tokenizer first, and what reading it freed given back before the weights come in
    # (see `give_back_freed_memory`): its peak and theirs never add up.
    tokenizer = read_tokenizer(top) or read_tokenizer(weights_dir)
    give_back_freed_memory()
    model = read_model(weights_dir, device, dtype)
    cfg = model.cfg
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    for hook in declared_hooks(top):
        if hook.after_weights is not None:
            model = hook.after_weights(model, top)
    stops_from = top if (top / GENERATION_CONFIG).is_file() else weights_dir
    processor = image_processor(cfg, tokenizer, read_image_settings(weights_dir)) \
        if tokenizer is not None else None
    return OpenedModel(model.eval(), tokenizer, stop_token_ids(stops_from, tokenizer), top,
                       processor)
