"""Generate image-text training data for a vision-language model: seven small visual tasks.

    python examples/vision/make_data.py --out data/vision [--size 64] [--train 20000]
        [--val 500] [--test 1000] [--seed 0] [--tasks colour,shape,...] [--mix ocr=3,...]
        [--workers N]

writes OUT/{train,val,test}.jsonl and the PNG files in OUT/images/. Each line is one
conversation: {"images": [...], "messages": [user, assistant], "task": ..., "answer": ...};
the user's content is one {"type": "image"} part per image, in order, then the question as a
{"type": "text"} part; the assistant's content is the answer alone. Image paths are relative
to the JSONL file. The tasks are drawn in equal shares (in the train split, in proportion to
--mix), each conversation from its own seeded random stream, so the output depends only on
the arguments (not on --workers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mnist import Digit, digit_task, mnist_file, read_digits, split_by_image
from scenes import MIN_SIZE, TASKS, Example
from tqdm import tqdm

from lmforge.errors import ConfigError, LmforgeError

ALL_TASKS = (*TASKS, "digit")
SPLITS = ("train", "val", "test")
IMAGES = "images"


@dataclass(frozen=True)
class Job:
    """One conversation to draw: its task, random stream, file names and (digit task) image."""
    task: str
    seed: str
    images: tuple[str, ...]
    digit: Digit | None = None


def shares(n: int, weights: dict[str, float]) -> list[str]:
    """`n` task names in proportion to `weights` (to within one each), in the weights' order:
    largest remainders get the leftover places."""
    total = sum(weights.values())
    exact = {task: n * w / total for task, w in weights.items()}
    counts = {task: int(x) for task, x in exact.items()}
    by_remainder = sorted(weights, key=lambda t: (counts[t] - exact[t], list(weights).index(t)))
    for task in by_remainder[:n - sum(counts.values())]:
        counts[task] += 1
    return [task for task in weights for _ in range(counts[task])]


def plan(split: str, n: int, weights: dict[str, float], seed: int, first_image: int,
         digits: list[Digit]) -> list[Job]:
    """The split's `n` jobs: tasks in proportion to `weights` (to within one), shuffled; each
    digit job gets the next image of this split's digits in a seeded order, so repeats come
    only after every digit has been used once."""
    rng = random.Random(f"{seed}:{split}")
    order = shares(n, weights)
    rng.shuffle(order)
    digit_order = rng.sample(digits, len(digits))
    jobs, image, used = [], first_image, 0
    for index, task in enumerate(order):
        count = 2 if task == "compare" else 1
        names = tuple(f"{IMAGES}/{i:06d}.png" for i in range(image, image + count))
        digit = digit_order[used % len(digit_order)] if task == "digit" else None
        used += task == "digit"
        jobs.append(Job(task, f"{seed}:{split}:{index}", names, digit))
        image += count
    return jobs


def draw(job: Job, size: int) -> Example:
    rng = random.Random(job.seed)
    if job.task == "digit":
        return digit_task(rng, size, job.digit)
    return TASKS[job.task](rng, size)


def record(job: Job, example: Example) -> dict:
    """The JSONL line for one drawn conversation."""
    content = [{"type": "image"} for _ in job.images] + [{"type": "text", "text": example.question}]
    return {"images": list(job.images),
            "messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": example.reply or example.answer}],
            "task": job.task, "answer": example.answer}


def render(job: Job, size: int, out: Path) -> dict:
    """Draw one job, write its images under `out`, return its JSONL line."""
    example = draw(job, size)
    for name, image in zip(job.images, example.images):
        image.save(out / name)
    return record(job, example)


def clear_images(out: Path) -> None:
    """Remove the images a previous run wrote (stale ones would outlive their JSONL lines),
    but never a folder this script did not write."""
    images = out / IMAGES
    if not images.is_dir() or not any(images.iterdir()):
        return
    if not (out / "train.jsonl").is_file():
        raise ConfigError(f"{images} already holds files, and {out} has no train.jsonl, so "
                          "it was not written by this script: choose another --out")
    shutil.rmtree(images)


def make_data(out: Path, counts: dict[str, int], size: int = 64, seed: int = 0,
              tasks: Sequence[str] = ALL_TASKS, workers: int = 1, progress: bool = True,
              mix: dict[str, float] | None = None) -> None:
    """Write OUT/{split}.jsonl for each split in `counts` and their images in OUT/images.
    `mix` weighs the tasks of the train split (default 1 each); the other splits always hold
    every task in equal shares, so that their scores weigh the tasks alike."""
    tasks = list(tasks)
    mix = mix or {}
    unknown = sorted(set(mix) - set(tasks))
    if unknown:
        raise ConfigError(f"the mix names task(s) {', '.join(unknown)} that are not being "
                          f"drawn ({','.join(tasks)})")
    digits: dict[str, list[Digit]] = {split: [] for split in counts}
    if "digit" in tasks:
        rows = read_digits(mnist_file(progress))
        by_split = split_by_image([label for _, label in rows])
        digits = {split: [rows[i] for i in by_split[split]] for split in counts}
    clear_images(out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    first_image = 0
    work = partial(render, size=size, out=out)
    # leaving the pool's block terminates its workers, so Ctrl-C stops the drawing at once
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for split, n in counts.items():
            weights = {t: mix.get(t, 1.0) if split == "train" else 1.0 for t in tasks}
            jobs = plan(split, n, weights, seed, first_image, digits[split])
            first_image += sum(len(job.images) for job in jobs)
            lines = pool.imap(work, jobs, chunksize=64) if pool else map(work, jobs)
            with (out / f"{split}.jsonl").open("w") as f:
                for line in tqdm(lines, total=n, desc=split, unit="ex", disable=not progress):
                    f.write(json.dumps(line) + "\n")


def task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(ALL_TASKS))
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(ALL_TASKS)}")
    return list(dict.fromkeys(tasks))


def task_mix(text: str) -> dict[str, float]:
    """TASK=WEIGHT,... as a mapping, e.g. "ocr=3,shape=2"."""
    mix = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, weight = item.partition("=")
        task = task.strip()
        if task not in ALL_TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {task!r} in the mix; choose from "
                                             f"{','.join(ALL_TASKS)}")
        try:
            mix[task] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: write TASK=WEIGHT, e.g. ocr=3") from None
        if not mix[task] > 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight must be positive")
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=task_list, default=list(ALL_TASKS),
                        help=f"comma-separated, from {','.join(ALL_TASKS)} (default: all)")
    parser.add_argument("--mix", type=task_mix, default={},
                        help="weights of the tasks in the train split, e.g. ocr=3,shape=2 "
                             "(default 1 each; val and test always hold equal shares)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes drawing images (default: one per CPU)")
    args = parser.parse_args()
    if args.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE} (text is not legible below that)")
    if min(args.train, args.val, args.test) < 0:
        parser.error("--train, --val and --test must not be negative")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    try:
        make_data(args.out, counts, args.size, args.seed, args.tasks, max(1, args.workers),
                  mix=args.mix)
    except LmforgeError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {sum(counts.values())} conversations ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
          f"of {args.size}x{args.size} images to {args.out}")


if __name__ == "__main__":
    main()
