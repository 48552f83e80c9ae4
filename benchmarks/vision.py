"""Vision-language models on the generated image tasks: accuracy per task, a blind control,
training time and the vision encoder's speed.

    python examples/vision/make_data.py --out data/vision --size 64
    lmforge train configs/vision-small.yaml
    python benchmarks/vision.py runs/vision-small [more runs] --data data/vision/test.jsonl

For each model: greedy answers to every test conversation (exact match per task, character
error rate for reading text), the same with every image replaced by a blank one (answers
that come from the image fall to chance), training time from the run's metrics, and
images/s through the vision encoder and projector (batches of 64, best of 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmforge.chat import vision_chat_prompt_ids
from lmforge.eval.generation import generate_texts
from lmforge.images import load_image, tiles_of
from lmforge.models import VLM
from lmforge.open import open_model
from lmforge.train.plot import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "vision"))
from score import score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answers(opened, records: list[dict], folder: Path, blank: bool = False) -> list[str]:
    """Greedy answers to each record's question (its messages before the last answer)."""
    model, tokenizer, processor = opened.model, opened.tokenizer, opened.processor
    prompts, images = [], []
    for record in records:
        prepared = [processor.prepare(load_image(folder / p)) for p in record["images"]]
        prompts.append(vision_chat_prompt_ids(tokenizer, processor, record["messages"][:-1],
                                              prepared))
        images.append(tuple(torch.zeros_like(t) if blank else t for t in tiles_of(prepared)))
    return [a.strip() for a in generate_texts(model, tokenizer, prompts, 16, stop_ids=opened.stop_ids,
                                              batch_size=32, images=images)]


def encoder_images_per_second(model: VLM, batch: int = 64) -> float:
    size = model.cfg.vision.image_size
    pixels = torch.randn(batch, 3, size, size)
    best = float("inf")
    with torch.inference_mode():
        model.image_features(pixels)
        for _ in range(5):
            start = time.perf_counter()
            model.image_features(pixels)
            best = min(best, time.perf_counter() - start)
    return batch / best


def training_minutes(run: Path) -> float | None:
    rows = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    times = [r["time"] for r in rows if "time" in r]
    return max(times) / 60 if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="vision-language run or model directories")
    parser.add_argument("--data", default=str(ROOT / "data" / "vision" / "test.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="the first N test records")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_file():
        sys.exit(f"no test data at {data}: python examples/vision/make_data.py --out "
                 f"{data.parent}")
    records = read_records(data)[:args.limit]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    print(f"{len(records)} test conversations from {data}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| model | part | " + " | ".join(tasks) + " | ocr CER | train min | encoder img/s |")
    print("|---|---|" + "---|" * len(tasks) + "---|---|---|")
    for run in args.runs:
        opened = open_model(run, "cpu")
        if not isinstance(opened.model, VLM):
            sys.exit(f"{run} is not a vision-language model")
        minutes = training_minutes(Path(run))
        speed = encoder_images_per_second(opened.model)
        for label, blank in (("images", False), ("blank images", True)):
            start = time.perf_counter()
            scores = score(answers(opened, records, data.parent, blank), records)
            seconds = time.perf_counter() - start
            cells = " | ".join(f"{100 * scores.get(t, 0):.1f}%" for t in tasks)
            cer = f"{100 * scores['ocr_cer']:.1f}%" if "ocr_cer" in scores else "-"
            extra = (f"{minutes:.1f}" if minutes else "-", f"{speed:,.0f}") if not blank \
                else ("-", "-")
            print(f"| {Path(run).name} | {label} ({seconds:.0f} s) | {cells} | {cer} | "
                  f"{extra[0]} | {extra[1]} |", flush=True)


if __name__ == "__main__":
    main()
