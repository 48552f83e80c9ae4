"""GPTQ: the blocked algorithm against a plain per-column reference, its grid, and whole
models quantized on calibration text that every command then reads."""

from __future__ import annotations

import pytest
import torch

from lmforge.compress.calib import (
    CalibrationError,
    calibration_tokens,
    on_linear_inputs,
    through_blocks,
)
from lmforge.compress.gptq import gptq, hessian
from lmforge.compress.quant import (
    QuantSpec,
    dequantize_int4,
    dequantize_int8,
    int4_levels,
    quantization_of,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmforge.compress.sequential import quantize_calibrated
from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import train_char

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 40


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None,
                   damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper states it, one column at a time, every update applied at once, in
    float64: the dequantized weight."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    for j in range(k):
        if bits == 8:
            if j == 0:
                scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).double()
            q[:, j] = torch.round(w[:, j] / scale).clamp(-127, 127) * scale
        else:
            if j % group_size == 0:
                group = w[:, j:j + group_size]
                lo, hi = int4_levels(bits)
                scale = ((group.amax(1) - group.amin(1)) / (hi - lo)).float().to(torch.bfloat16)
                zero = (group.amin(1) + (8 - lo) * scale.double()).float().to(torch.bfloat16)
                scale, zero = scale.double(), zero.double()
            value = (torch.round((w[:, j] - zero) / scale) + 8).clamp(lo, hi)
            q[:, j] = (value - 8) * scale + zero
        error = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= error[:, None] * u[j, j:][None]
    return q


def inputs(k: int, rows: int = 512) -> torch.Tensor:
    """Correlated inputs with one dead feature (always zero) and uneven scales."""
    torch.manual_seed(1)
    x = torch.randn(rows, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k)) * torch.rand(k) * 3
    x[:, 5] = 0
    return x


@pytest.mark.parametrize("bits,group_size,k", [(8, None, 256), (4, 32, 256), (4, 64, 256),
                                               (3, 32, 256), (4, 128, 320)])
def test_gptq_equals_the_per_column_reference(bits, group_size, k):
    torch.manual_seed(0)
    w = torch.randn(48, k)  # 320 columns: the last group of 128 holds 64
    x = inputs(k)
    h = hessian(x)
    rounded = gptq(w, h, bits, group_size)
    w_ref = w.clone()
    w_ref[:, 5] = 0  # a dead input's weights never matter: GPTQ zeroes them
    h_ref = h.clone()
    h_ref[5, 5] = 1
    expected = reference_gptq(w_ref, h_ref, bits, group_size)
    torch.testing.assert_close(rounded.dequantized().double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (3, 64)])
@pytest.mark.parametrize("act_order", [False, True], ids=["", "act_order"])
def test_gptq_beats_rounding_to_nearest_on_the_layer_output(bits, group_size, act_order):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    x = inputs(256)
    rounded = gptq(linear.weight, hessian(x), bits, group_size, act_order=act_order)
    if bits == 8:
        nearest = dequantize_int8(*quantize_int8(linear.weight.detach()))
    else:
        nearest = dequantize_int4(*quantize_int4(linear.weight.detach(), group_size, bits),
                                  group_size)
    exact = x @ linear.weight.detach().T
    gptq_error = (x @ rounded.dequantized().T - exact).pow(2).mean()
    rtn_error = (x @ nearest.T - exact).pow(2).mean()
    assert gptq_error < 0.8 * rtn_error
    if bits != 8:  # the stored values stay on the grid of their bits
        values = unpack_int4(rounded.values)
        lo, hi = int4_levels(bits)
        assert values.min() >= lo and values.max() <= hi


def tiny_model(vocab_size: int) -> Decoder:
    torch.manual_seed(0)
    return Decoder(ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=vocab_size,
                               context_length=64, positions="rope", norm="rmsnorm",
                               mlp="swiglu", n_kv_head=2)).eval()


def test_calibration_windows_are_seeded_and_checked(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    tokenizer = train_char(TEXT)
    a = calibration_tokens(text, tokenizer, n=8, length=32, seed=3)
    assert a.shape == (8, 32)
    assert torch.equal(a, calibration_tokens(text, tokenizer, n=8, length=32, seed=3))
    assert not torch.equal(a, calibration_tokens(text, tokenizer, n=8, length=32, seed=4))
    ids = tokenizer.encode(TEXT)
    row = a[0].tolist()
    assert any(ids[s:s + 32] == row for s in range(len(ids) - 31))  # a window of the text
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "It was the best of times"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match="calib.jsonl:2: no 'text'"):
        calibration_tokens(jsonl, tokenizer, n=2, length=4)
    with pytest.raises(CalibrationError, match="fewer than one window of 10000"):
        calibration_tokens(text, tokenizer, n=2, length=10000)


def test_through_blocks_gives_the_model_s_own_features():
    tokenizer = train_char(TEXT)
    model = tiny_model(tokenizer.vocab_size)
    tokens = torch.tensor([tokenizer.encode(TEXT[i:i + 40]) for i in range(0, 200, 40)])
    seen = []
    features = through_blocks(model, tokens, lambda i, block, run: seen.append(i), batch_size=2,
                              progress=False)
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(tokens))
    assert seen == [0, 1]


def test_bfloat16_blocks_keep_float32_hooks_and_residuals():
    """Blocks may multiply in bfloat16 (autocast): the features stay float32 and near the
    float32 ones, and the layers' hooks compute outside autocast."""
    tokenizer = train_char(TEXT)
    model = tiny_model(tokenizer.vocab_size)
    tokens = torch.tensor([tokenizer.encode(TEXT[i:i + 40]) for i in range(0, 200, 40)])
    autocast_in_hooks = []

    def before_block(i, block, run):
        on_linear_inputs(block, f"blocks.{i}", lambda name, linear, x: autocast_in_hooks.append(
            torch.is_autocast_enabled("cpu")))

    features = through_blocks(model, tokens, before_block, progress=False, dtype=torch.bfloat16)
    assert autocast_in_hooks == [False] * 2 * 7  # 2 blocks of 7 Linear layers
    assert features.dtype == torch.float32
    with torch.no_grad():
        exact = model.features(tokens)
    assert (features - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, method="gptq"), QuantSpec(8, method="gptq"),
                                  QuantSpec(3, 32, method="gptq", head_bits=3)],
                         ids=QuantSpec.describe)
def test_a_gptq_model_is_closer_to_the_float_model_than_rounding(spec):
    tokenizer = train_char(TEXT)
    ids = torch.tensor(tokenizer.encode(TEXT))
    calib, held_out = ids[:1600].view(50, 32), ids[1600:2880].view(20, 64)
    with torch.no_grad():
        exact = tiny_model(tokenizer.vocab_size)(held_out)
        nearest = quantize(tiny_model(tokenizer.vocab_size), QuantSpec(spec.bits, spec.group_size,
                                                                         spec.head_bits))(held_out)
        model = quantize_calibrated(tiny_model(tokenizer.vocab_size), calib, spec, progress=False)
        ours = model(held_out)
    assert quantization_of(model) == spec
    assert (ours - exact).pow(2).mean() < (nearest - exact).pow(2).mean()


def test_lmforge_quantize_gptq_writes_a_model_every_command_reads(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.compress.quant import QuantLinear
    from lmforge.modeldir import QUANTIZATION, save_model
    from lmforge.open import open_model

    tokenizer = train_char(TEXT)
    model = tiny_model(tokenizer.vocab_size)
    source = save_model(tmp_path / "float", model, tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "gptq"
    assert main(["quantize", str(source), "--bits", "4", "--method", "gptq", "--calib",
                 str(calib), "--calib-samples", "8", "--calib-length", "32", "--out",
                 str(out)]) == 0
    assert "int4 g32 GPTQ model in" in capsys.readouterr().out
    assert '"method": "gptq"' in (out / QUANTIZATION).read_text()
    opened = open_model(out, "cpu")
    assert isinstance(opened.model.blocks[0].attn.q_proj, QuantLinear)
    assert quantization_of(opened.model) == QuantSpec(4, 32, method="gptq")
    main(["generate", str(out), "--prompt", "It was", "--max-new-tokens", "5",
          "--temperature", "0"])
    assert capsys.readouterr().out.startswith("It was")
    assert main(["quantize", str(source), "--bits", "4", "--method", "gptq",
                 "--out", str(tmp_path / "x")]) == 2
    assert "give some (--calib FILE)" in capsys.readouterr().err
    assert main(["quantize", str(source), "--bits", "4", "--method", "gptq", "--calib",
                 str(calib), "--out", str(tmp_path / "y")]) == 2
    assert "longer than the model's context (64): use --calib-length 64" in capsys.readouterr().err
