"""Training recipes: a `TrainConfig` dataclass, read from YAML with key=value overrides.

A recipe is flat: every field of `TrainConfig` is a top-level key, except `model`, which is
a preset name or a mapping of `ModelConfig` fields (optionally with `preset:`). Overrides
on the command line use the same names: `lr=3e-4`, `model.n_layer=6`, `model=gpt2`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import (
    ModelConfig,
    closest_hint,
    from_dict,
    resolve_model_config,
    resolve_seq2seq_config,
    resolve_vlm_config,
)
from lmforge.errors import ConfigError
from lmforge.train.schedule import SCHEDULES


@dataclass
class TrainConfig:
    # What to train on and where the run lives.
    data: str = ""  # a prepared corpus dir, or text file(s)/folder/JSONL/parquet to prepare
    tokenizer: str = "bpe"  # when preparing: bpe | char | path to a tokenizer.json
    vocab_size: int = 8192  # when training a BPE tokenizer
    out_dir: str = "runs/default"
    model: Any = "shakespeare-char"  # preset name or mapping of ModelConfig fields
    seed: int = 1337

    # What is learned: lm (next-token prediction on a corpus), seq2seq (an encoder-decoder
    # on pairs), sft (chat fine-tuning on conversations), classify (a classification head on
    # the decoder), distill (a student learning a teacher's next-token distributions on a
    # corpus); see lmforge.train.task.register_task.
    task: str = "lm"
    init_from: str = ""  # start from this model (any model name or path) instead of `model`
    val_data: str = ""  # fine-tuning: a validation file; else val_fraction of `data`
    val_fraction: float = 0.1
    epochs: float = 0.0  # fine-tuning: > 0 sets max_steps to this many passes over the data
    packing: bool = False  # sft: several short conversations per row
    truncate: bool = False  # sft: cut conversations longer than the context instead of skipping
    text_field: str = "text"  # classify: the column or field holding the text
    label_field: str = "label"  # classify: the column or field holding the label
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank, the base model frozen
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"  # comma-separated layer names, e.g. q_proj,v_proj
    grad_checkpointing: bool = False  # recompute activations in backward: less memory
    source_field: str = "source"  # seq2seq JSONL: the field holding the source text
    target_field: str = "target"
    bad_lines: str = "fail"  # seq2seq: a malformed line stops the run (fail) or is skipped
    test_fraction: float = 0.0  # seq2seq: a held-out test share, besides validation
    label_smoothing: float = 0.0  # seq2seq: 0.1 in the original Transformer
    freeze: list[str] = dataclasses.field(default_factory=list)  # vlm: vision, projector, text
    lr_scales: dict[str, float] = dataclasses.field(default_factory=dict)  # part -> lr multiplier
    vision_from: str = ""  # vlm: take the vision encoder of this vision-language model
    # vlm: weight of a second loss that has each image (of a one-image conversation) name the
    # tokens of its answer straight from the encoder (`VLM.image_words`): from nothing, it
    # teaches the encoder small details such as letters, which the answers alone do not.
    vision_aux: float = 0.0
    # vlm: vision_aux names the answer's tokens in order, column by column from the left of the
    # image (a CTC loss), for reading text: on the reading task alone, 1,500 steps reached a
    # character error rate of 24% against 50% with the tokens named as a bag.
    vision_aux_columns: bool = False
    teacher: str = ""  # distill: the frozen model to learn from (any model name or path)
    # distill: the student is the teacher with only these blocks (e.g. [0, 2, 4]), copied
    # from it; else the student is `init_from` or `model`.
    student_layers: list[int] = dataclasses.field(default_factory=list)
    distill_alpha: float = 0.5  # distill: weight of the KL to the teacher; 1 - it, of cross-entropy
    # distill: both distributions are softened by it (1 = as they are, usual for language
    # models, whose next-token distributions are seldom as peaked as a classifier's).
    distill_temperature: float = 1.0

    # Batches: global batch = batch_size * grad_accum * world_size sequences of context_length.
    batch_size: int = 12
    grad_accum: int = 1
    context_length: int = 0  # 0 = the model's context length
    max_steps: int = 2000

    # Optimizer and schedule.
    optimizer: str = "adamw"  # adamw | muon (Muon for matrices, AdamW for the rest)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant | inverse-sqrt
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 = off
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per Muon update (each is 3 products)

    # Evaluation, samples, checkpoints, logs.
    eval_interval: int = 250
    eval_batches: int = 20  # 0 = the whole validation split
    sample_interval: int = 0  # 0 = only at the end
    sample_tokens: int = 200
    sample_prompt: str = ""
    checkpoint_interval: int = 0  # 0 = at every evaluation
    keep_checkpoints: int = 2
    halt_at: int = 0  # stop after this step with a checkpoint; --resume continues the run
    log_interval: int = 10

    # Hardware.
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    progress: bool = True
    # Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters,
    # gradients and optimizer state sharded across ranks, checkpoints sharded too).
    parallel: str = "ddp"
    cpu_offload: bool = False  # fsdp on GPUs: keep shards and optimizer state in host memory
    async_checkpoint: bool = False  # fsdp: write checkpoints in the background while training

    def seq2seq_model(self) -> Any:
        """The model section for a seq2seq run: pretraining's default means the seq2seq one."""
        return "transformer-small" if self.model == "shakespeare-char" else self.model

    def vlm_model(self) -> Any:
        """The model section for a vision-language run: pretraining's default means vlm-small."""
        return "vlm-small" if self.model == "shakespeare-char" else self.model

    def model_config(self) -> ModelConfig:
        return resolve_model_config(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (for example lr=3e-4)")
    key, raw = item.split("=", 1)
    return key.strip(), _parse_yaml(raw, f"override {item!r}") if raw else ""


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML ({getattr(err, 'problem', None) or err}"
                          f"{at}); fix it, quoting values that hold YAML's own characters") from err


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = dict(values)
    for item in overrides:
        key, value = _parse_override(item)
        if key.startswith("model."):
            model = values.get("model", {})
            model = {"preset": model} if isinstance(model, str) else dict(model or {})
            model[key.removeprefix("model.")] = value
            values["model"] = model
        else:
            values[key] = value
    return values


def load_recipe(path: str | Path | None, overrides: list[str] = (),
                defaults: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from `defaults` (else TrainConfig's), then a YAML recipe, then
    key=value overrides."""
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe at {path}: give a YAML file (see configs/)")
        from_file = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path} must be a mapping of keys to values")
        values.update(from_file)
    values = apply_overrides(values, list(overrides))
    where = str(path) if path else "overrides"
    cfg = from_dict(TrainConfig, values, where=where)
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}: "
                          f"{closest_hint(cfg.schedule, list(SCHEDULES))}"
                          f"schedules are {', '.join(SCHEDULES)}")
    check_distill(cfg)
    check_parallel(cfg)
    # Fail now, not an hour into the run, on a bad model key.
    if cfg.task == "seq2seq":
        if cfg.grad_checkpointing or cfg.lora_rank:
            raise ConfigError("grad_checkpointing and LoRA are for decoder-only models; "
                              "a seq2seq run trains without them")

        resolve_seq2seq_config(cfg.seq2seq_model())
    elif cfg.task == "vlm":
        resolve_vlm_config(cfg.vlm_model())
    else:
        cfg.model_config()
    return cfg


def check_parallel(cfg: TrainConfig) -> None:
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"unknown parallel={cfg.parallel!r}: "
                          f"{closest_hint(cfg.parallel, ['ddp', 'fsdp'])}use ddp or fsdp")
    if cfg.parallel != "fsdp":
        stray = [key for key in ("cpu_offload", "async_checkpoint") if getattr(cfg, key)]
        if stray:
            raise ConfigError(f"{' and '.join(stray)} only apply to parallel=fsdp: set "
                              "parallel=fsdp, or remove them")
    elif cfg.optimizer == "muon":
        raise ConfigError("optimizer=muon orthogonalises whole matrices, which fsdp splits "
                          "across ranks: use optimizer=adamw with parallel=fsdp, or parallel=ddp")


def check_distill(cfg: TrainConfig) -> None:
    """Refuse distillation settings that cannot work, before any model is read (the checks
    that need the teacher are the distill task's)."""
    if cfg.task != "distill":
        stray = [key for key in ("teacher", "student_layers") if getattr(cfg, key)]
        if stray:
            raise ConfigError(f"{' and '.join(stray)} only apply to task=distill: set "
                              "task=distill, or remove them")
        return
    if not cfg.teacher:
        raise ConfigError("task=distill needs a teacher: set teacher=MODEL (any model name or "
                          "path, e.g. smollm2-135m-instruct)")
    if not 0 <= cfg.distill_alpha <= 1:
        raise ConfigError(f"distill_alpha={cfg.distill_alpha} must be in [0, 1]: the weight "
                          "of the KL to the teacher (1 - it weighs cross-entropy)")
    if not cfg.distill_temperature > 0:
        raise ConfigError(f"distill_temperature={cfg.distill_temperature} must be > 0 "
                          "(1 = the teacher's own distribution; 2 softens it)")
    layers = cfg.student_layers
    if not isinstance(layers, list) or any(type(i) is not int or i < 0 for i in layers) \
            or sorted(set(layers)) != layers:
        raise ConfigError(f"student_layers={layers!r} must list block numbers of the teacher "
                          "in increasing order, e.g. [0, 2, 4]")
    if layers and cfg.init_from:
        raise ConfigError("student_layers and init_from both name the student: keep one")
    if layers and cfg.model != TrainConfig.model:
        raise ConfigError("student_layers builds the student from the teacher's config: remove "
                          "model (or student_layers)")
