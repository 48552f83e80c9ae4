"""The training loop: exact resume, data determinism, checkpoints, clear errors, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.loader import TokenShards, train_batch
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.modeldir import checkpoint_dirs, load_model, load_weights
from lmforge.models.decoder import Decoder
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

TINY_MODEL = {"preset": "shakespeare-char", "n_layer": 2, "d_model": 64, "context_length": 32}


def recipe(data: Path, out: Path, **overrides):
    values = dict(data=str(data), out_dir=str(out), model=TINY_MODEL, batch_size=4,
                  max_steps=40, warmup_steps=5, lr=3e-3, eval_interval=0, log_interval=1,
                  progress=False, sample_tokens=8)
    values.update(overrides)
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}


def test_resume_is_exact(char_corpus, tmp_path):
    Trainer(recipe(char_corpus, tmp_path / "straight")).fit()
    Trainer(recipe(char_corpus, tmp_path / "resumed", halt_at=20)).fit()
    assert [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step_0000020"]
    Trainer(recipe(char_corpus, tmp_path / "resumed"), resume=True).fit()
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 41))
    assert straight == resumed  # bitwise: every float identical
    assert straight[40] < straight[1] - 0.5  # and it learned something


def test_batches_are_a_function_of_seed_step_and_slot(char_corpus):
    tokens = TokenShards(char_corpus).split("train")
    a = train_batch(tokens, 16, 4, seed=1, step=7, slot=0)
    assert all(torch.equal(u, v) for u, v in zip(a, train_batch(tokens, 16, 4, 1, 7, 0)))
    for other in [(2, 7, 0), (1, 8, 0), (1, 7, 1)]:
        assert not torch.equal(a[0], train_batch(tokens, 16, 4, *other)[0])
    x, y = a
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_run_writes_checkpoint_metrics_and_plot(char_corpus, tmp_path):
    cfg = recipe(char_corpus, tmp_path / "run", max_steps=10, eval_interval=5,
                 keep_checkpoints=1)
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000010"]
    ckpt = checkpoint_dirs(run)[0]
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt",
            "trainer.json"} <= {p.name for p in ckpt.iterdir()}
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 5, 10]
    assert result.final_val_loss == vals[-1]["val_loss"] and result.final_val_bpb > 0
    model, tokenizer = load_model(run)  # a run directory loads its latest checkpoint
    assert tokenizer.vocab_size == model.cfg.vocab_size


def test_bad_config_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lrr'.*did you mean 'lr'"):
        load_recipe(None, ["lrr=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'n_head'"):
        load_recipe(None, ["model.n_heads=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*did you mean 'max_steps'"):
        load_recipe(bad)


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt; set data=PATH"):
        Trainer(recipe(missing, tmp_path / "run"))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs")
                                        .glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_recipes_load_and_read_data_inside_the_repo(path):
    cfg = load_recipe(path)
    # A clone has nothing beside it: a recipe's data lives in data/ (git ignores it; the
    # recipe's header says where to get it) or comes from data=PATH.
    assert cfg.data == "" or cfg.data.startswith("data/"), f"{path.name}: data={cfg.data}"


def test_mismatched_checkpoint_names_the_problem(char_corpus, tmp_path):
    Trainer(recipe(char_corpus, tmp_path / "run", max_steps=2)).fit()
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    wider = Decoder(ModelConfig(**{**ModelConfig.load(ckpt).to_dict(), "d_model": 96}))
    with pytest.raises(CheckpointMismatch, match=r"embed.weight: checkpoint has \(\d+, 64\), "
                                                 r"model expects \(\d+, 96\)"):
        load_weights(wider, ckpt / "model.safetensors")
    deeper = recipe(char_corpus, tmp_path / "run", max_steps=4,
                    model={**TINY_MODEL, "n_layer": 3})
    with pytest.raises(CheckpointMismatch, match="n_layer: checkpoint 2, recipe 3"):
        Trainer(deeper, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(recipe(char_corpus, tmp_path / "run"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(char_corpus, tmp_path):
    cfg = recipe(char_corpus, tmp_path / "run", max_steps=6, halt_at=3)
    Trainer(cfg).fit()
    trainer = Trainer(recipe(char_corpus, tmp_path / "run", max_steps=6), resume=True)
    with torch.no_grad():
        trainer.model.embed.weight[0, 0] = float("nan")
    from lmforge.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="step_0000003"):
        trainer.fit()
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(char_corpus, tmp_path):
    """torchrun x2 (gloo) and 1 process x 2 accumulation steps see the same global batch."""
    common = dict(max_steps=8, eval_interval=4, eval_batches=4)
    single = recipe(char_corpus, tmp_path / "single", grad_accum=2, **common)
    Trainer(single).fit()
    overrides = [f"{k}={json.dumps(v)}" for k, v in dict(
        data=str(char_corpus), out_dir=str(tmp_path / "ddp"), model=TINY_MODEL, batch_size=4,
        warmup_steps=5, lr=3e-3, log_interval=1, progress=False, sample_tokens=8,
        **common).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmforge.cli", "train", *overrides]
    subprocess.run(cmd, check=True, env=env, timeout=240)
    one, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(char_corpus, tmp_path):
    """SIGINT mid-run: the step in progress finishes, a checkpoint is written, exit is clean."""
    import signal
    import time

    run = tmp_path / "run"
    overrides = [f"{k}={json.dumps(v)}" for k, v in dict(
        data=str(char_corpus), out_dir=str(run), model=TINY_MODEL, batch_size=4,
        max_steps=100_000, eval_interval=0, log_interval=1, progress=False,
        sample_tokens=0).items()]
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "train", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text()) > 200):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "interrupted: saved step" in output and "--resume" in output
    [ckpt] = checkpoint_dirs(run)
    saved_step = json.loads((ckpt / "trainer.json").read_text())["step"]
    assert saved_step == max(train_losses(run))  # the checkpoint is the last finished step
    Trainer(recipe(char_corpus, run, max_steps=saved_step + 3), resume=True).fit()
    assert checkpoint_dirs(run)[-1].name == f"step_{saved_step + 3:07d}"


def test_a_half_written_checkpoint_is_never_taken_for_the_latest(char_corpus, tmp_path):
    from lmforge.modeldir import resolve_model_dir

    run = tmp_path / "run"
    Trainer(recipe(char_corpus, run, max_steps=2, halt_at=1)).fit()
    # A crash while writing step 2 leaves only its temporary directory behind.
    stale = run / "checkpoints" / ".tmp-step_0000002"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert resolve_model_dir(run).name == "step_0000001"
    Trainer(recipe(char_corpus, run, max_steps=2), resume=True).fit()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000001", "step_0000002"]
    assert not stale.exists()


def test_schedules_warm_up_then_follow_their_shape():
    from lmforge.train.schedule import lr_at

    args = dict(lr=1.0, min_lr=0.1, warmup=10, total=100)
    for kind in ("cosine", "wsd", "constant", "inverse-sqrt"):
        warm = [lr_at(s, kind=kind, **args) for s in range(10)]
        assert warm == sorted(warm) and warm[-1] < 1.0
        assert lr_at(10, kind=kind, **args) == pytest.approx(1.0, rel=0.1)
    assert lr_at(100, kind="cosine", **args) == pytest.approx(0.1)
    assert lr_at(39, kind="inverse-sqrt", **args) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_at(10**6, kind="inverse-sqrt", **args) == 0.1  # floored at min_lr
    with pytest.raises(ConfigError, match="did you mean 'inverse-sqrt'"):
        load_recipe(None, ["schedule=inverse_sqrt"])
