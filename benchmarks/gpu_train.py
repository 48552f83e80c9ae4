"""Training throughput and MFU on one NVIDIA GPU: bf16 + torch.compile, gpt2 (124M) and llama-1b.

    python benchmarks/gpu_train.py                      # both models, 40 steps each, random tokens
    python benchmarks/gpu_train.py --models gpt2 --data data/tinyshakespeare.txt --steps 100

Runs the real trainer (lmforge.train.Trainer) on each preset and prints tokens/s and model
FLOPs utilisation (6N + attention FLOPs per token against the GPU's dense bf16 peak), from
the steps after the first third (compilation and warm-up excluded). Without a CUDA GPU it
says so and exits 0.
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


# (model section, micro-batch, context): the batch a 40 GB+ GPU holds with room to spare.
SETUPS = {
    "gpt2": ({"preset": "gpt2", "vocab_size": 50304}, 16, 1024),  # vocab padded to 128s
    "llama-1b": ({"preset": "llama-1b"}, 4, 2048),
}


def throughput(name: str, steps: int, data: str | None, compile: bool, tmp: Path) -> tuple:
    model, batch, context = SETUPS[name]
    run = tmp / name
    corpus = data or str(random_corpus(tmp / f"corpus-{name}", vocab=50257))
    cfg = TrainConfig(
        data=corpus, out_dir=str(run), model=model, batch_size=batch, context_length=context,
        max_steps=steps, lr=6e-4, min_lr=6e-5, warmup_steps=10, beta2=0.95, eval_interval=0,
        eval_batches=2, sample_tokens=0, log_interval=5, compile=compile, device="cuda",
        keep_checkpoints=1, checkpoint_interval=10**9,
    )
    Trainer(cfg).fit()
    records = [r for r in map(json.loads, (run / "metrics.jsonl").open()) if "tokens_per_s" in r]
    steady = records[len(records) // 3:]  # after compilation
    tps = float(np.median([r["tokens_per_s"] for r in steady]))
    mfu = float(np.median([r.get("mfu", float("nan")) for r in steady]))
    return name, batch, context, tps, mfu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,llama-1b", help=f"of {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--data", help="text file to train on instead of random tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipping the GPU training benchmark")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(throughput(name, args.steps, args.data, not args.no_compile, Path(tmp)))
    print("\n| GPU | model | batch x context | tokens/s | MFU |\n|---|---|---|---|---|")
    for name, batch, context, tps, mfu in rows:
        print(f"| {torch.cuda.get_device_name()} | {name}, bf16, compile={not args.no_compile} "
              f"| {batch} x {context} | {tps:,.0f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
