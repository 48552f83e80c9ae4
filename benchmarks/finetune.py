"""Fine-tuning SmolLM2-135M-Instruct on this CPU: peak memory and training tokens/s,
lmforge (full and LoRA) vs transformers' `Trainer` (full, and LoRA through peft).

    python benchmarks/finetune.py                                  # all four, 3 + 20 steps
    python benchmarks/finetune.py --steps 3 --configs lmforge-full,lmforge-lora

Data: the date-conversion chats of examples/finetune_dates (4,000 generated into a temp dir,
or --data FILE). Every configuration trains fp32 with AdamW, the same learning rate and
schedule, on the same batches in the same order (lmforge's seeded shuffle), each conversation
as the same token ids with the loss on the assistant's tokens only (`lmforge.finetune.sft`),
right-padded to the longest in its batch. LoRA: rank 16, alpha 32, no dropout, on
q/k/v/o/gate/up/down_proj. lmforge runs its own `Trainer` on a `finetune_recipe`; the peer is
`transformers.Trainer` on the Hugging Face export of the same weights (`peft.get_peft_model`
for LoRA), its rows skipped when transformers, peft or accelerate is missing.

Each configuration runs in a fresh process, so its peak RSS (`ru_maxrss`) is its own: loading,
data, training. lmforge's final checkpoint save (the peer saves nothing) happens after the
figure is taken; the table notes how much higher the peak is once it is written. RSS also
holds what glibc's malloc keeps after tensors are freed (often hundreds of MB here); prefix the
command with MALLOC_MMAP_THRESHOLD_=65536 to have it return large blocks, so RSS follows the
live tensors. Tokens/s: non-padding input tokens of the timed steps (after --warmup untimed
ones) per second, the best of --repeats rounds (the highest peak RSS of them is shown).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing heavy is imported here: a child process starts with its parent's RSS as its
# ru_maxrss (Linux carries it across fork and exec), so the parent must stay small. The
# workers import torch, lmforge and transformers themselves.

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
MAKE_DATA = REPO / "examples" / "finetune_dates" / "make_data.py"
HF_CACHE = Path("~/.cache/lmforge/bench/smollm2-hf").expanduser()
CONFIGS = ("lmforge-full", "lmforge-lora", "hf-full", "hf-lora")
PEERS = {"lmforge-full": "hf-full", "lmforge-lora": "hf-lora"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT = "RESULT "  # prefix of the worker's one JSON line on stdout


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


# Worker side -------------------------------------------------------------------------------


def recipe(args: argparse.Namespace, lora: bool, out_dir: Path):
    """The TrainConfig both libraries train with (the peer reads its settings from it)."""
    from lmforge.finetune.run import finetune_recipe

    overrides = [f"max_steps={args.warmup + args.steps}", f"batch_size={args.batch_size}",
                 f"lora_rank={16 if lora else 0}", "lora_alpha=32", "lora_dropout=0",
                 f"lora_targets={','.join(TARGETS)}", f"context_length={args.max_length}",
                 "truncate=true", "epochs=0", "val_fraction=0", "eval_interval=0",
                 "sample_tokens=0", "progress=false", f"out_dir={out_dir}", "log_interval=1",
                 "checkpoint_interval=1000000", "precision=fp32", "device=cpu",
                 f"grad_checkpointing={str(args.grad_checkpointing).lower()}"]
    return finetune_recipe(NAME, str(args.data), None, overrides)


def step_batches(cfg, examples: list) -> list[list]:
    """The examples of each step, in the order lmforge's trainer reads them."""
    from lmforge.finetune.task import example_indices

    return [[examples[i] for i in example_indices(len(examples), cfg.batch_size, cfg.seed,
                                                  step, 0, 1)]
            for step in range(cfg.max_steps)]


def timed_tokens(batches: list[list], warmup: int) -> int:
    return sum(len(x) for batch in batches[warmup:] for x, _ in batch)


def run_lmforge(args: argparse.Namespace, lora: bool, out_dir: Path) -> dict:
    import lmforge.api  # noqa: F401  (registers task=sft)
    from lmforge.train.trainer import Trainer

    class MeasuredTrainer(Trainer):
        # The peak is read before the final checkpoint is written: the peer saves nothing.
        def _save(self):
            self.training_peak = peak_rss_mb()
            return super()._save()

    cfg = recipe(args, lora, out_dir)
    trainer = MeasuredTrainer(cfg)
    trainer.fit()
    steps = {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").open())
             if "train_loss" in r}
    start = steps[args.warmup] if args.warmup else {"time": 0.0, "tokens": 0}
    end = steps[cfg.max_steps]
    return {"peak_rss_mb": trainer.training_peak, "seconds": end["time"] - start["time"],
            "tokens": timed_tokens(step_batches(cfg, trainer.task.examples), args.warmup),
            "counted_tokens": end["tokens"] - start["tokens"], "first_loss": steps[1]["train_loss"]}


def chat_rows(cfg) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per conversation, as lmforge's chat task makes them."""
    from lmforge.config import ModelConfig
    from lmforge.finetune.sft import IGNORE, encode_conversation, read_conversations, training_row
    from lmforge.interop.hub import resolve_model
    from lmforge.tokenizer import Tokenizer

    model_dir = resolve_model(NAME)
    tokenizer = Tokenizer.load(model_dir / "tokenizer.json")
    limit = ModelConfig.load(model_dir / "config.json").context_length
    context = min(cfg.context_length or limit, limit)
    rows = []
    for _, messages in read_conversations(cfg.data):
        ids, scored = encode_conversation(tokenizer, messages)
        x, y = training_row(ids[:context + 1], scored[:context + 1])
        if any(t != IGNORE for t in y):
            rows.append((x, y))
    return rows


def run_hf(args: argparse.Namespace, lora: bool, out_dir: Path) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lmforge.finetune.sft import IGNORE
    from lmforge.finetune.task import pad_rows

    cfg = recipe(args, lora, out_dir)
    batches = step_batches(cfg, chat_rows(cfg))
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.config.use_cache = False  # training: no KV cache to build
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(TARGETS), task_type="CAUSAL_LM"))

    def collate(rows):
        y = pad_rows([y for _, y in rows], IGNORE)
        # Targets are already shifted: `shift_labels` makes the loss use them as they are.
        return {"input_ids": pad_rows([x for x, _ in rows], 0), "labels": y, "shift_labels": y}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.start, self.ends, self.losses = time.perf_counter(), [], []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

        def on_log(self, *_, logs=None, **__):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    hf_args = TrainingArguments(
        output_dir=str(out_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2, max_grad_norm=cfg.grad_clip, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": cfg.min_lr},
        optim="adamw_torch", train_sampling_strategy="sequential", seed=cfg.seed,
        logging_strategy="steps", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        remove_unused_columns=False, label_names=["labels"],
        activation_checkpointing=args.grad_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False})
    clock = Clock()
    # One example per item, in step order: the sequential sampler cuts the same batches.
    Trainer(model=model, args=hf_args, train_dataset=[row for batch in batches for row in batch],
            data_collator=collate, callbacks=[clock]).train()
    start = clock.ends[args.warmup - 1] if args.warmup else clock.start
    return {"peak_rss_mb": peak_rss_mb(), "seconds": clock.ends[-1] - start,
            "tokens": timed_tokens(batches, args.warmup), "first_loss": clock.losses[0]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = run_lmforge if args.worker.startswith("lmforge") else run_hf
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, args.worker.endswith("lora"), Path(tmp) / "run")
    result.update(threads=torch.get_num_threads(), exit_peak_rss_mb=peak_rss_mb())
    print(RESULT + json.dumps(result), flush=True)


def export_worker(out: Path) -> None:
    from lmforge.interop.hf import export_hf
    from lmforge.interop.hub import resolve_model

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_hf(resolve_model(NAME), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# Parent side -------------------------------------------------------------------------------


def child(args: argparse.Namespace, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, __file__, "--data", str(args.data), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--threads", str(args.threads),
           "--hf-dir", str(args.hf_dir), *extra]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    return subprocess.run(cmd, stdout=subprocess.PIPE, text=True)


def measure(args: argparse.Namespace, config: str) -> dict | None:
    print(f"{config}: training {args.warmup} + {args.steps} steps...", flush=True)
    proc = child(args, "--worker", config)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        print(f"{config} failed (exit code {proc.returncode}); its row is left out", flush=True)
        return None
    result = json.loads(lines[-1].removeprefix(RESULT))
    result["tok_s"] = result["tokens"] / result["seconds"]
    print(f"{config}: peak RSS {result['peak_rss_mb']:.0f} MB, {result['tok_s']:.0f} tokens/s, "
          f"step-1 loss {result['first_loss']:.4f}", flush=True)
    return result


def merge(old: dict | None, new: dict) -> dict:
    """Two rounds of one configuration: the faster one's figures, the higher peak RSS."""
    if old is None:
        return new
    best = dict(max(old, new, key=lambda r: r["tok_s"]))
    for key in ("peak_rss_mb", "exit_peak_rss_mb"):
        best[key] = max(old[key], new[key])
    return best


def missing_peer_packages() -> list[str]:
    return [m for m in ("transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]


def print_table(args: argparse.Namespace, results: dict[str, dict], peer_note: str) -> None:
    checkpointing = ", gradient checkpointing" if args.grad_checkpointing else ""
    rounds = f", best of {args.repeats} rounds" if args.repeats > 1 else ""
    print(f"\nSmolLM2-135M-Instruct fine-tuning, fp32, batch {args.batch_size}, {args.steps} timed "
          f"steps after {args.warmup}{rounds}, {args.threads} threads{checkpointing}{peer_note}\n")
    print("| config | peak RSS | tokens/s | RSS vs lmforge full | tokens/s vs peer | step-1 loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    full = results.get("lmforge-full")
    for config, r in results.items():
        vs_full = f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x" if full else "-"
        peer = results.get(PEERS.get(config, ""))
        vs_peer = f"{r['tok_s'] / peer['tok_s']:.2f}x" if peer else "-"
        print(f"| {config} | {r['peak_rss_mb']:.0f} MB | {r['tok_s']:.0f} | {vs_full} | {vs_peer} "
              f"| {r['first_loss']:.4f} |")
    print()
    for lib in ("lmforge", "hf"):
        if f"{lib}-full" in results and f"{lib}-lora" in results:
            ratio = results[f"{lib}-lora"]["peak_rss_mb"] / results[f"{lib}-full"]["peak_rss_mb"]
            verdict = "meets" if ratio <= 0.6 else "misses"
            print(f"{lib}: LoRA peak RSS is {ratio:.0%} of full fine-tuning's ({verdict} the "
                  "<= 60% target)")
    for config in ("lmforge-full", "lmforge-lora"):
        r = results.get(config)
        if r and r["exit_peak_rss_mb"] > 1.01 * r["peak_rss_mb"]:
            print(f"{config}: {r['exit_peak_rss_mb']:.0f} MB peak once its final checkpoint is saved")
        if r and r["counted_tokens"] != r["tokens"]:
            print(f"{config}: lmforge's own tokens/s in metrics.jsonl is "
                  f"{1 - r['counted_tokens'] / r['tokens']:.1%} lower: it leaves out every input "
                  "token equal to the pad id (here the end-of-turn token)")
    print(f"\ncommand: python {' '.join(sys.argv)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds through every configuration; tokens/s is the best")
    parser.add_argument("--max-length", type=int, default=512,
                        help="conversations are cut to this many tokens (0: the model's context)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: every core this process may use)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in backward, on both sides")
    parser.add_argument("--data", type=Path,
                        help="a chat JSONL file (default: examples/finetune_dates' generator)")
    parser.add_argument("--hf-dir", type=Path, default=HF_CACHE,
                        help="Hugging Face export of the model (made here when missing)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}: choose from {', '.join(CONFIGS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.export:
        export_worker(args.export)
        return
    if args.worker:
        worker(args)
        return
    missing = missing_peer_packages()
    configs = [c for c in args.configs if not (missing and c.startswith("hf"))]
    peer_note = ""
    if len(configs) < len(args.configs):
        peer_note = f"; transformers rows skipped ({', '.join(missing)} not installed)"
    elif any(c.startswith("hf") for c in configs):
        peer_note = "; peer: transformers.Trainer (+ peft for LoRA)"
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            subprocess.run([sys.executable, str(MAKE_DATA), "--out", tmp, "--train", "4000",
                            "--test", "300", "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
            args.data = Path(tmp) / "train.jsonl"
        if any(c.startswith("hf") for c in configs) and not (args.hf_dir / "config.json").is_file():
            print(f"exporting {NAME} to {args.hf_dir} for transformers...", flush=True)
            child(args, "--export", str(args.hf_dir)).check_returncode()
        results: dict[str, dict] = {}
        # Rounds go through every configuration, so a burst of load from elsewhere slows one
        # round of each rather than every round of one.
        for _ in range(args.repeats):
            for config in configs:
                if (result := measure(args, config)) is not None:
                    results[config] = merge(results.get(config), result)
        results = {c: results[c] for c in configs if c in results}
    print_table(args, results, peer_note)


if __name__ == "__main__":
    main()
