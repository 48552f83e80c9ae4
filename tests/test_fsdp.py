"""FSDP2 under torchrun (gloo, on CPU): the same losses as one process, sharded checkpoints
that resume on another number of ranks and consolidate into model directories, several
"nodes", and a rank that dies."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lmforge.api import consolidate, merge, open_model
from lmforge.cli import main
from lmforge.errors import CheckpointMismatch, ShardedCheckpoint
from lmforge.finetune.run import finetune_recipe
from lmforge.modeldir import checkpoint_dirs
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

from .launch import ENV, torchrun
from .test_finetune import repeat_data, separable_rows, write_jsonl
from .test_seq2seq import digit_pairs
from .test_vlm_task import colour_data

pytestmark = pytest.mark.slow

TINY_MODEL = {"preset": "shakespeare-char", "n_layer": 2, "d_model": 64, "context_length": 32}


def pretraining(corpus: Path, out: Path, **extra) -> dict:
    return dict(data=str(corpus), out_dir=str(out), model=TINY_MODEL, batch_size=4,
                max_steps=20, warmup_steps=5, lr=3e-3, eval_interval=10, eval_batches=3,
                log_interval=1, progress=False, sample_tokens=8, parallel="fsdp") | extra


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def metrics(run: Path) -> dict[tuple[int, str], float]:
    """Every loss the run logged, by (step, name)."""
    out = {}
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key in ("train_loss", "val_loss"):
            if key in record:
                out[record["step"], key] = record[key]
    return out


def assert_same(a: dict, b: dict, tolerance: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tolerance, worst


def continue_from(run: Path, step: int, into: Path) -> None:
    """A copy of `run` as it was after checkpoint `step`, to resume elsewhere."""
    (into / "checkpoints").mkdir(parents=True)
    source = run / "checkpoints" / f"step_{step:07d}"
    subprocess.run(["cp", "-r", str(source), str(into / "checkpoints")], check=True)


def test_pretraining_two_ranks_equal_one_and_checkpoints_reshard(char_corpus, tmp_path):
    one = load_recipe(None, overrides(pretraining(char_corpus, tmp_path / "one", grad_accum=2)))
    Trainer(one).fit()
    torchrun(["train", *overrides(pretraining(char_corpus, tmp_path / "two"))])
    straight = metrics(tmp_path / "two")
    assert_same(metrics(tmp_path / "one"), straight, 1e-5)
    checkpoint = checkpoint_dirs(tmp_path / "two")[-1]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["rng-0.pt", "rng-1.pt", "shards",
                                                            "trainer.json"]
    assert len(list((checkpoint / "shards").glob("*.distcp"))) == 2  # a file per rank

    # Stopped at step 10 (written in the background), resumed on 2 ranks and on 1.
    halted = pretraining(char_corpus, tmp_path / "halted", halt_at=10, async_checkpoint=True)
    torchrun(["train", *overrides(halted)])
    assert [p.name for p in checkpoint_dirs(tmp_path / "halted")] == ["step_0000010"]
    continue_from(tmp_path / "halted", 10, tmp_path / "on2")
    torchrun(["train", *overrides(pretraining(char_corpus, tmp_path / "on2")), "--resume"])
    continue_from(tmp_path / "halted", 10, tmp_path / "on1")
    with pytest.raises(CheckpointMismatch, match="grad_accum=2"):
        Trainer(load_recipe(None, overrides(pretraining(char_corpus, tmp_path / "on1"))),
                resume=True)
    Trainer(load_recipe(None, overrides(pretraining(char_corpus, tmp_path / "on1",
                                                    grad_accum=2))), resume=True).fit()
    after = {k: v for k, v in straight.items() if k[0] > 10}
    for resumed in ("on2", "on1"):
        logged = metrics(tmp_path / resumed)
        assert_same({k: v for k, v in logged.items() if k[0] > 10}, after, 1e-6)

    # What every other command reads: an ordinary model directory.
    with pytest.raises(ShardedCheckpoint, match="lmforge export"):
        open_model(tmp_path / "two")
    assert main(["export", str(tmp_path / "two"), "--format", "lmforge", "--out",
                 str(tmp_path / "model-two")]) == 0
    two = open_model(tmp_path / "model-two").model
    one = open_model(consolidate(tmp_path / "one", tmp_path / "model-one")).model
    x = torch.randint(0, one.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(two(x), one(x), atol=1e-4, rtol=1e-4)
    # Exporting to another format consolidates on the way.
    assert main(["export", str(tmp_path / "two"), "--format", "hf", "--out",
                 str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_lora_sft_two_ranks_equal_one(tmp_path, base_dir):
    data = repeat_data(tmp_path)
    # 10 steps: the two ranks' gradients are summed in another order than one rank
    # accumulates them, and at this learning rate the rounding grows (on an AMD EPYC: equal
    # to the last bit until step 8, 1e-4 apart by step 19)
    values = dict(max_steps=10, epochs=0, lr=2e-2, batch_size=4, eval_interval=5,
                  progress=False, sample_tokens=0, log_interval=1, lora_rank=8,
                  parallel="fsdp")
    Trainer(finetune_recipe(str(base_dir), str(data), None, overrides(
        values | {"out_dir": str(tmp_path / "one"), "grad_accum": 2}))).fit()
    torchrun(["finetune", str(base_dir), "--data", str(data),
              *overrides(values | {"out_dir": str(tmp_path / "two")})])
    assert_same(metrics(tmp_path / "one"), metrics(tmp_path / "two"), 1e-5)
    # Only the adapter was saved; merging consolidates it first.
    shards = FileSystemReader(checkpoint_dirs(tmp_path / "two")[-1] / "shards")
    saved = [k for k in shards.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert saved and all(".lora_" in k for k in saved)
    merged = open_model(merge(tmp_path / "two", tmp_path / "merged")).model
    tuned = open_model(consolidate(tmp_path / "one", tmp_path / "adapter")).model
    x = torch.randint(0, tuned.cfg.vocab_size, (2, 16))
    torch.testing.assert_close(merged(x), tuned(x), atol=1e-4, rtol=1e-4)


def task_recipe(task: str, tmp_path: Path, char_corpus: Path, base_dir: Path) -> dict:
    """A few steps of `task` on its own tiny data, with validation and samples."""
    common = dict(max_steps=6, warmup_steps=2, eval_interval=3, log_interval=1,
                  progress=False, sample_tokens=4, parallel="fsdp", batch_size=4)
    if task == "classify":
        data = write_jsonl(tmp_path / "labels.jsonl", separable_rows(64, 0))
        return common | dict(task="classify", init_from=str(base_dir), data=str(data),
                             lora_rank=0, lr=3e-3)
    if task == "seq2seq":
        data = digit_pairs(tmp_path / "pairs.tsv", 200, 1)
        return common | dict(task="seq2seq", data=str(data), model="transformer-tiny",
                             vocab_size=300, lr=1e-3, sample_tokens=0)
    if task == "vlm":
        return common | dict(task="vlm", data=colour_data(tmp_path, 40), model="vlm-tiny",
                             vocab_size=300, lr=3e-3, eval_batches=0)
    teacher = tmp_path / "teacher"
    Trainer(load_recipe(None, overrides(pretraining(char_corpus, teacher, max_steps=4,
                                                    parallel="ddp", eval_interval=0)))).fit()
    return common | dict(task="distill", teacher=str(checkpoint_dirs(teacher)[-1]),
                         data=str(char_corpus), model=TINY_MODEL | {"n_layer": 1}, lr=3e-3)


@pytest.mark.parametrize("task", ["classify", "seq2seq", "vlm", "distill"])
def test_every_task_trains_sharded(task, tmp_path, char_corpus, base_dir):
    values = task_recipe(task, tmp_path, char_corpus, base_dir)
    Trainer(load_recipe(None, overrides(values | {"out_dir": str(tmp_path / "one"),
                                                  "grad_accum": 2}))).fit()
    torchrun(["train", *overrides(values | {"out_dir": str(tmp_path / "two")})])
    assert_same(metrics(tmp_path / "one"), metrics(tmp_path / "two"), 1e-5)
    model = open_model(consolidate(tmp_path / "two", tmp_path / "model")).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_node(char_corpus, tmp_path):
    """Two torchrun launches rendezvous over c10d as two machines would."""
    torchrun(["train", *overrides(pretraining(char_corpus, tmp_path / "one-node"))])
    rendezvous = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                  "--rdzv-id=lmforge-test"]
    args = ["train", *overrides(pretraining(char_corpus, tmp_path / "two-nodes"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node=1",
           "-m", "lmforge.cli", *args]
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [node.wait(timeout=240) for node in nodes] == [0, 0]
    assert_same(metrics(tmp_path / "one-node"), metrics(tmp_path / "two-nodes"), 1e-6)


def test_a_killed_rank_ends_the_run_and_the_last_checkpoint_resumes(char_corpus, tmp_path):
    run = tmp_path / "run"
    values = pretraining(char_corpus, run, max_steps=100_000, eval_interval=0,
                         checkpoint_interval=5, sample_tokens=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmforge.cli", "train", *overrides(values)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(checkpoint_dirs(run)) < 2:
        time.sleep(0.2)
    victim = next(p for p in Path("/proc").iterdir() if p.name.isdigit()
                  and _is_rank(p, 1, run))
    os.kill(int(victim.name), signal.SIGKILL)
    killed = time.time()
    output, _ = proc.communicate(timeout=90)
    assert time.time() - killed < 60
    assert proc.returncode != 0
    assert "rank 1 stopped" in output, output[-3000:]
    assert "--resume" in output
    last = checkpoint_dirs(run)[-1]
    step = json.loads((last / "trainer.json").read_text())["step"]
    resumed = load_recipe(None, overrides(values | {"max_steps": step + 2, "grad_accum": 2}))
    assert Trainer(resumed, resume=True).fit().steps == step + 2


def _is_rank(proc: Path, rank: int, run: Path) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes().decode()
        environ = (proc / "environ").read_bytes().decode()
    except OSError:
        return False
    return str(run) in cmdline and "lmforge.cli" in cmdline and \
        "torch.distributed.run" not in cmdline and f"\0RANK={rank}\0" in f"\0{environ}"

