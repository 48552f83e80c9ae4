"""The model directory: the one on-disk format every lmforge command reads and writes.

A model directory holds `config.json` + `model.safetensors` + `tokenizer.json`, and may declare
more beside them: `generation_config.json` (stop tokens), `quantization.json` (quantized
weights, see `lmforge.compress.quant`), `classifier.json` (a classification head),
`preprocessor_config.json` (a vision-language model that sees images as Idefics3 does: its
Hugging Face image processor settings, see `lmforge.images.image_processor`). A LoRA adapter
directory (`adapter_config.json` + `adapter_model.safetensors`) names the base model it goes
on; a directory holding both a model and an adapter is the adapter's base itself (what a
vision-language LoRA run saves: the weights its adapters sit on, with the adapters beside
them). The weights file never holds adapter tensors, which are the adapter files'. Every file
name is spelt here, once.

This module only reads and writes directories. What a declared file means to the model is
applied by a `DirectoryHook` that the package owning it registers (`register_hook`); opening a
model by any name (registry names, GGUF files, adapters) is `lmforge.open.open_model`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig, Seq2SeqConfig, load_config
from lmforge.errors import CheckpointMismatch, ConfigError, ShardedCheckpoint
from lmforge.files import load_safetensors, read_json_object, save_safetensors
from lmforge.images import Idefics3Preprocess, ImageProcessor
from lmforge.models import LanguageModel, build_model
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = TOKENIZER_FILE
GENERATION_CONFIG = "generation_config.json"
QUANTIZATION = "quantization.json"
CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SOURCE = "source.json"  # where a pulled or converted model came from
CHECKPOINTS = "checkpoints"  # in a run directory: checkpoints/step_NNNNNNN/
CHECKPOINT_DONE = "trainer.json"  # written last: a directory without it is no checkpoint
# A sharded checkpoint (parallel: fsdp) holds its model and optimizer state here, written by
# every rank with torch.distributed.checkpoint, instead of a model directory's files.
SHARDS = "shards"
# How a LoRA adapter's tensors are named in a model's state dict (see lmforge.lora).
_ADAPTER_TENSORS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class DirectoryHook:
    """What a model directory declares with `file`, applied while it is read.

    before_weights(model, directory) reshapes the freshly built model (on the meta device) so
    that the saved tensors fit it, e.g. quantized layers in place of `nn.Linear`.
    after_weights(model, directory) returns the model to hand out, e.g. wrapped with a head.
    on_save(model, directory) writes `file` for a model that has what it declares, and removes
    a stale one for a model that has not (a float model saved over a quantized one).
    """

    file: str
    before_weights: Callable[[nn.Module, Path], None] | None = None
    after_weights: Callable[[nn.Module, Path], nn.Module] | None = None
    on_save: Callable[[nn.Module, Path], None] | None = None


_HOOKS: dict[str, DirectoryHook] = {}


def register_hook(hook: DirectoryHook) -> None:
    """Make `read_model` apply `hook` to every directory holding `hook.file`."""
    _HOOKS[hook.file] = hook


def declared_hooks(directory: str | Path) -> list[DirectoryHook]:
    """The registered hooks whose file `directory` holds."""
    return [hook for file, hook in _HOOKS.items() if (Path(directory) / file).is_file()]


def save_model(directory: str | Path, model: LanguageModel, tokenizer: Tokenizer | None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory / CONFIG)
    # A tied weight (the output projection that is the embedding) is stored once: safetensors
    # forbids two names for one tensor.
    aliases = tied_aliases(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k not in aliases and not is_adapter_tensor(k)}
    save_safetensors(state, directory / WEIGHTS, metadata={"format": "pt"})
    for hook in _HOOKS.values():
        if hook.on_save is not None:
            hook.on_save(model, directory)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that are another, earlier name's very tensor (a tied output
    projection): alias -> the name it repeats."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def is_adapter_tensor(name: str) -> bool:
    """Whether a state-dict name is a LoRA adapter's (saved in the adapter files, not with
    the model's weights)."""
    return any(part in name for part in _ADAPTER_TENSORS)


def directory_bytes(directory: str | Path) -> int:
    """Size on disk of the files in a directory."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and half-written or
    half-deleted directories are ignored; see `lmforge.train.checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.name.startswith("step_") and (p / CHECKPOINT_DONE).is_file())


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def resolve_model_dir(path: str | Path) -> Path:
    """A model or adapter directory for `path`: itself, or a run directory's latest
    checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model or run directory: {path}")
    if is_model_dir(path) or is_adapter_dir(path):
        return path
    checkpoints = checkpoint_dirs(path)
    latest = checkpoints[-1] if checkpoints else path
    if is_sharded_checkpoint(latest):
        raise ShardedCheckpoint(
            f"{latest} is a sharded checkpoint (parallel: fsdp): make a model directory of it "
            f"first with `lmforge export {path} --format lmforge --out DIR` (it reads the run's "
            "recipe, so the run's data and base model must be where they were)")
    if checkpoints:
        return latest
    raise FileNotFoundError(
        f"{path} holds neither a model ({CONFIG} + {WEIGHTS}), a LoRA adapter "
        f"({ADAPTER_CONFIG}) nor a run's {CHECKPOINTS}/"
    )


def read_config(directory: str | Path) -> ModelConfig | Seq2SeqConfig:
    """The model config of a model directory, of any family."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}: expected a {CONFIG}")
    return load_config(path)


def read_tokenizer(directory: str | Path) -> Tokenizer | None:
    path = Path(directory) / TOKENIZER
    return Tokenizer.load(path) if path.is_file() else None


def read_generation_config(directory: str | Path) -> dict:
    path = Path(directory) / GENERATION_CONFIG
    return read_json_object(path) if path.is_file() else {}


def read_image_settings(directory: str | Path) -> dict | None:
    """The Hugging Face image processor settings a model directory keeps, if any."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    return read_json_object(path) if path.is_file() else None


def save_image_settings(directory: str | Path, processor: ImageProcessor | None) -> None:
    """Keep how a model sees images beside it: an Idefics3 processor's settings, written as
    transformers writes them; for any other (lmforge's square view needs none) a stale file
    of an earlier model in `directory` goes."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    if isinstance(processor, Idefics3Preprocess):
        path.write_text(json.dumps(processor.to_hf(), indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


def copy_settings(source: str | Path, out: str | Path) -> None:
    """The files beside a model's weights that say how to run it (stop tokens, image
    processing) from directory `source` into `out`, for commands that rewrite the weights."""
    for name in (GENERATION_CONFIG, PREPROCESSOR_CONFIG):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(out) / name)


def load_weights(model: LanguageModel, weights_file: str | Path, assign: bool = False) -> None:
    """Load safetensors weights into `model` (see `load_state`)."""
    load_state(model, load_safetensors(weights_file), str(weights_file), assign)


def load_state(model: LanguageModel, state: dict[str, torch.Tensor], where: str,
               assign: bool = False) -> None:
    """Load a state dict with our names into `model`, naming any tensor that does not fit.

    assign=True adopts the given tensors instead of copying into the model's own (for a
    model built on the meta device: no second copy of the weights is ever made).
    """
    # Tied weights may be stored once (our files) or twice (some converters).
    for alias, name in tied_aliases(model).items():
        if name in state:
            state[alias] = state[name]
    # Adapters on the model are loaded from their own files (lmforge.lora.load_adapter).
    expected = {k: v for k, v in model.state_dict().items() if not is_adapter_tensor(k)}
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: checkpoint has {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointMismatch(
            f"the weights in {where} do not fit this model config ({shown}). "
            "Load them with the config.json saved beside them, or start a fresh run directory."
        )
    # Every name was checked above; only the adapters' are missing, on purpose.
    model.load_state_dict(state, assign=assign, strict=False)
    model.tie_weights()


@contextlib.contextmanager
def _no_weight_init():
    """Skip random initialisation while building a model whose weights are about to be loaded.

    On the meta device the init functions are decomposed in Python, and the first call
    imports torch's compiler stack: two seconds of a cold start spent on numbers nobody
    reads. (transformers skips initialisation on load for the same reason.)
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def read_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LanguageModel:
    """The model (in eval mode) saved in model directory `directory`, with the weights-shaping
    hooks it declares applied (see `DirectoryHook`; `after_weights` hooks are the caller's)."""
    directory = Path(directory)
    if is_adapter_dir(directory) and not is_model_dir(directory):
        raise ConfigError(f"{directory} holds a LoRA adapter, not a model: open it with "
                          "open_model (which loads its base), or fold it in with `lmforge merge`")
    cfg = read_config(directory)
    hooks = declared_hooks(directory)
    with torch.device("meta"), _no_weight_init():
        model = build_model(cfg)
        for hook in hooks:
            if hook.before_weights is not None:
                hook.before_weights(model, directory)
    load_weights(model, directory / WEIGHTS, assign=True)
    model.reset_buffers()
    return model.to(device=device, dtype=dtype).eval()


def stop_token_ids(directory: str | Path, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """Tokens that end generation: the tokenizer's EOS, generation_config.json's eos ids, and
    ChatML's end of turn when the tokenizer has one (a chat fine-tune learns to say it)."""
    ids = set()
    if tokenizer is not None:
        ids.update(i for i in (tokenizer.eos_id, tokenizer.token_id("<|im_end|>")) if i is not None)
    eos = read_generation_config(directory).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))
