"""GPT-2 (124M) training throughput and MFU on one NVIDIA GPU: bf16 autocast + torch.compile.

    python benchmarks/gpu_train.py                 # 60 steps of batch 16 x 1024 random tokens
    python benchmarks/gpu_train.py --data data/tinyshakespeare.txt --steps 100

Runs the real trainer (lmforge.train.Trainer) on the `gpt2` preset and prints tokens/s and
model FLOPs utilisation (6N + attention FLOPs per token against the GPU's dense bf16 peak).
Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmforge.tokenizer import train_char
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import Trainer


def random_corpus(directory: Path, vocab: int = 50257, tokens: int = 20_000_000) -> Path:
    """Random token shards in the prepared-corpus layout: throughput does not care what they say."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", tokens // 20)):
        rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(directory / f"{split}.bin")
    # Any tokenizer.json will do for sampling-free throughput runs; the model keeps vocab 50257.
    train_char("lmforge").save(directory)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": None,
            "splits": {s: {"tokens": n, "documents": 1, "bytes": n * 4}
                       for s, n in (("train", tokens), ("val", tokens // 20))}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--data", help="text file to train on instead of random tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipping the GPU training benchmark")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(random_corpus(Path(tmp) / "corpus"))
        cfg = TrainConfig(
            data=data, out_dir=str(Path(tmp) / "run"), model={"preset": "gpt2", "vocab_size": 50304},
            batch_size=args.batch_size, context_length=1024, max_steps=args.steps, lr=6e-4,
            min_lr=6e-5, warmup_steps=10, beta2=0.95, eval_interval=0, eval_batches=2,
            sample_tokens=0, log_interval=5, compile=not args.no_compile, device="cuda",
            keep_checkpoints=1,
        )
        trainer = Trainer(cfg)
        trainer.fit()
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
    steady = [r for r in records if "tokens_per_s" in r][len(records) // 3:]  # after compile
    tps = float(np.median([r["tokens_per_s"] for r in steady]))
    mfu = float(np.median([r.get("mfu", float("nan")) for r in steady]))
    print("\n| GPU | model | batch x context | tokens/s | MFU |\n|---|---|---|---|---|")
    print(f"| {torch.cuda.get_device_name()} | gpt2 (124M), bf16, compile={not args.no_compile} "
          f"| {args.batch_size} x 1024 | {tps:,.0f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
