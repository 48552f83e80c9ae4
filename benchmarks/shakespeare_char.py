"""nanoGPT's CPU Shakespeare recipe, and lmforge's faster one, against nanoGPT itself.

    python benchmarks/shakespeare_char.py --nanogpt ~/src/nanoGPT        # live, same run
    python benchmarks/shakespeare_char.py --nanogpt ~/src/nanoGPT --seeds 1337 42
    python benchmarks/shakespeare_char.py              # no nanoGPT: the live HF peer only

With `--nanogpt DIR` (a checkout of github.com/karpathy/nanoGPT; not a dependency of
lmforge) the script copies nanoGPT's code into a scratch directory, prepares nanoGPT's data
with its own `data/shakespeare_char/prepare.py` from the same Tiny Shakespeare text lmforge
reads, and runs nanoGPT's README CPU command in this run, timing the whole command. Every
ratio is against that live run; nothing is compared with a figure from another day.

lmforge's runs: the nanoGPT recipe (configs/shakespeare-char.yaml: the same model, data
split, optimizer, schedule and evaluation as nanoGPT's command) and the fast recipe
(configs/shakespeare-char-fast.yaml). A run's wall time is the Trainer's construction and
fit, its own evaluations included, as nanoGPT's is its whole command; both sides prepare
their data before the clock starts. Validation loss is reported on nanoGPT's yardstick (20
random batches) where a recipe evaluates that way, and always on the whole validation split.

Without --nanogpt the script says so and times transformers' GPT2LMHeadModel of the same
shape on the same loop in the same process (a live peer), printing lmforge's ms/iteration
against it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F
from corpora import tiny_shakespeare

from lmforge.data.loader import TokenShards, train_batch
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.paths import cache_dir
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"nanogpt": ROOT / "configs" / "shakespeare-char.yaml",
           "fast": ROOT / "configs" / "shakespeare-char-fast.yaml"}
# nanoGPT's README command for a CPU (its "I only have a macbook" section, as measured for
# lmforge's baselines): 2,000 iterations of 12 x 64 tokens, evaluation on 20 batches.
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_TOKENS = 2000 * 12 * 64


def prepared_corpus() -> Path:
    return prepare(PrepareConfig(inputs=[str(tiny_shakespeare())], out_dir=str(cache_dir() / "bench" /
                                 "shakespeare-char"), tokenizer="char", byte_fallback=False,
                                 val_fraction=0.1), progress=False)


def run_nanogpt(checkout: Path, text: Path) -> dict:
    """nanoGPT's own train.py in a scratch copy of its code, on its own prepared data (its
    seed is 1337, fixed in train.py)."""
    for needed in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                   "data/shakespeare_char/prepare.py"):
        if not (checkout / needed).is_file():
            sys.exit(f"{checkout} is not a nanoGPT checkout (no {needed}): "
                     "git clone https://github.com/karpathy/nanoGPT")
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work = Path(tmp)
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(checkout / name, work / name)
        shutil.copytree(checkout / "config", work / "config")
        data = work / "data" / "shakespeare_char"
        data.mkdir(parents=True)
        shutil.copy(checkout / "data/shakespeare_char/prepare.py", data / "prepare.py")
        shutil.copy(text, data / "input.txt")  # prepare.py reads it instead of downloading
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True,
                       capture_output=True, text=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py", *NANOGPT_ARGS],
                              cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"nanoGPT's train.py failed:\n{done.stderr[-2000:]}")
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", done.stdout)
    iters = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms",
                                            done.stdout)]
    return {"run": "nanoGPT (its own train.py)", "seed": 1337, "wall_s": wall,
            "ms_per_iter": median(iters), "tokens_per_s": NANOGPT_TOKENS / wall,
            "val_loss": float(vals[-1][1]), "whole_val_loss": None}


def run_recipe(name: str, seed: int, data: Path, out: Path) -> dict:
    overrides = [f"data={data}", f"out_dir={out / f'{name}-{seed}'}", f"seed={seed}",
                 "progress=false", "sample_tokens=0", "log_interval=50"]
    cfg = load_recipe(RECIPES[name], overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    wall = time.perf_counter() - start
    # A recipe that evaluates on the whole split has just done so, inside its wall time.
    whole = result.final_val_loss if cfg.eval_batches == 0 else \
        trainer.evaluate(n_batches=0)["val_loss"]
    return {"run": f"lmforge {name} recipe", "seed": seed, "wall_s": wall,
            "ms_per_iter": 1000 * wall / cfg.max_steps,
            "tokens_per_s": cfg.max_steps * cfg.batch_size * trainer.context / wall,
            "val_loss": result.final_val_loss if cfg.eval_batches else None,
            "whole_val_loss": whole}


def hf_peer_ms_per_iter(data: Path, iters: int = 150) -> float:
    """Median ms/iteration of transformers' GPT-2 with nanoGPT's shape on the same loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
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
    return 1000 * median(times)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, metavar="DIR",
                        help="a nanoGPT checkout: run its train.py live, in this run")
    parser.add_argument("--only", choices=list(RECIPES), help="run one lmforge recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--out", default=str(cache_dir() / "bench" / "runs"))
    args = parser.parse_args()
    data, out = prepared_corpus(), Path(args.out) / str(time.time_ns())
    rows = []
    if args.nanogpt:
        rows.append(run_nanogpt(args.nanogpt.expanduser(), tiny_shakespeare()))
        print(f"done: nanoGPT: {rows[-1]['wall_s']:.1f} s", flush=True)
    for seed in args.seeds:
        for name in RECIPES:
            if args.only and name != args.only:
                continue
            rows.append(run_recipe(name, seed, data, out))
            print(f"done: {name} seed {seed}: {rows[-1]['wall_s']:.1f} s, whole-split val "
                  f"{rows[-1]['whole_val_loss']:.4f}", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| run | seed | wall s | ms/iter | tokens/s | val loss (20 batches) "
          "| val loss (whole split) | wall vs nanoGPT | tokens/s vs nanoGPT |")
    print("|---|---|---|---|---|---|---|---|---|")
    peer = rows[0] if args.nanogpt else None
    for r in rows:
        ratios = (f"{r['wall_s'] / peer['wall_s']:.2f}x | "
                  f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x") if peer else "- | -"
        print(f"| {r['run']} | {r['seed']} | {r['wall_s']:.1f} | {r['ms_per_iter']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {_loss(r['val_loss'])} | "
              f"{_loss(r['whole_val_loss'])} | {ratios} |")
    if not args.nanogpt:
        hf_ms = hf_peer_ms_per_iter(data)
        print("\nno nanoGPT run (pass --nanogpt DIR for one): the live peer is transformers' "
              f"GPT2LMHeadModel of the same shape on the same loop, {hf_ms:.1f} ms/iter")
        for r in rows:
            print(f"  {r['run']} seed {r['seed']}: {r['ms_per_iter'] / hf_ms:.2f}x HF's "
                  "ms/iteration")


if __name__ == "__main__":
    main()
