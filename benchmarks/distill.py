"""Distillation on this CPU: a student made of every other block of SmolLM2-135M-Instruct
(15 of 30, copied from it), trained on Tiny Shakespeare for the same steps with cross-entropy
alone and with distillation from the whole model.

    python benchmarks/distill.py                 # the recipe as shipped: about 20 minutes
    python benchmarks/distill.py --steps 3       # a smoke test

Both runs are configs/distill-smollm2.yaml (`lmforge train` runs the same): the same student,
batches, optimizer and schedule; the cross-entropy run only sets distill_alpha=0. Tiny
Shakespeare is prepared with the teacher's tokenizer; its last 10% is held out. Held-out loss
(cross-entropy, nats per token) and the KL to the teacher are the Trainer's own validation
figures on the recipe's fixed held-out windows (eval_batches of them), for the untrained
student, both trained students and the teacher itself (a student of all 30 blocks). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from corpora import REPO, tiny_shakespeare

from lmforge.api import Trainer, load_recipe

RECIPE = REPO / "configs" / "distill-smollm2.yaml"


def recipe(args: argparse.Namespace, out_dir: Path, **overrides):
    values = {"data": str(tiny_shakespeare()), "out_dir": str(out_dir), "progress": False,
              "sample_tokens": 0, **overrides}
    if args.steps:
        values["max_steps"] = args.steps
    return load_recipe(RECIPE, [f"{k}={json.dumps(v)}" for k, v in values.items()] + args.set)


def trained(trainer: Trainer, label: str) -> tuple[dict[str, float], float]:
    """The run's final validation figures and its wall time (the steps, the final evaluation
    and checkpoint)."""
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    print(f"{label}: {result.steps} steps in {seconds / 60:.1f} min, {result.final_metrics}",
          flush=True)
    return result.final_metrics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: the "
                        "recipe's max_steps)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides for both runs, e.g. distill_alpha=0.9")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The teacher's row: a student of all its blocks is the teacher itself.
        teacher = Trainer(recipe(args, Path(tmp) / "teacher", student_layers=list(range(30))))
        teacher_figures = teacher.evaluate()
        del teacher
        cfg = recipe(args, Path(tmp) / "distill")
        distilled = Trainer(cfg)
        untrained = distilled.evaluate()
        kd, kd_seconds = trained(distilled, "distilled")
        del distilled
        plain = Trainer(recipe(args, Path(tmp) / "ce", distill_alpha=0.0))
        ce, ce_seconds = trained(plain, "cross-entropy only")
    rows = [("untrained student", untrained, None), ("cross-entropy only", ce, ce_seconds),
            (f"distilled (alpha {cfg.distill_alpha}, T {cfg.distill_temperature})", kd,
             kd_seconds),
            ("teacher (30 blocks, for reference)", teacher_figures, None)]
    windows = cfg.eval_batches * cfg.batch_size
    print(f"\nStudent: blocks {cfg.student_layers[0]}, {cfg.student_layers[1]}, ..., "
          f"{cfg.student_layers[-1]} of {cfg.teacher}; {cfg.max_steps} steps of "
          f"{cfg.batch_size} x {cfg.context_length} tokens; held out: {windows} windows of "
          f"{cfg.context_length} tokens from the last 10% of Tiny Shakespeare.\n")
    print("| model | held-out loss | KL to teacher | training time |")
    print("| --- | ---: | ---: | ---: |")
    for name, metrics, seconds in rows:
        took = f"{seconds / 60:.1f} min" if seconds is not None else ""
        print(f"| {name} | {metrics['val_loss']:.3f} | {metrics['val_kl']:.3f} | {took} |")
    print(f"\ncommand: python benchmarks/distill.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
