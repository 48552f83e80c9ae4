"""Pruning: masks of the requested share or pattern, chosen by magnitude, Wanda or SparseGPT,
written as a model directory every command reads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.compress.gptq import hessian
from lmforge.compress.prune import SPARSITY, PruneSpec, PruningError, prune, smallest, sparsegpt
from lmforge.compress.quant import QuantSpec, quantize
from lmforge.config import ModelConfig
from lmforge.modeldir import save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import train_char

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 40
SPECS = [PruneSpec(m, 0.5) for m in ("magnitude", "wanda", "sparsegpt")] + [
    PruneSpec(m, pattern=(2, 4)) for m in ("magnitude", "wanda", "sparsegpt")]


def tiny_model(vocab_size: int = 48) -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=vocab_size,
                               context_length=64, positions="rope", norm="rmsnorm",
                               mlp="swiglu", n_kv_head=2)).eval()


def test_masks_have_the_requested_share_or_pattern():
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    rows = smallest(scores, PruneSpec("wanda", 0.25))
    assert (rows.sum(dim=1) == 16).all()
    assert (scores[rows].max() <= scores[~rows].max())
    layer = smallest(scores, PruneSpec("magnitude", 0.5), per_row=False)
    assert layer.sum() == 512 and scores[layer].max() < scores[~layer].min()
    two_four = smallest(scores, PruneSpec("wanda", pattern=(2, 4))).reshape(16, 16, 4)
    assert (two_four.sum(dim=-1) == 2).all()
    groups = scores.reshape(16, 16, 4)
    assert (groups.masked_fill(~two_four, -1).amax(-1) <= groups.masked_fill(two_four, 2).amin(-1)).all()


@pytest.mark.parametrize("spec", SPECS, ids=PruneSpec.describe)
def test_every_method_prunes_each_layer_as_asked(spec):
    tokens = torch.randint(0, 48, (16, 64))
    model = tiny_model()
    layers = prune(model, spec, tokens, progress=False)
    assert len(layers) == 2 * 7
    for name, share in layers.items():
        weight = model.get_submodule(name).weight
        if spec.pattern:
            assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
        else:
            assert share == pytest.approx(0.5, abs=0.01), name
    assert (model.lm_head.weight != 0).all()  # the embedding / output projection stay whole


def test_sparsegpt_and_wanda_cost_a_layer_less_than_magnitude():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(1024, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))
    x *= torch.rand(256) * 4  # inputs of uneven sizes, as in trained models
    exact = F.linear(x, w)
    errors = {}
    for spec in (PruneSpec("magnitude", 0.5), PruneSpec("wanda", 0.5),
                 PruneSpec("sparsegpt", 0.5)):
        if spec.method == "sparsegpt":
            pruned = sparsegpt(w, hessian(x), spec)
        else:
            norms = x.square().sum(0).sqrt() if spec.method == "wanda" else torch.ones(256)
            pruned = w.masked_fill(smallest(w.abs() * norms, spec), 0)
        assert (pruned == 0).float().mean() == pytest.approx(0.5, abs=0.01)
        errors[spec.method] = (F.linear(x, pruned) - exact).pow(2).mean()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_pruning_asked_wrongly_is_refused_with_the_fix():
    with pytest.raises(PruningError, match="either a sparsity"):
        PruneSpec("wanda", 0.5, (2, 4))
    with pytest.raises(PruningError, match="between 0 and 1"):
        PruneSpec("wanda", 50)
    with pytest.raises(PruningError, match="M dividing 128"):
        PruneSpec("wanda", pattern=(2, 3))
    with pytest.raises(PruningError, match="not N:M"):
        PruneSpec.parse_pattern("2-4")
    with pytest.raises(PruningError, match="calibration text"):
        prune(tiny_model(), PruneSpec("sparsegpt", 0.5))
    with pytest.raises(PruningError, match="prune its float original"):
        prune(quantize(tiny_model(), QuantSpec(8)), PruneSpec("magnitude", 0.5))


def test_lmforge_prune_writes_a_model_every_command_reads_and_quantizing_keeps_zeros(
        tmp_path, capsys):
    tokenizer = train_char(TEXT)
    source = save_model(tmp_path / "float", tiny_model(tokenizer.vocab_size), tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "wanda"
    assert main(["prune", str(source), "--method", "wanda", "--pattern", "2:4", "--calib",
                 str(calib), "--calib-samples", "8", "--calib-length", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wanda 2:4 model in" in printed and "q_proj" in printed and "50.0%" in printed
    record = json.loads((out / SPARSITY).read_text())
    assert record["method"] == "wanda" and record["pattern"] == [2, 4]
    assert record["layers"]["blocks.0.mlp.down_proj"] == pytest.approx(0.5)
    assert main(["generate", str(out), "--prompt", "It was", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(out), "--bits", "8", "--out", str(tmp_path / "int8")]) == 0
    layer = open_model(tmp_path / "int8").model.blocks[0].mlp.down_proj
    pruned = open_model(out).model.blocks[0].mlp.down_proj.weight
    assert torch.equal(layer.weight == 0, pruned == 0)  # int8 keeps zeros zero
    assert main(["prune", str(source), "--method", "sparsegpt", "--out",
                 str(tmp_path / "x")]) == 2
    assert "give some (--calib FILE)" in capsys.readouterr().err
