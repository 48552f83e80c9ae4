"""Training memory per rank: `lmforge info --world-size N --parallel P`'s estimate against
the peak measured in real training steps, DDP and FSDP, under torchrun on this machine.

    python benchmarks/train_memory.py            # the default cases below (about 5 minutes)
    python benchmarks/train_memory.py --steps 3

Each case runs the Trainer's optimizer steps on random tokens (fp32 on CPU, gloo) while a
thread reads each rank's anonymous resident memory (RssAnon: tensors and the heap, not the
pages of libtorch's code that the first backward pass touches) every 2 ms; the peak less
what the process held before the model was built is the measured figure. The workers'
malloc hands every block over 64 KiB back to the system when it is freed
(MALLOC_MMAP_THRESHOLD_), so the figure follows the tensors alive rather than what the
allocator keeps for later (with gloo's threads, each with its own heap, that can be a
gigabyte). The table prints estimate / measured per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lmforge.config import resolve_model_config
from lmforge.train.config import TrainConfig
from lmforge.train.memory import estimate_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train import random_corpus  # noqa: E402

# (label, model section, ranks, parallel, batch size, context, gradient checkpointing)
CASES = [
    ("llama-1b, 4 of its 16 layers", {"preset": "llama-1b", "n_layer": 4}, 1, "ddp", 1, 256,
     False),
    ("llama-1b, 4 of its 16 layers", {"preset": "llama-1b", "n_layer": 4}, 2, "fsdp", 1, 256,
     False),
    ("gpt2 (124M)", {"preset": "gpt2"}, 2, "ddp", 2, 512, False),
    ("gpt2 (124M)", {"preset": "gpt2"}, 2, "fsdp", 2, 512, False),
    ("gpt2 (124M), checkpointing", {"preset": "gpt2"}, 2, "fsdp", 2, 512, True),
]


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakMemory(threading.Thread):
    """The largest RssAnon seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = memory_kib("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, memory_kib("RssAnon"))
            time.sleep(0.002)


def worker(spec: dict) -> None:
    """One rank: a few optimizer steps, then its peak memory above where it started."""
    from lmforge.train.trainer import Trainer

    cfg = TrainConfig(**spec["cfg"])
    before = memory_kib("RssAnon")
    watch = PeakMemory()
    watch.start()
    trainer = Trainer(cfg)
    for _ in range(spec["steps"]):
        trainer._train_step()  # the loop's step itself: no validation or checkpoint around it
    watch.running = False
    watch.join()
    rank = int(os.environ.get("RANK", 0))
    peak = (watch.peak - before) * 1024
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({"peak": peak}))


def measure(case: tuple, corpus: Path, scratch: Path, steps: int) -> int:
    label, model, world, parallel, batch, context, checkpointing = case
    out = scratch / f"{label}-{world}-{parallel}-{checkpointing}".replace(" ", "_")
    out.mkdir()
    cfg = dict(data=str(corpus), out_dir=str(out / "run"),
               model={**model, "vocab_size": resolve_model_config(model).vocab_size},
               batch_size=batch, context_length=context, max_steps=steps, warmup_steps=1,
               eval_interval=0, sample_tokens=0, progress=False, parallel=parallel,
               grad_checkpointing=checkpointing, device="cpu")
    spec = json.dumps({"cfg": cfg, "steps": steps, "out": str(out)})
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}"]
    threads = max(1, (os.cpu_count() or 1) // world)
    subprocess.run([*launcher, __file__, "--worker", spec], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads),
                        "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    return max(json.loads(f.read_text())["peak"] for f in out.glob("rank*.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = random_corpus(Path(tmp) / "corpus", vocab=50257, tokens=2_000_000)
        for case in CASES:
            label, model, world, parallel, batch, context, checkpointing = case
            cfg = resolve_model_config(model)
            estimate = estimate_memory(cfg, world, parallel, batch, context, bf16=False,
                                       grad_checkpointing=checkpointing).total
            measured = measure(case, corpus, Path(tmp), args.steps)
            rows.append((label, world, parallel, f"{batch} x {context}", estimate, measured))
            print(f"{label}: estimate {estimate / 2**30:.2f} GiB, measured "
                  f"{measured / 2**30:.2f} GiB", flush=True)
    print("\n| model | ranks | parallel | batch x context | estimate (GiB) | measured peak "
          "(GiB) | estimate / measured |\n|---|---|---|---|---|---|---|")
    for label, world, parallel, shape, estimate, measured in rows:
        print(f"| {label} | {world} | {parallel} | {shape} | {estimate / 2**30:.2f} | "
              f"{measured / 2**30:.2f} | {estimate / measured:.2f} |")


if __name__ == "__main__":
    main()
