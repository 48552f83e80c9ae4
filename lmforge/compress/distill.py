"""Knowledge distillation: `task=distill` trains a small student to match a frozen teacher's
next-token distributions on a corpus, with the one `Trainer`.

- The teacher is any model `open_model` reads (a registry name, a directory, a run, GGUF,
  quantized weights, an adapter on its base). It runs in eval mode under
  `torch.inference_mode`, on the fly for each batch, and never enters the optimizer or a
  checkpoint.
- The student is `student_layers` (the teacher's config with only those blocks, each copied
  from the teacher with its embedding, final norm and output projection), else `init_from`
  (a pretrained model), else `model` (a preset or mapping, trained from scratch).
- Teacher and student read the same token ids, so they must share the tokenizer: the corpus
  is prepared with the teacher's unless `tokenizer` names another, and any other tokenizer
  or vocabulary is refused.
- loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, where
  `_T` is the softmax of logits / T. The T^2 factor (Hinton et al., 2015) keeps the soft
  term's gradients the same size whatever T is, so alpha means the same at any temperature.
  With alpha = 0 the teacher does not run and a step is exactly the lm task's.
- Batches, sampling and checkpoints are the lm task's: the saved model is the student as an
  ordinary model directory (with the teacher's tokenizer and generation settings).
- Validation scores the student alone: `val_loss` is its cross-entropy, comparable with any
  lm run's, and `val_kl` its KL to the teacher at temperature 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quant import require_float
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.lora import lora_layers
from lmforge.modeldir import TOKENIZER, copy_settings, read_tokenizer
from lmforge.models.decoder import Decoder
from lmforge.open import OpenedModel, open_model, resolve_model
from lmforge.train import distributed as distr
from lmforge.train.config import TrainConfig, check_distill
from lmforge.train.distributed import Dist
from lmforge.train.lm import LanguageModelingTask, next_token_loss
from lmforge.train.task import register_task


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over positions of
    logits (..., vocab), in float32."""
    vocab = student_logits.size(-1)
    student = F.log_softmax(student_logits.float().view(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().view(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def student_from_layers(teacher: Decoder, layers: list[int]) -> Decoder:
    """A decoder of the teacher's shape holding only blocks `layers` (student block i is
    teacher block layers[i]), with the teacher's embedding, final norm and output projection:
    every weight a copy, so training the student leaves the teacher as it was."""
    student = Decoder(teacher.cfg.of_layers(layers))
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            name_in_teacher = f"blocks.{layers[int(index)]}.{rest}"
        else:
            name_in_teacher = name
        state[name] = source[name_in_teacher]
    student.load_state_dict(state)
    return student


def open_teacher(spec: str, dist: Dist, progress: bool) -> OpenedModel:
    """The frozen teacher, in float32 on the CPU (`build_model` moves it). Rank 0 pulls or
    converts it once; the others then find it cached."""
    if dist.is_main:
        resolve_model(spec, progress)
    distr.barrier(dist)
    teacher = open_model(spec, "cpu", torch.float32, progress=progress)
    if not isinstance(teacher.model, Decoder):
        raise ConfigError(f"the teacher {spec} is a {type(teacher.model).__name__} model; "
                          "distillation teaches from a decoder-only language model")
    if teacher.tokenizer is None:
        raise FileNotFoundError(f"the teacher {spec} has no {TOKENIZER}: distillation needs "
                                "the tokenizer it reads text with")
    teacher.model.requires_grad_(False)
    return teacher


class DistillTask(LanguageModelingTask):
    """The lm task's batches and checkpoints; the loss mixes KL to a teacher with
    cross-entropy (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        check_distill(cfg)
        self.dist = dist
        opened = open_teacher(cfg.teacher, dist, cfg.progress)
        self.teacher: Decoder = opened.model
        self.teacher_dir = opened.directory
        self.teacher_tokenizer = opened.tokenizer
        if cfg.tokenizer == TrainConfig.tokenizer:  # not chosen: the teacher's
            cfg = dataclasses.replace(cfg, tokenizer=str(self.teacher_dir / TOKENIZER))
        super().__init__(cfg, dist)
        if self.tokenizer.fingerprint() != self.teacher_tokenizer.fingerprint():
            raise CheckpointMismatch(
                f"the corpus {self.shards.dir} was tokenized with another tokenizer than the "
                f"teacher {cfg.teacher}'s, and distillation compares the two models token by "
                "token: give the raw text as data (it is then prepared with the teacher's "
                f"tokenizer), or prepare it with `lmforge prepare TEXT --out DIR --tokenizer "
                f"{self.teacher_dir / TOKENIZER}`")
        # The teacher's copy carries its chat template and special tokens into the student.
        self.tokenizer = self.teacher_tokenizer
        self.model_cfg = self._student_config()
        self.context = cfg.context_length or self.model_cfg.context_length
        if self.context > self.teacher.cfg.context_length:
            raise ConfigError(f"context_length {self.context} is longer than the teacher's "
                              f"context ({self.teacher.cfg.context_length}): set "
                              f"context_length={self.teacher.cfg.context_length} or less")

    def _student_config(self) -> ModelConfig:
        cfg, teacher_vocab = self.cfg, self.teacher.cfg.vocab_size
        if cfg.student_layers:
            n_teacher = self.teacher.cfg.n_layer
            outside = [i for i in cfg.student_layers if i >= n_teacher]
            if outside:
                raise ConfigError(f"student_layers {outside} are not blocks of the teacher "
                                  f"{cfg.teacher}, which has blocks 0 to {n_teacher - 1}")
            if lora_layers(self.teacher):
                raise ConfigError(f"the teacher {cfg.teacher} carries a LoRA adapter: "
                                  "student_layers copies plain weights, so fold it in first "
                                  "(`lmforge merge`) and use the merged model as the teacher")
            require_float(self.teacher, cfg.teacher, "student_layers (copying its blocks)")
            return self.teacher.cfg.of_layers(cfg.student_layers)
        student_cfg = self.model_cfg
        explicit = isinstance(cfg.model, dict) and "vocab_size" in cfg.model
        if self.base is None and not explicit:
            # Logits are compared position by position: the student's vocabulary is the
            # teacher's, padding rows included.
            student_cfg = dataclasses.replace(student_cfg, vocab_size=teacher_vocab)
        if student_cfg.vocab_size != teacher_vocab:
            student = cfg.init_from or "model.vocab_size"
            raise ConfigError(f"the student ({student}) has {student_cfg.vocab_size} tokens in "
                              f"its vocabulary and the teacher {cfg.teacher} {teacher_vocab}: "
                              "distillation compares their logits token by token, so pick a "
                              "student with the teacher's vocabulary (or remove "
                              "model.vocab_size, or use student_layers)")
        return student_cfg

    def _open_base(self) -> Decoder:
        # The student's tokenizer is checked against the teacher's first: the lm task's own
        # check (against the corpus) would advise preparing the corpus again, which cannot
        # help when the two models disagree.
        spec = self.cfg.init_from
        tokenizer = read_tokenizer(resolve_model(spec, self.cfg.progress))
        if tokenizer is None or tokenizer.fingerprint() != self.teacher_tokenizer.fingerprint():
            raise ConfigError(f"the student {spec} uses another tokenizer than the teacher "
                              f"{self.cfg.teacher}: distillation compares the two models token "
                              "by token, so pick a student of the teacher's family, or build "
                              "one from the teacher (student_layers) or from a preset (model)")
        return super()._open_base()

    def build_model(self, device: torch.device) -> nn.Module:
        if self.cfg.student_layers:
            student = student_from_layers(self.teacher, self.cfg.student_layers).to(device).train()
        else:
            student = super().build_model(device)
        self.teacher.to(device)
        return student

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        alpha, temperature = self.cfg.distill_alpha, self.cfg.distill_temperature
        if alpha == 0 or not model.training:  # validation scores the student alone
            return super().loss(model, batch)
        x, y = batch
        logits = model(x)
        with torch.inference_mode():
            teacher_logits = self.teacher(x)
        # A clone made outside inference mode is an ordinary tensor, which autograd may keep
        # for the backward pass (an inference tensor it may not).
        soft = distill_kl(logits, teacher_logits.clone(), temperature)
        return alpha * soft + (1 - alpha) * next_token_loss(logits, y)

    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        return {**super().val_metrics(model, val_loss, step), "val_kl": self.kl_to_teacher(model)}

    @torch.inference_mode()
    def kl_to_teacher(self, model: nn.Module) -> float:
        """KL(teacher || student) at temperature 1 over this run's validation batches,
        nats per token."""
        device = next(model.parameters()).device
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for x, _ in self.eval_batches(self.cfg.eval_batches, self.dist.rank, self.dist.world):
            x = x.to(device)
            kl = distill_kl(model(x), self.teacher(x), 1.0)
            total += torch.tensor([kl.item() * x.numel(), x.numel()], device=device,
                                  dtype=torch.float64)
        total = distr.all_sum(total, self.dist)
        return float(total[0] / total[1])

    def save(self, directory: Path, model: nn.Module) -> None:
        super().save(directory, model)
        copy_settings(self.teacher_dir, directory)  # stop tokens: the student chats as it does

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "teacher": self.cfg.teacher}


register_task("distill", DistillTask)
