"""Distillation (`task=distill`): alpha = 0 is plain cross-entropy training bit for bit, the
KL term pulls the student to the teacher, student_layers copies the right blocks, and
mismatched tokenizers or bad settings are clear errors."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.compress.distill import distill_kl
from lmforge.compress.quant import QuantSpec
from lmforge.compress.run import quantize_dir
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointMismatch, ConfigError, UnsupportedModel
from lmforge.files import load_safetensors
from lmforge.modeldir import checkpoint_dirs, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

from .conftest import SHAKESPEARE

TEACHER = {"preset": "shakespeare-char", "n_layer": 4, "d_model": 64, "context_length": 32}
STUDENT = {"preset": "shakespeare-char", "n_layer": 1, "d_model": 32, "context_length": 32}


def recipe(data, out, **overrides):
    values = dict(data=str(data), out_dir=str(out), model=STUDENT, batch_size=8,
                  max_steps=30, warmup_steps=3, lr=3e-3, eval_interval=0, eval_batches=4,
                  log_interval=1, progress=False, sample_tokens=0)
    values.update(overrides)
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def train_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}


def distill(data, out, teacher, **overrides):
    return recipe(data, out, task="distill", teacher=str(teacher), **overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, char_corpus):
    """A 4-block char model trained briefly on the corpus: a teacher with opinions."""
    run = tmp_path_factory.mktemp("teacher")
    Trainer(recipe(char_corpus, run, model=TEACHER, max_steps=60)).fit()
    return checkpoint_dirs(run)[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_corpus, teacher_dir):
    """The same student, data and steps trained three ways: the lm task, distillation with
    alpha = 0, and distillation with alpha = 1 (the KL alone, at the temperature val_kl is
    measured at); trainers after fit, and the student's validation figures before training."""
    root = tmp_path_factory.mktemp("runs")
    trainers = {"lm": Trainer(recipe(char_corpus, root / "lm")),
                "ce": Trainer(distill(char_corpus, root / "ce", teacher_dir, distill_alpha=0.0)),
                "kd": Trainer(distill(char_corpus, root / "kd", teacher_dir, distill_alpha=1.0,
                                      distill_temperature=1.0))}
    untrained = trainers["kd"].evaluate()
    results = {name: trainer.fit() for name, trainer in trainers.items()}
    return trainers, results, untrained


def test_alpha_zero_is_cross_entropy_training_bitwise(runs):
    trainers, results, untrained = runs
    lm, ce = trainers["lm"].model.state_dict(), trainers["ce"].model.state_dict()
    assert lm.keys() == ce.keys()
    assert all(torch.equal(lm[k], ce[k]) for k in lm)
    assert results["ce"].final_val_loss == results["lm"].final_val_loss
    assert results["lm"].final_val_loss < untrained["val_loss"] - 1  # and both trained


def test_distillation_lowers_the_kl_to_the_teacher(runs):
    _, results, untrained = runs
    kd, ce = results["kd"].final_metrics, results["ce"].final_metrics
    assert kd["val_kl"] < ce["val_kl"] < untrained["val_kl"]
    assert kd["val_kl"] < 0.5 * untrained["val_kl"]
    assert kd["val_loss"] < untrained["val_loss"]  # cross-entropy, the student alone


def test_checkpoint_is_the_student_alone_as_a_model_directory(runs):
    trainers, results, _ = runs
    ckpt = results["kd"].checkpoint
    student = trainers["kd"].model
    assert set(load_safetensors(ckpt / "model.safetensors")) == \
        set(student.state_dict()) - {"lm_head.weight"}  # tied: stored once
    opened = open_model(ckpt)
    assert opened.model.cfg == student.cfg
    assert opened.tokenizer.fingerprint() == trainers["kd"].task.teacher_tokenizer.fingerprint()


def test_resume_is_exact_without_the_teacher_in_checkpoints(char_corpus, teacher_dir, tmp_path):
    def run(out, **overrides):
        return distill(char_corpus, out, teacher_dir, max_steps=6, eval_batches=1, **overrides)

    Trainer(run(tmp_path / "straight")).fit()
    Trainer(run(tmp_path / "resumed", halt_at=3)).fit()
    Trainer(run(tmp_path / "resumed"), resume=True).fit()
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")


def test_cli_trains_task_distill(char_corpus, teacher_dir, tmp_path, capsys):
    args = {"task": "distill", "teacher": str(teacher_dir), "data": str(char_corpus),
            "out_dir": str(tmp_path / "run"), "model": STUDENT, "max_steps": 2,
            "eval_batches": 1, "progress": False, "sample_tokens": 0}
    assert main(["train", *(f"{k}={json.dumps(v)}" for k, v in args.items())]) == 0
    out = capsys.readouterr().out
    assert "val_kl" in out and f"next: lmforge generate {tmp_path / 'run'}" in out


def test_kl_term_carries_the_temperature_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p = torch.softmax(teacher / 2, -1)
    expected = (p * (p.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    assert torch.allclose(distill_kl(student, teacher, 2.0), expected, atol=1e-6)
    assert distill_kl(teacher, teacher, 3.0).abs() < 1e-6


def test_student_layers_copies_the_teachers_blocks(char_corpus, teacher_dir, tmp_path):
    trainer = Trainer(distill(char_corpus, tmp_path / "run", teacher_dir, model="shakespeare-char",
                              student_layers=[0, 2], max_steps=3))
    student, teacher = trainer.model, trainer.task.teacher
    assert student.cfg.n_layer == 2 and teacher.cfg.n_layer == 4
    ids = torch.randint(0, teacher.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        x, layers = teacher.block_inputs(ids)
        for i in (0, 2):
            x = teacher.blocks[i](x, *layers[i], None)
        assert torch.equal(student.eval()(ids), teacher.lm_head(teacher.final_norm(x)))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.fit()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher stays frozen
    assert not torch.equal(student.blocks[1].mlp.down_proj.weight,
                           teacher.blocks[2].mlp.down_proj.weight)
    assert open_model(tmp_path / "run").model.cfg.n_layer == 2


def test_a_quantized_teacher_teaches(char_corpus, teacher_dir, tmp_path):
    int8 = quantize_dir(teacher_dir, tmp_path / "int8", QuantSpec(8))
    result = Trainer(distill(char_corpus, tmp_path / "run", int8, max_steps=3)).fit()
    assert result.final_metrics["val_kl"] > 0
    with pytest.raises(UnsupportedModel, match="student_layers.*float model"):
        Trainer(distill(char_corpus, tmp_path / "run2", int8, model="shakespeare-char",
                        student_layers=[0]))


def test_another_tokenizer_is_refused(char_corpus, teacher_dir, bpe_tokenizer, tmp_path):
    bpe_model = tmp_path / "bpe-model"
    save_model(bpe_model, Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, context_length=32,
                                              vocab_size=bpe_tokenizer.vocab_size)), bpe_tokenizer)
    # A teacher that reads text with another tokenizer than the corpus was made with.
    with pytest.raises(CheckpointMismatch, match="another tokenizer than the teacher"):
        Trainer(distill(char_corpus, tmp_path / "a", bpe_model))
    # Raw text is prepared with the teacher's tokenizer; a student with another is refused.
    with pytest.raises(ConfigError, match="student .*bpe-model uses another tokenizer than "
                                          "the teacher"):
        Trainer(distill(SHAKESPEARE, tmp_path / "b", teacher_dir, init_from=str(bpe_model)))
    # A student preset whose vocabulary is not the teacher's.
    vocab = Tokenizer.load(char_corpus / "tokenizer.json").vocab_size
    with pytest.raises(ConfigError, match=f"{vocab + 5} tokens.*teacher .* {vocab}"):
        Trainer(distill(char_corpus, tmp_path / "c", teacher_dir,
                        model={**STUDENT, "vocab_size": vocab + 5}))


@pytest.mark.parametrize("overrides, message", [
    ({"task": "distill"}, "task=distill needs a teacher"),
    ({"task": "distill", "teacher": "t", "distill_alpha": 1.5}, r"distill_alpha=1.5 must be in \[0, 1\]"),
    ({"task": "distill", "teacher": "t", "distill_temperature": 0}, "distill_temperature=0 must be > 0"),
    ({"task": "distill", "teacher": "t", "student_layers": [2, 0]}, "increasing order"),
    ({"task": "distill", "teacher": "t", "student_layers": [0], "init_from": "m"},
     "student_layers and init_from"),
    ({"task": "distill", "teacher": "t", "student_layers": [0], "model": "gpt2"},
     "remove model"),
    ({"teacher": "t"}, "teacher only apply to task=distill"),
    ({"task": "distill", "teacher": "t", "distil_alpha": 0.5}, "did you mean 'distill_alpha'"),
], ids=["no-teacher", "alpha", "temperature", "order", "two-students", "model", "stray",
        "typo"])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def test_student_layers_outside_the_teacher_are_named(char_corpus, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"student_layers \[4\] are not blocks.*0 to 3"):
        Trainer(distill(char_corpus, tmp_path / "run", teacher_dir, model="shakespeare-char",
                        student_layers=[0, 4]))
