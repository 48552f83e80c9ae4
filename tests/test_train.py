"""The training loop: exact resume, data determinism, checkpoints, clear errors, DDP."""

import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.loader import TokenShards, train_batch
from lmforge.errors import CheckpointMismatch, ConfigError, CorruptFile, DiskFull
from lmforge.modeldir import checkpoint_dirs, load_weights, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import train_char
from lmforge.train.config import load_recipe
from lmforge.train.plot import read_metrics
from lmforge.train.trainer import Trainer

from .cli_errors import one_line_error
from .launch import torchrun

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
    opened = open_model(run)  # a run directory opens its latest checkpoint
    model, tokenizer = opened.model, opened.tokenizer
    assert tokenizer.vocab_size == model.cfg.vocab_size


def test_bad_config_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lrr'.*did you mean 'lr'"):
        load_recipe(None, ["lrr=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'n_head'"):
        load_recipe(None, ["model.n_heads=2"])
    # YAML reads 1e-6 as text; the model's float fields take it as the number it is.
    assert load_recipe(None, ["model.norm_eps=1e-6"]).model_config().norm_eps == 1e-6
    with pytest.raises(ConfigError, match="n_layer='two' must be a whole number"):
        load_recipe(None, ["model.n_layer=two"]).model_config()
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
    model = open_model(tmp_path / "run").model
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
    torchrun(["train", *overrides])
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


# --------------------------------------------------------------------------- crash safety


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory) -> Path:
    """20k characters of seeded words, prepared with the char tokenizer."""
    from lmforge.data.prepare import PrepareConfig, prepare

    rng = random.Random(0)
    words = ["the", "king", "queen", "speaks", "hear", "me", "and", "of", "to", "night", "\n"]
    root = tmp_path_factory.mktemp("word-corpus")
    (root / "words.txt").write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return prepare(PrepareConfig(inputs=[str(root / "words.txt")], out_dir=str(root / "prepared"),
                                 tokenizer="char"), progress=False)


@pytest.mark.parametrize("kill", ["deleting the old copy in place", "the old copy set aside"])
def test_a_kill_while_replacing_a_checkpoint_loses_nothing(word_corpus, tmp_path, kill):
    """A resumed run saving step 2 again is killed after writing its complete new copy."""
    run = tmp_path / "run"
    Trainer(recipe(word_corpus, run, max_steps=4, halt_at=2, keep_checkpoints=1)).fit()
    root = run / "checkpoints"
    step = root / "step_0000002"
    shutil.copytree(step, root / ".tmp-step_0000002")
    if kill == "deleting the old copy in place":
        (step / "tokenizer.json").unlink()
        (step / "model.safetensors").unlink()
    else:
        step.rename(root / ".trash-step_0000002")
    trainer = Trainer(recipe(word_corpus, run, max_steps=4, keep_checkpoints=1), resume=True)
    assert trainer.step == 2
    trainer.fit()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004"]


def test_a_kill_while_pruning_leaves_nothing_that_looks_like_a_checkpoint(word_corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(recipe(word_corpus, run, max_steps=4, halt_at=3, checkpoint_interval=1,
                   keep_checkpoints=3)).fit()
    root = run / "checkpoints"
    # Step 1 half-deleted in place (trainer.json among the first files gone), step 2 half
    # deleted after being set aside.
    (root / "step_0000001" / "trainer.json").unlink()
    (root / "step_0000001" / "model.safetensors").unlink()
    (root / "step_0000002").rename(root / ".trash-step_0000002")
    (root / ".trash-step_0000002" / "optimizer.pt").unlink()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000003"]
    Trainer(recipe(word_corpus, run, max_steps=4, keep_checkpoints=3), resume=True).fit()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000004"]


def test_a_torn_last_metrics_line_is_left_out(word_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(recipe(word_corpus, run, max_steps=4, halt_at=2)).fit()
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # killed while writing step 3's record
    capsys.readouterr()
    Trainer(recipe(word_corpus, run, max_steps=4), resume=True).fit()
    assert "metrics.jsonl:3 is an unfinished record" in capsys.readouterr().err
    assert sorted(train_losses(run)) == [1, 2, 3, 4]
    # Damage before the last line is not a kill's doing: it is named, not skipped.
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:9], *lines[2:]]) + "\n")
    with pytest.raises(CorruptFile, match=r"metrics.jsonl:2 is not a JSON record"):
        read_metrics(run)


def test_a_full_disk_while_checkpointing_is_one_clear_error(word_corpus, tmp_path,
                                                          monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    run = tmp_path / "run"
    Trainer(recipe(word_corpus, run, max_steps=4, halt_at=2)).fit()

    def full_disk(*args, **kwargs):  # what safetensors raises when the disk fills up
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    where = re.escape(str(run / "checkpoints"))
    with pytest.raises(DiskFull, match=rf"no space left on device while writing checkpoint "
                                       rf"step 4 in {where}: free some space.*--resume"):
        Trainer(recipe(word_corpus, run, max_steps=4), resume=True).fit()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    monkeypatch.undo()  # space freed: the run goes on from its last checkpoint
    Trainer(recipe(word_corpus, run, max_steps=4), resume=True).fit()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002", "step_0000004"]


def test_a_damaged_optimizer_state_is_named(word_corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(recipe(word_corpus, run, max_steps=4, halt_at=2)).fit()
    state = run / "checkpoints" / "step_0000002" / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:500])
    with pytest.raises(CorruptFile, match=r"step_0000002/optimizer.pt is damaged .*move its "
                                          r"checkpoint directory away"):
        Trainer(recipe(word_corpus, run, max_steps=4), resume=True)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask 022", "umask 027"])
def test_weights_get_the_permissions_of_the_other_files(tmp_path, umask):
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=8, context_length=8))
    previous = os.umask(umask)
    try:
        directory = save_model(tmp_path / "model", model, None)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def tiny_model_dir(directory: Path) -> Path:
    tokenizer = train_char("hello world\n")
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16,
                                vocab_size=tokenizer.vocab_size, context_length=16))
    return save_model(directory, model, tokenizer)


def damage(directory: Path, how: str) -> None:
    if how == "truncated weights":
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "cut-short tokenizer":
        (directory / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    elif how == "config not JSON":
        (directory / "config.json").write_text('{"n_layer": 1,')
    elif how == "config not an object":
        (directory / "config.json").write_text("[1, 2]")
    else:
        config = json.loads((directory / "config.json").read_text())
        config.update({"zero heads": {"n_head": 0}, "layers as text": {"n_layer": "two"}}[how])
        (directory / "config.json").write_text(json.dumps(config))


# How a model file gets damaged, and what the one-line error says.
DAMAGE_MESSAGES = {
    "truncated weights": r"model.safetensors is not a readable safetensors file",
    "cut-short tokenizer": r"tokenizer.json is not a valid tokenizer.json",
    "config not JSON": r"config.json is not valid JSON \(.* at line 1, column 15\)",
    "config not an object": r"config.json holds a JSON list",
    "zero heads": r"n_head=0 must be at least 1 \(in .*config.json\)",
    "layers as text": r"n_layer='two' must be a whole number",
}


@pytest.mark.parametrize("how", list(DAMAGE_MESSAGES))
def test_a_damaged_model_file_is_named_in_one_line(tmp_path, capsys, how):
    directory = tiny_model_dir(tmp_path / "model")
    damage(directory, how)
    assert re.search(DAMAGE_MESSAGES[how], one_line_error(capsys, "generate", str(directory),
                                                          "--max-new-tokens", "1"))


def test_too_little_text_to_train_on_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("a short text, far too short.\n")
    message = one_line_error(capsys, "train", f"data={tmp_path / 'short.txt'}", "tokenizer=char",
                             f"out_dir={tmp_path / 'run'}", "progress=false")
    assert "too few for windows of 64 + 1: use a shorter context_length or more text" in message


@pytest.mark.parametrize("args, message", [
    (["bad.yaml"], r"bad.yaml is not valid YAML \(.* at line 2, column 10\)"),
    (["lr=[1"], r"override 'lr=\[1' is not valid YAML"),
], ids=["recipe", "override"])
def test_a_recipe_that_is_not_yaml_is_a_one_line_error(tmp_path, capsys, monkeypatch, args,
                                                       message):
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\nmax_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert re.search(message, one_line_error(capsys, "train", *args))


def test_orthogonalize_takes_a_stack_of_matrices_each_on_its_own():
    from lmforge.train.optim import orthogonalize

    torch.manual_seed(0)
    stack = torch.randn(5, 64, 32)
    together = orthogonalize(stack)
    assert torch.equal(together, torch.stack([orthogonalize(g) for g in stack]))
    # Newton-Schulz's aim: every singular value near 1 (this quintic lands in about 0.7-1.2).
    values = torch.linalg.svdvals(together)
    assert values.min() > 0.6 and values.max() < 1.25


def test_muon_batched_by_shape_is_the_per_matrix_update():
    """Muon orthogonalises same-shaped matrices together; each update must still be the one
    Nesterov momentum and Newton-Schulz give that matrix alone."""
    from lmforge.train.optim import Muon, orthogonalize

    torch.manual_seed(0)
    shapes = [(16, 16), (32, 16), (16, 16), (16, 32), (32, 16)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    muon = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        muon.step()
        for i, g in enumerate(grads):  # the update written for one matrix at a time
            momenta[i].lerp_(g, 0.05)
            update = orthogonalize(g.lerp(momenta[i], 0.95))
            update *= max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
            expected[i].mul_(1 - 0.02 * 0.1).add_(update, alpha=-0.02)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)
