"""How fast a vision encoder learns from nothing: lmforge's SigLIP-style encoder against a
small convolutional network, as image classifiers on one generated task.

    python examples/vision/make_data.py --out data/vision --size 64
    python benchmarks/vision_encoder.py --task shape --steps 300

Both read the same images (the first --train examples of the task in train.jsonl) and are
scored on the first 300 of val.jsonl every 50 steps; the encoder's patch features are
mean-pooled into a linear head. A vision-language model cannot learn a task faster than its
encoder can, so this is the quick loop for the encoder's settings (`--vision key=value`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import VisionConfig, from_dict
from lmforge.images import load_image, model_pixels
from lmforge.models.vlm import VisionEncoder

ROOT = Path(__file__).resolve().parents[1]


def task_split(path: Path, task: str, limit: int, cfg: VisionConfig,
               labels: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pixels and label indices of the first `limit` single-image examples of `task`."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("task") == task and len(r["images"]) == 1][:limit]
    if not records:
        raise SystemExit(f"{path} has no single-image examples of task {task!r}")
    labels = labels or sorted({r["answer"] for r in records})
    pixels = torch.stack([model_pixels(load_image(path.parent / r["images"][0]), cfg)
                          for r in records])
    return pixels, torch.tensor([labels.index(r["answer"]) for r in records]), labels


class EncoderClassifier(nn.Module):
    def __init__(self, cfg: VisionConfig, classes: int) -> None:
        super().__init__()
        self.encoder = VisionEncoder(cfg)
        self.encoder.reset_parameters()  # as the VLM initialises it
        self.head = nn.Linear(cfg.d_model, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels).mean(1))


def small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, classes))


def train(model: nn.Module, data: tuple, val: tuple, steps: int, lr: float,
          batch: int, seed: int) -> list[tuple[int, float, float]]:
    """(step, validation accuracy, seconds) every 50 steps of AdamW with a short warmup."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99),
                                  weight_decay=0.1)
    pixels, labels = data
    rows, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50)
        pick = torch.randint(0, len(pixels), (batch,))
        loss = F.cross_entropy(model(pixels[pick]), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                accuracy = (model.eval()(val[0]).argmax(-1) == val[1]).float().mean().item()
            model.train()
            rows.append((step, accuracy, time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "vision"))
    parser.add_argument("--task", default="shape")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="the encoder's")
    parser.add_argument("--cnn-lr", type=float, default=2e-3)
    parser.add_argument("--vision", nargs="*", default=[], metavar="KEY=VALUE",
                        help="encoder settings, e.g. patch_size=4 n_layer=2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = Path(args.data)
    if not (folder / "train.jsonl").is_file():
        raise SystemExit(f"no {folder}/train.jsonl: python examples/vision/make_data.py "
                         f"--out {folder} --size 64")
    settings = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.vision)}
    cfg = from_dict(VisionConfig, settings, where="--vision")
    *data, labels = task_split(folder / "train.jsonl", args.task, args.train, cfg)
    *val, _ = task_split(folder / "val.jsonl", args.task, 300, cfg, labels)
    torch.manual_seed(args.seed)
    runs = {"encoder": train(EncoderClassifier(cfg, len(labels)), data, val, args.steps,
                             args.lr, args.batch, args.seed),
            "small CNN": train(small_cnn(len(labels)), data, val, args.steps, args.cnn_lr,
                               args.batch, args.seed)}
    print(f"{args.task}: {len(labels)} classes, {len(data[0])} training and {len(val[0])} "
          f"validation images; encoder {settings or 'vlm-small defaults'}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | " + " | ".join(f"{name} accuracy" for name in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i, (step, *_) in enumerate(runs["encoder"]):
        print(f"| {step} | " + " | ".join(f"{rows[i][1]:.1%}" for rows in runs.values()) + " |")
    print("seconds: " + ", ".join(f"{name} {rows[-1][2]:.0f}" for name, rows in runs.items()))


if __name__ == "__main__":
    main()
