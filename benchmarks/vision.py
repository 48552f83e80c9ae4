"""Vision-language models on the generated image tasks: accuracy per task, a blind control,
training time and the vision encoder's speed.

    python examples/vision/make_data.py --out data/vision --size 64
    lmforge train configs/vision-small.yaml
    python benchmarks/vision.py runs/vision-small [more runs] --data data/vision/test.jsonl
    python benchmarks/vision.py RUN --paths engine,chat,serve   # the same answers three ways

For each model: greedy answers to every test conversation (exact match per task, character
error rate for reading text), the same with every image replaced by a blank one (answers
that come from the image fall to chance), training time from the run's metrics, and
images/s through the vision encoder and projector (batches of 64, best of 5). `--paths`
also asks every question through `lmforge chat` (`/image FILE`, the question, `/reset`, typed
on its input) and through `lmforge serve` with the `openai` client (data-URL images).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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
# The longest reply, a comparison naming both images, is 10 tokens of vlm-small's vocabulary.
MAX_TOKENS = 24


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
    return [a.strip() for a in generate_texts(model, tokenizer, prompts, MAX_TOKENS, stop_ids=opened.stop_ids,
                                              batch_size=32, images=images)]


def question(record: dict) -> str:
    content = record["messages"][-2]["content"]
    return content if isinstance(content, str) else \
        " ".join(p["text"] for p in content if p["type"] == "text")


def lmforge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *args]


def chat_answers(run: str, records: list[dict], folder: Path) -> list[str]:
    """Greedy answers typed into `lmforge chat`, one conversation per record."""
    lines = []
    for record in records:
        lines += [f"/image {folder / p}" for p in record["images"]]
        lines += [question(record), "/reset"]
    out = subprocess.run(lmforge_command("chat", run, "--temperature", "0",
                                         "--max-new-tokens", str(MAX_TOKENS)),
                         input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True).stdout
    replies = []
    for chunk in out.split("(conversation cleared)")[:len(records)]:
        said = [line.lstrip("> ").strip() for line in chunk.splitlines()]
        replies.append(" ".join(s for s in said if s and not s.startswith(("(image",
                                                                         "lmforge chat:"))))
    return replies


def served_answers(run: str, records: list[dict], folder: Path) -> list[str]:
    """Greedy answers from `lmforge serve` through the `openai` client, 8 requests at once."""
    import openai

    sys.path.insert(0, str(ROOT))
    from tests.test_serve import free_port

    port = free_port()
    server = subprocess.Popen(lmforge_command("serve", run, "--port", str(port)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"lmforge serve {run} did not start")
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id

        def ask(record: dict) -> str:
            parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                      base64.b64encode((folder / p).read_bytes()).decode()}}
                     for p in record["images"]]
            reply = client.chat.completions.create(
                model=name, temperature=0, max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": parts + [{"type": "text",
                                                                "text": question(record)}]}])
            return reply.choices[0].message.content.strip()

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(ask, records))
    finally:
        server.terminate()
        server.wait()


def answers_through(way: str, run: str, opened, records: list[dict], folder: Path) -> list[str]:
    if way == "lmforge chat":
        return chat_answers(run, records, folder)
    if way == "lmforge serve":
        return served_answers(run, records, folder)
    return answers(opened, records, folder, blank=way == "blank images")


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
    parser.add_argument("--paths", default="engine",
                        help="comma-separated: engine (batched, with the blank control), chat "
                             "(lmforge chat), serve (lmforge serve and the openai client)")
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
        paths = args.paths.split(",")
        ways = (["images", "blank images"] if "engine" in paths else []) + \
            [f"lmforge {p}" for p in ("chat", "serve") if p in paths]
        for label in ways:
            start = time.perf_counter()
            scores = score(answers_through(label, run, opened, records, data.parent), records)
            seconds = time.perf_counter() - start
            cells = " | ".join(f"{100 * scores.get(t, 0):.1f}%" for t in tasks)
            cer = f"{100 * scores['ocr_cer']:.1f}%" if "ocr_cer" in scores else "-"
            extra = (f"{minutes:.1f}" if minutes else "-", f"{speed:,.0f}") \
                if label == "images" else ("-", "-")
            print(f"| {Path(run).name} | {label} ({seconds:.0f} s) | {cells} | {cer} | "
                  f"{extra[0]} | {extra[1]} |", flush=True)


if __name__ == "__main__":
    main()
