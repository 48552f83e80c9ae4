"""LoRA: low-rank adapters on a frozen model's linear layers, saved in PEFT's format.

`apply_lora(model, LoraConfig(...))` swaps the chosen `nn.Linear` layers for `LoraLinear`,
which keeps the original weight (same parameter, same state-dict name) and adds
`lora_A` (rank x in) and `lora_B` (out x rank, zeros at first, so a fresh adapter changes
nothing). Only the adapters train. `merge_lora` folds B @ A * alpha / rank into the weights
and puts plain `nn.Linear` layers back.

On a vision-language model, adapters go on the decoder's layers and the projector's (when
the targets name them: `proj`, `up`), never on the vision encoder's, whose blocks share the
decoder's layer names: the encoder is either pretrained and frozen, or fresh and trained
whole, and an adapter would freeze a fresh one at its random weights.

An adapter directory is what PEFT writes: `adapter_config.json` + `adapter_model.safetensors`
with keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. For models in
the Llama family the names are Hugging Face's, so `peft.PeftModel.from_pretrained` puts our
adapter on the Hugging Face export of the base model (`lmforge export --format hf`). Other
shapes (GPT-2's fused attention has no separate q/k/v to adapt) keep lmforge's own names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.compress.quant import QuantLinear
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.files import load_safetensors, read_json_object, save_safetensors
from lmforge.interop.hf import hf_module_names
from lmforge.layers import linear
from lmforge.modeldir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_tensor
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM

# Every linear layer of a decoder block; "all-linear" (PEFT's name) means these.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))

    def __post_init__(self) -> None:
        if self.targets in ("all-linear", ["all-linear"]):
            self.targets = list(BLOCK_LINEARS)
        elif isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.rank < 1:
            raise ConfigError(f"lora rank must be >= 1 (got {self.rank})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """y = x W^T + b + dropout(x) A^T B^T * alpha / rank, with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        # The very same parameters as the layer replaced: names and storage are unchanged.
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        # PEFT's initialisation: A like a Linear layer's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain linear layer computing what this one does, adapter folded in."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        with torch.no_grad():
            delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
            self.weight.add_(delta.to(self.weight.dtype))
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules adapters may go on, by name: a vision-language model's decoder and
    projector (see the module docstring), any other model's every module."""
    if isinstance(model, VLM):
        return [(f"{part}.{name}", m) for part in ("text", "projector")
                for name, m in getattr(model, part).named_modules() if name]
    return list(model.named_modules())


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze `model` and put adapters on the linear layers named in cfg.targets (by their
    last name part, e.g. q_proj). Returns the adapted layers' names."""
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = adaptable_modules(model)
    chosen = [(name, m) for name, m in candidates if name.rpartition(".")[2] in cfg.targets]
    quantized = [name for name, m in chosen if isinstance(m, QuantLinear)]
    if quantized:
        raise ConfigError(f"{quantized[0]} holds quantized weights: train LoRA on the float model "
                          "and quantize after merging (`lmforge merge`, then `lmforge quantize`)")
    chosen = [(name, m) for name, m in chosen if isinstance(m, nn.Linear)]
    if not chosen:
        linears = sorted({n.rpartition(".")[2] for n, m in candidates
                          if isinstance(m, nn.Linear)})
        raise ConfigError(f"no linear layer is named any of {cfg.targets}: this model's are "
                          f"{', '.join(linears)}")
    for name, module in chosen:
        _replace(model, name, LoraLinear(module, cfg.rank, cfg.alpha, cfg.dropout))
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight, in place; the model is plain again."""
    for name, module in lora_layers(model).items():
        _replace(model, name, module.merged())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, by our state-dict names."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_tensor(k)}


# ---------------------------------------------------------------------------------------------
# PEFT's files


def _peft_names(model: nn.Module):
    """Our module name -> the name PEFT keys its adapter by (Hugging Face's for the Llama
    family, ours otherwise: a vision-language model's included)."""
    names = hf_module_names(model.cfg) if isinstance(model, Decoder) else None
    return names or (lambda name: name)


def save_adapter(directory: str | Path, model: nn.Module, cfg: LoraConfig, base: str,
                 extra: dict[str, torch.Tensor] | None = None,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's layout).

    base: how to find the base model again (registry name or path), PEFT's
    base_model_name_or_path. extra: more trained tensors by our names (a classifier head),
    listed as PEFT's modules_to_save.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_name = _peft_names(model)
    tensors = {}
    for key, value in lora_state(model).items():
        layer, _, rest = key.partition(".lora_")
        tensors[_PEFT_PREFIX + peft_name(layer) + ".lora_" + rest] = value
    for key, value in (extra or {}).items():
        tensors[_PEFT_PREFIX + key] = value
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                     directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    modules_to_save = sorted({k.rpartition(".")[0] for k in extra}) if extra else None
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": modules_to_save, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> tuple[LoraConfig, dict]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter directory (no {ADAPTER_CONFIG})")
    raw = read_json_object(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointMismatch(f"{path} is a {raw['peft_type']} adapter; lmforge loads LoRA")
    if raw.get("use_dora") or raw.get("use_rslora") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointMismatch(f"{path} uses DoRA, rsLoRA or per-layer ranks, which lmforge "
                                 "does not implement")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):  # PEFT allows a regex or "all-linear"
        targets = list(BLOCK_LINEARS) if targets == "all-linear" else [targets]
    return LoraConfig(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
                      targets), raw


def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, torch.Tensor]:
    """Put the adapter in `directory` on `model` (applying LoRA first if it has none).

    Returns the tensors saved beside the adapters (modules_to_save), by our names.
    """
    cfg, raw = read_adapter_config(directory)
    if not lora_layers(model):
        apply_lora(model, cfg)
    # Keys may use Hugging Face's layer names (the Llama family, as PEFT writes them) or ours.
    peft_name = _peft_names(model)
    ours = {_PEFT_PREFIX + prefix: name for name in lora_layers(model)
            for prefix in (name, peft_name(name))}
    state = load_safetensors(Path(directory) / ADAPTER_WEIGHTS)
    adapters, extra = {}, {}
    for key, value in state.items():
        layer, sep, rest = key.partition(".lora_")
        if sep:
            if layer not in ours:
                raise CheckpointMismatch(f"the adapter in {directory} has {key}, which matches no "
                                         "adapted layer of this model: is it for another base?")
            # PEFT may keep the adapter's name ("default") in the key.
            rest = rest.replace(".default.", ".")
            adapters[f"{ours[layer]}.lora_{rest}"] = value
        else:
            extra[key.removeprefix(_PEFT_PREFIX)] = value
    expected = lora_state(model)
    problems = [f"missing {k}" for k in expected if k not in adapters]
    problems += [f"{k}: adapter has {tuple(adapters[k].shape)}, model expects {tuple(v.shape)}"
                 for k, v in expected.items() if k in adapters and adapters[k].shape != v.shape]
    if problems:
        raise CheckpointMismatch(f"the adapter in {directory} does not fit this model ("
                                 + "; ".join(problems[:3]) + "): load it onto the base model it "
                                 f"was trained from ({raw.get('base_model_name_or_path')})")
    model.load_state_dict(adapters, strict=False)
    return extra
