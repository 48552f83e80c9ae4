"""Text classification on a decoder: a linear head on the last token's hidden state.

A causal model's last position has read the whole text, so its final hidden state is the
summary the head classifies (last-token pooling; right padding never reaches it). Data is
CSV (a header row naming the columns) or JSONL, with a text and a label column
(`text_field`, `label_field`). Labels are strings; their sorted list is the head's classes.

Saved as the decoder's model directory (or a LoRA adapter, the head saved beside it as
PEFT's `modules_to_save`) plus `classifier.json` (labels) and, for a full model,
`classifier.safetensors` (the head).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.files import load_safetensors, read_json_object, save_safetensors
from lmforge.finetune.task import FinetuneTask, pad_rows, read_jsonl, split_examples
from lmforge.modeldir import (
    ADAPTER_WEIGHTS,
    CLASSIFIER_CONFIG,
    CLASSIFIER_WEIGHTS,
    DirectoryHook,
    is_adapter_dir,
    register_hook,
)
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.task import register_task


class Classifier(nn.Module):
    def __init__(self, decoder: Decoder, labels: list[str]) -> None:
        super().__init__()
        self.decoder, self.labels = decoder, list(labels)
        ref = decoder.final_norm.weight
        self.score = nn.Linear(decoder.cfg.d_model, len(labels), bias=False, device=ref.device,
                               dtype=ref.dtype)
        nn.init.normal_(self.score.weight, 0.0, decoder.cfg.init_std)

    def flops(self):
        return self.decoder.flops()

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Label logits (B, n_labels) for right-padded rows idx (B, T) of `lengths` tokens."""
        hidden = self.decoder.features(idx)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.score(last)


def read_labelled(path: str | Path, text_field: str, label_field: str
                  ) -> list[tuple[int, str, str]]:
    """(line number, text, label) for every row of a CSV or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = _csv_rows(path, text_field, label_field)
    else:
        rows = ((n, v) for n, v in read_jsonl(path))
    out = []
    for number, row in rows:
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with {text_field!r} and {label_field!r}")
        for name, what in ((text_field, "text_field"), (label_field, "label_field")):
            if name not in row or row[name] is None:
                raise ConfigError(f"{where}: no {name!r} field (found: {', '.join(map(repr, row))}); "
                                  f"name the right one with {what}=")
        text = str(row[text_field])
        if not text.strip():
            raise ConfigError(f"{where}: empty text")
        out.append((number, text, str(row[label_field])))
    return out


def _csv_rows(path: Path, text_field: str, label_field: str):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = reader.fieldnames or []
        for name, what in ((text_field, "text_field"), (label_field, "label_field")):
            if name not in columns:
                raise ConfigError(f"{path}: no column {name!r} in the header ({', '.join(columns)}); "
                                  f"name the right one with {what}= (--{what.replace('_', '-')})")
        for row in reader:
            yield reader.line_num, row


def encode_text(tokenizer: Tokenizer, text: str, context: int) -> list[int]:
    """Token ids of a text to classify (its first `context` tokens)."""
    ids = tokenizer.encode(text)
    if tokenizer.special.add_bos_token and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    return ids[:context]


def macro_f1(predicted: list[int], actual: list[int], n_labels: int) -> float:
    """Mean over classes of F1 (a class never predicted nor present counts as 0)."""
    scores = []
    for c in range(n_labels):
        tp = sum(p == c and a == c for p, a in zip(predicted, actual))
        fp = sum(p == c and a != c for p, a in zip(predicted, actual))
        fn = sum(p != c and a == c for p, a in zip(predicted, actual))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / n_labels


class ClassifyTask(FinetuneTask):
    """Cross-entropy on the label of each text; accuracy and macro-F1 on validation."""

    task_type = "SEQ_CLS"

    def read_examples(self):
        cfg = self.cfg
        train = read_labelled(cfg.data, cfg.text_field, cfg.label_field)
        if cfg.val_data:
            val = read_labelled(cfg.val_data, cfg.text_field, cfg.label_field)
        else:
            train, val = split_examples(train, cfg.val_fraction, cfg.seed)
        self.labels = sorted({label for _, _, label in train})
        if len(self.labels) < 2:
            raise ConfigError(f"{cfg.data} has {len(self.labels)} distinct label(s); a "
                              "classifier needs at least 2")
        index = {label: i for i, label in enumerate(self.labels)}
        unseen = [(n, label) for n, _, label in val if label not in index]
        if unseen:
            raise ConfigError(f"{cfg.val_data or cfg.data}:{unseen[0][0]}: label {unseen[0][1]!r} "
                              f"never appears in the training data ({', '.join(self.labels)})")

        def encode(rows):
            return [(encode_text(self.tokenizer, text, self.context), index[label])
                    for _, text, label in rows]

        return encode(train), encode(val), {"labels": len(self.labels)}

    def wrap(self, decoder: Decoder) -> nn.Module:
        return Classifier(decoder, self.labels)

    def collate(self, rows):
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        return (pad_rows([ids for ids, _ in rows], self.pad_id), lengths,
                torch.tensor([label for _, label in rows]))

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, lengths, labels = batch
        return F.cross_entropy(model(x, lengths).float(), labels)

    @staticmethod
    def count(batch) -> int:
        return len(batch[2])

    @staticmethod
    def tokens(batch) -> int:
        return int(batch[1].sum())

    @torch.no_grad()
    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        device = next(model.parameters()).device
        predicted, actual = [], []
        for batch in self.eval_batches(0, 0, 1):
            x, lengths, labels = (t.to(device) for t in batch)
            predicted += model(x, lengths).argmax(-1).tolist()
            actual += labels.tolist()
        accuracy = sum(p == a for p, a in zip(predicted, actual)) / len(actual)
        return {"val_acc": accuracy, "val_macro_f1": macro_f1(predicted, actual, len(self.labels))}

    def head_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"score.weight": model.score.weight}

    def save_head(self, directory: Path, model: nn.Module) -> None:
        (directory / CLASSIFIER_CONFIG).write_text(json.dumps(
            {"labels": self.labels, "pooling": "last"}, indent=2) + "\n")
        if self.lora is None:
            save_safetensors({"score.weight": model.score.weight.detach().contiguous().cpu()},
                             directory / CLASSIFIER_WEIGHTS)

    def load_head(self, directory: Path, model: nn.Module,
                  adapter_extra: dict[str, torch.Tensor] | None) -> None:
        labels, weight = read_head(directory)
        if labels != self.labels:
            raise CheckpointMismatch(f"{directory} classifies into {labels}, this data into "
                                     f"{self.labels}: resume on the run's own data")
        model.score.weight.data.copy_(weight)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels}


def read_head(directory: str | Path) -> tuple[list[str], torch.Tensor]:
    """Labels and head weight saved in a classifier's model or adapter directory."""
    directory = Path(directory)
    config = directory / CLASSIFIER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{directory} is not a classifier (no {CLASSIFIER_CONFIG}): "
                                "train one with `lmforge finetune MODEL --task classify`")
    labels = read_json_object(config)["labels"]
    if is_adapter_dir(directory):
        weight = load_safetensors(directory / ADAPTER_WEIGHTS)["base_model.model.score.weight"]
    else:
        weight = load_safetensors(directory / CLASSIFIER_WEIGHTS)["score.weight"]
    return labels, weight


def attach_head(decoder: nn.Module, directory: Path) -> Classifier:
    """The decoder of a classifier directory with its trained head on it."""
    labels, weight = read_head(directory)
    model = Classifier(decoder, labels)
    model.score.weight.data.copy_(weight)
    return model


register_hook(DirectoryHook(CLASSIFIER_CONFIG, after_weights=attach_head))
register_task("classify", ClassifyTask)


def load_classifier(spec: str | Path, device: str | torch.device | None = None
                    ) -> tuple[Classifier, Tokenizer]:
    """A trained classifier (eval mode) and its tokenizer, from any way of naming one."""
    opened = open_model(spec, device, dtype=torch.float32)
    if not isinstance(opened.model, Classifier):
        raise ConfigError(f"{spec} is not a classifier (no {CLASSIFIER_CONFIG}): train one with "
                          "`lmforge finetune MODEL --task classify`")
    return opened.model, opened.tokenizer


@torch.no_grad()
def predict(model: Classifier, tokenizer: Tokenizer, texts: list[str]) -> list[dict[str, float]]:
    """Label probabilities for each text, most likely first."""
    context = model.decoder.cfg.context_length
    rows = [encode_text(tokenizer, t, context) for t in texts]
    device = model.score.weight.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    x = pad_rows(rows, tokenizer.pad_id or 0).to(device)
    probs = model(x, lengths).float().softmax(-1)
    return [dict(sorted(zip(model.labels, p.tolist()), key=lambda kv: -kv[1])) for p in probs]
