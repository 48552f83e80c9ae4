"""AWQ: scales searched on calibration inputs and folded into the layers that feed the
scaled ones, leaving the float model as it was; then rounding, to nearest or by GPTQ."""

from __future__ import annotations

import pytest
import torch

from lmforge.compress.awq import Grid, InputStats, clip_weights, scale_block, search_scales
from lmforge.compress.calib import through_blocks
from lmforge.compress.quant import (
    QuantLinear,
    QuantSpec,
    quantization_of,
    quantize,
    round_to_nearest,
)
from lmforge.compress.sequential import quantize_calibrated
from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder

LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)
GPT2 = dict(norm="layernorm", mlp="gelu", bias=True)
RELU_BIAS = dict(positions="rope", norm="layernorm", mlp="relu", bias=True, n_kv_head=4)


def model(**kind) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=48, context_length=32, **kind)
    decoder = Decoder(cfg).eval()
    with torch.no_grad():  # norms away from their all-ones start, so folding shows if wrong
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p))
    return decoder


@pytest.mark.parametrize("kind", [LLAMA, GPT2, RELU_BIAS], ids=["llama", "gpt2", "relu-bias"])
def test_folding_the_scales_leaves_the_float_model_s_outputs_unchanged(kind):
    decoder = model(**kind)
    tokens = torch.randint(0, 48, (6, 32))
    with torch.no_grad():
        before = decoder(tokens)
    found = []
    through_blocks(decoder, tokens, lambda i, block, run: found.append(
        scale_block(block, decoder.cfg, run, Grid(4, 32)).scales), progress=False)
    with torch.no_grad():
        after = decoder(tokens)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    gated_or_relu = kind["mlp"] in ("swiglu", "relu")
    assert all(("down" in scales) == gated_or_relu for scales in found)
    assert any(not torch.allclose(s, torch.ones_like(s)) for f in found for s in f.values())


def test_the_search_never_does_worse_than_rounding_to_nearest_and_helps_outlier_inputs():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    x = torch.randn(2048, 128)
    x[:, :4] *= 30  # a few channels with large activations, as in trained models
    stats = InputStats.empty(128)
    stats.add(x)
    grid = Grid(4, 32)
    s = search_scales([w], stats, grid)
    h = stats.h.float()
    plain = grid.error(w, torch.ones(128), h)
    assert grid.error(w, s, h) < 0.8 * plain
    assert s[:4].min() > s[4:].max()  # the large channels' weights are the ones kept finer


def test_o_proj_scales_are_shared_by_the_query_heads_of_one_value_head():
    decoder = model(**LLAMA)
    tokens = torch.randint(0, 48, (4, 32))
    found = []
    through_blocks(decoder, tokens, lambda i, block, run: found.append(
        scale_block(block, decoder.cfg, run, Grid(4, 32)).scales), progress=False)
    s = found[0]["o"].reshape(2, 2, 16)  # value heads, query heads each, head width
    assert torch.equal(s[:, 0], s[:, 1])


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, method="awq"),
                                  QuantSpec(3, 32, method="awq+gptq")], ids=QuantSpec.describe)
def test_an_awq_model_is_closer_to_the_float_model_than_rounding(spec):
    calib = torch.randint(0, 48, (32, 32))
    held_out = torch.randint(0, 48, (16, 32))
    with torch.no_grad():
        exact = model(**LLAMA)(held_out)
        nearest = quantize(model(**LLAMA), QuantSpec(spec.bits, spec.group_size))(held_out)
        quantized = quantize_calibrated(model(**LLAMA), calib, spec, progress=False)
        ours = quantized(held_out)
    assert quantization_of(quantized) == spec
    assert isinstance(quantized.blocks[0].attn.q_proj, QuantLinear)
    assert (ours - exact).pow(2).mean() < (nearest - exact).pow(2).mean()


@pytest.mark.parametrize("group_size", [32, 128])  # 160 columns: 128 leaves a short group
def test_clipping_rounds_each_group_with_no_more_error_than_its_full_range(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 160)
    w[:, 3] *= 6  # an outlying column that stretches its groups' ranges
    x = torch.randn(4096, 160)
    grid = Grid(4, group_size)
    clipped = clip_weights(w, x.T @ x, grid)
    assert clipped.shape == w.shape and (clipped.abs() <= w.abs()).all()
    plain = (round_to_nearest(w, 4, group_size).dequantized() - w) @ x.T
    ours = (round_to_nearest(clipped, 4, group_size).dequantized() - w) @ x.T
    assert ours.pow(2).mean() < 0.95 * plain.pow(2).mean()
