"""The model directory: config.json + model.safetensors + tokenizer.json (+ quantization.json
for a model with quantized weights, see `lmforge.quant`; + classifier.json for a model with a
classification head, see `lmforge.finetune.classify`).

Every command that takes a model reads it through `load_model`, which accepts a model
directory, a run directory (whose latest checkpoint is used) or a LoRA adapter directory
(`adapter_config.json`: the base model it names is loaded and the adapter put on it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lmforge.config import Seq2SeqConfig, load_config
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.files import load_safetensors, read_json_object, save_safetensors
from lmforge.finetune.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import Seq2Seq
from lmforge.quant import QUANT_FILE, QuantSpec, prepare_quantized, quantization_of
from lmforge.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"
CHECKPOINT_DONE = "trainer.json"  # written last: a directory without it is no checkpoint


def save_model(directory: str | Path, model: Decoder, tokenizer: Tokenizer | None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        # The output projection is the embedding; storing it twice is what safetensors forbids.
        state.pop("lm_head.weight")
    save_safetensors(state, directory / WEIGHTS, metadata={"format": "pt"})
    spec = quantization_of(model)
    if spec is not None:
        spec.save(directory)
    else:  # a float model saved over a quantized one must not be read as quantized
        (directory / QUANT_FILE).unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


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


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory for `path`: itself, or a run directory's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model or run directory: {path}")
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
        return path
    if (path / ADAPTER_CONFIG).is_file():
        return path
    checkpoints = checkpoint_dirs(path)
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(
        f"{path} holds neither a model (config.json + {WEIGHTS}), a LoRA adapter "
        f"({ADAPTER_CONFIG}) nor a run's checkpoints/"
    )


def load_weights(model: Decoder, weights_file: str | Path, assign: bool = False) -> None:
    """Load safetensors weights into `model` (see `load_state`)."""
    load_state(model, load_safetensors(weights_file), str(weights_file), assign)


def load_state(model: Decoder, state: dict[str, torch.Tensor], where: str,
               assign: bool = False) -> None:
    """Load a state dict with our names into `model`, naming any tensor that does not fit.

    assign=True adopts the given tensors instead of copying into the model's own (for a
    model built on the meta device: no second copy of the weights is ever made).
    """
    if model.cfg.tie_embeddings and "embed.weight" in state:
        # Tied weights may be stored once (our files) or twice (some converters).
        state["lm_head.weight"] = state["embed.weight"]
    expected = model.state_dict()
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
    model.load_state_dict(state, assign=assign)
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


def stop_token_ids(directory: str | Path, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """Tokens that end generation: the tokenizer's EOS, generation_config.json's eos ids, and
    ChatML's end of turn when the tokenizer has one (a chat fine-tune learns to say it)."""
    ids = set()
    if tokenizer is not None:
        ids.update(i for i in (tokenizer.eos_id, tokenizer.token_id("<|im_end|>")) if i is not None)
    config = resolve_model_dir(directory) / "generation_config.json"
    if config.is_file():
        eos = read_json_object(config).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))


def adapter_base(directory: str | Path) -> Path:
    """The model directory of the base model an adapter directory names."""
    from lmforge.interop.hub import resolve_model

    base = read_adapter_config(directory)[1].get("base_model_name_or_path")
    if not base:
        raise CheckpointMismatch(f"{directory}/{ADAPTER_CONFIG} names no base model "
                                 "(base_model_name_or_path): load the base and pass --adapter")
    try:
        return resolve_model(base)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the base model of the adapter in {directory} is not "
                                f"available: {err}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, adapter: str | Path | None = None
               ) -> tuple[Decoder, Tokenizer | None]:
    """Model (in eval mode) and tokenizer from a model, run or adapter directory.

    adapter: a LoRA adapter directory to put on the model (unmerged; see `merge_lora`).
    """
    directory = resolve_model_dir(path)
    if (directory / ADAPTER_CONFIG).is_file():
        if adapter is not None:
            raise ConfigError(f"{path} is itself an adapter; pass its base model with --adapter")
        model, tokenizer = load_model(adapter_base(directory), device, dtype, adapter=directory)
        own = directory / "tokenizer.json"
        return model, Tokenizer.load(own) if own.is_file() else tokenizer
    cfg = load_config(directory / "config.json")
    spec = QuantSpec.load(directory)
    with torch.device("meta"), _no_weight_init():
        model = Seq2Seq(cfg) if isinstance(cfg, Seq2SeqConfig) else Decoder(cfg)
        if spec is not None:
            prepare_quantized(model, spec)
    load_weights(model, directory / WEIGHTS, assign=True)
    model.reset_buffers()
    model = model.to(device=device, dtype=dtype)
    if adapter is not None:
        load_adapter(model, resolve_model_dir(adapter))
    tokenizer_file = directory / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_file) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer
