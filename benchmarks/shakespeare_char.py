"""nanoGPT's CPU Shakespeare recipe, and lmforge's faster one, side by side.

    python benchmarks/shakespeare_char.py            # the nanoGPT recipe, then --fast's
    python benchmarks/shakespeare_char.py --only nanogpt --seeds 1337 42

The nanoGPT recipe (configs/shakespeare-char.yaml): 4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations,
AdamW lr 1e-3 (beta2 0.99, weight decay 0.1), 100 warmup steps then cosine to 1e-4, no
biases, dropout 0, validation every 250 steps on 20 batches; first 90% of
Tiny Shakespeare for training, last 10% for validation, 65 characters. The fast recipe is
configs/shakespeare-char-fast.yaml. Both are reported on nanoGPT's yardstick (20 random
validation batches) where they evaluate that way, and on the whole validation split.

The peer: nanoGPT's figures measured on this kind of machine (the README's Benchmarks section
gives the command).
Machines differ run to run, so the script also times Hugging Face's GPT2LMHeadModel on
the same loop in the same process (a live peer, measured beside nanoGPT at 0.78x its
speed) and prints every ratio against both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from corpora import tiny_shakespeare

from lmforge.data.loader import TokenShards, train_batch
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.paths import cache_dir
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# nanoGPT on this kind of machine: whole command, 2000 iterations.
NANOGPT = {"wall_s": 189.5, "ms_per_iter": 84.4, "val_loss": 1.886}
HF_SPEED_VS_NANOGPT = 0.78

RECIPES = {"nanogpt": ROOT / "configs" / "shakespeare-char.yaml",
           "fast": ROOT / "configs" / "shakespeare-char-fast.yaml"}


def prepared_corpus() -> Path:
    return prepare(PrepareConfig(inputs=[str(tiny_shakespeare())], out_dir=str(cache_dir() / "bench" /
                                 "shakespeare-char"), tokenizer="char", byte_fallback=False,
                                 val_fraction=0.1), progress=False)


def run_recipe(name: str, seed: int, data: Path, out: Path) -> dict:
    overrides = [f"data={data}", f"out_dir={out / f'{name}-{seed}'}", f"seed={seed}",
                 "progress=false", "sample_tokens=0", "log_interval=50"]
    start = time.perf_counter()
    trainer = Trainer(load_recipe(RECIPES[name], overrides))
    result = trainer.fit()
    wall = time.perf_counter() - start
    return {"recipe": name, "seed": seed, "wall_s": wall, "ms_per_iter": result.ms_per_step,
            "tokens_per_s": result.tokens_per_second, "val_loss": result.final_val_loss,
            "whole_val_loss": trainer.evaluate(n_batches=0)["val_loss"]}


def hf_peer_ms_per_iter(data: Path, iters: int = 150) -> float:
    """Median ms/iteration of transformers' GPT-2 with the same shape and loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    tokens = TokenShards(data).split("train")
    times = []
    for step in range(iters):
        x, y = train_batch(tokens, 64, 12, seed=0, step=step, slot=0)
        t = time.perf_counter()
        logits = model(x).logits
        loss = F.cross_entropy(logits.view(-1, 65), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["nanogpt", "fast"], help="run one recipe")
    parser.add_argument("--fast", action="store_true", help="same as --only fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--no-peer", action="store_true", help="skip the live HF peer timing")
    parser.add_argument("--out", default=str(cache_dir() / "bench" / "runs"))
    args = parser.parse_args()
    only = "fast" if args.fast else args.only
    data, out = prepared_corpus(), Path(args.out)
    rows = []
    for name in RECIPES:
        if only and name != only:
            continue
        for seed in args.seeds:
            rows.append(run_recipe(name, seed, data, out / str(time.time_ns())))
            print(f"done: {name} seed {seed}: {rows[-1]['wall_s']:.1f} s, "
                  f"val {rows[-1]['whole_val_loss']:.4f}", flush=True)
    hf_ms = None if args.no_peer else hf_peer_ms_per_iter(data)
    print()
    print("| run | seed | wall s | ms/iter | tokens/s | val loss (20 batches) | val loss (whole split) "
          "| wall vs nanoGPT |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| nanoGPT (measured, same machine kind) | 1337 | {NANOGPT['wall_s']:.1f} | {NANOGPT['ms_per_iter']:.1f} "
          f"| {12 * 64 / NANOGPT['ms_per_iter'] * 1000:,.0f} | {NANOGPT['val_loss']:.3f} | - | 1.00x |")
    for r in rows:
        print(f"| lmforge {r['recipe']} | {r['seed']} | {r['wall_s']:.1f} | {r['ms_per_iter']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['val_loss']:.3f} | {r['whole_val_loss']:.3f} | "
              f"{r['wall_s'] / NANOGPT['wall_s']:.2f}x |")
    if hf_ms is not None:
        nanogpt_est = hf_ms * HF_SPEED_VS_NANOGPT
        print(f"\nlive peer: transformers GPT2LMHeadModel, same shape and loop: {hf_ms:.1f} ms/iter "
              f"(so nanoGPT ~{nanogpt_est:.1f} ms/iter on this machine now, from the measured 0.78x)")
        for r in rows:
            print(f"  lmforge {r['recipe']} seed {r['seed']}: {r['ms_per_iter'] / hf_ms:.2f}x HF's "
                  f"ms/iter")


if __name__ == "__main__":
    main()
