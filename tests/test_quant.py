"""Weight-only quantization: the layer against a dequantized matmul, rounding error bounds,
quantized model directories, `lmforge quantize`, and SmolLM2's perplexity budget (slow)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.cli import main
from lmforge.compress import quant
from lmforge.compress.quant import (
    KernelGroup,
    QuantizationError,
    QuantLinear,
    QuantSpec,
    dequantize_int4,
    dequantize_int8,
    quantization_of,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from lmforge.config import ModelConfig
from lmforge.eval import perplexity
from lmforge.interop.gguf import import_gguf
from lmforge.modeldir import QUANTIZATION, save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import train_char

from .smollm2 import smollm2_gguf

SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 32, head_bits=4)]
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)


def tiny(**overrides) -> Decoder:
    """A model whose widths (64, 256) suit every group size, with a vocabulary (50) that is
    not a multiple of the int4 kernel's 16 rows."""
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, d_model=64, vocab_size=50, context_length=32) | overrides
    return Decoder(ModelConfig(**cfg)).eval()


def logits(model: Decoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("spec", SPECS[:3], ids=QuantSpec.describe)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [(1, 1), (3, 5), (2, 40)], ids=["step", "kernel", "prompt"])
def test_layer_matches_a_matmul_by_its_dequantized_weight(spec, bias, dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(128, 40, bias=bias)
    layer = QuantLinear.from_linear(linear, spec.bits, spec.group_size)
    x = torch.randn(*rows, 128)
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    got = layer(x.to(dtype))
    assert got.shape == (*rows, 40) and got.dtype == dtype
    # The kernels take bfloat16 activations: about 3 significant digits.
    torch.testing.assert_close(got.float(), expected, atol=0.01 * expected.abs().max(), rtol=0)


@pytest.mark.parametrize("hardware", [True, False], ids=["bf16-cpu", "other-cpu"])
def test_long_prompts_multiply_in_bfloat16_where_the_cpu_does(monkeypatch, hardware):
    monkeypatch.setattr(quant, "bf16_products", lambda: hardware)
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 40), 4, 32)
    x = torch.randn(2, quant.KERNEL_MAX_ROWS, 128)
    w = layer.dequantized_weight()
    low = torch.bfloat16 if hardware else torch.float32
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, F.linear(x.to(low), w.to(low)).float() + layer.bias)
    # a gradient asked for (training through the layer): float32 whatever the CPU
    assert torch.equal(layer(x), F.linear(x, w) + layer.bias)


def test_int8_rounds_each_weight_to_the_nearest_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different scales
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    error = (dequantize_int8(q, scales) - w).abs()
    assert (error <= scales[:, None].float() / 2 + 1e-6).all()
    assert error.pow(2).mean().sqrt() < 0.01 * w.pow(2).mean().sqrt()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rounds_each_weight_to_the_nearest_step_of_its_group(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256) + torch.randn(64, 256 // group_size).repeat_interleave(group_size, 1)
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.shape == (64, 128) and scales.shape == zeros.shape == (64, 256 // group_size)
    q = unpack_int4(packed)
    assert q.max() == 15 and q.min() == 0
    assert torch.equal(packed, q[:, 0::2] | (q[:, 1::2] << 4))
    error = (dequantize_int4(packed, scales, zeros, group_size) - w).abs()
    step = scales.float().repeat_interleave(group_size, 1)
    assert (error <= step / 2 + 1e-6).all()
    assert error.pow(2).mean().sqrt() < 0.12 * w.pow(2).mean().sqrt()


@pytest.mark.parametrize("in_features,group_size", [(96, 32), (100, 32), (64, 128)])
def test_int4_dequantizes_each_nibble_with_its_group_scale_and_zero(in_features, group_size):
    # written out weight by weight, short last groups (100 = 3 x 32 + 4; 64 < 128) included
    torch.manual_seed(0)
    packed, scales, zeros = quantize_int4(torch.randn(5, in_features), group_size)
    q = unpack_int4(packed)
    expected = torch.tensor([[(q[n, k].item() - 8) * scales[n, k // group_size].item()
                              + zeros[n, k // group_size].item() for k in range(in_features)]
                             for n in range(5)])
    torch.testing.assert_close(dequantize_int4(packed, scales, zeros, group_size), expected)


@pytest.mark.parametrize("spec,shape", zip(SPECS, [
    dict(), dict(**LLAMA, tie_embeddings=False), dict(**LLAMA, bias=True), dict(**LLAMA),
]), ids=["int8-gpt2-tied", "int4-g32-llama", "int4-g64-bias", "int4-head-llama-tied"])
def test_saved_quantized_model_loads_with_the_same_logits(tmp_path, spec, shape):
    model = tiny(**shape)
    x = torch.randint(0, 50, (2, 16))
    reference = logits(model, x)
    quantize(model, spec)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.lm_head.bits == spec.head_bits
    tied = model.cfg.tie_embeddings
    # a tied embedding is the quantized output projection's rows: no float table is kept
    assert ("embed.weight" in model.state_dict()) != tied
    if tied:
        tokens = torch.arange(50)
        assert torch.equal(model.token_embeddings(tokens), model.lm_head.dequantized_weight())
    quantized = logits(model, x)
    # Rounding moves the logits by about what it moves the weights (0.4% at int8, 7% at int4).
    assert (quantized - reference).norm() < (0.02 if spec.bits == 8 else 0.15) * reference.norm()

    save_model(tmp_path, model, None)
    assert json.loads((tmp_path / QUANTIZATION).read_text())["bits"] == spec.bits
    again = open_model(tmp_path).model
    assert quantization_of(again) == spec
    assert torch.equal(logits(again, x), quantized)
    assert again.cfg.tie_embeddings == tied
    assert ("embed.weight" in load_file(tmp_path / "model.safetensors")) != tied
    weights = {name: t.dtype for name, t in again.state_dict().items() if name.endswith("weight")}
    assert weights["blocks.0.mlp.up_proj.weight"] == (torch.int8 if spec.bits == 8 else torch.uint8)

    save_model(tmp_path, tiny(), None)  # a float model over a quantized one
    assert quantization_of(open_model(tmp_path).model) is None


def unfused(model: Decoder) -> Decoder:
    for block in model.blocks:
        block.attn.fused = block.mlp.fused = None
    return model


@pytest.mark.parametrize("spec", SPECS[:2], ids=QuantSpec.describe)
def test_qkv_and_gate_up_run_as_one_kernel_call_with_each_layers_outputs(spec):
    model = quantize(tiny(**LLAMA, qkv_bias=True), spec)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert isinstance(attn.fused, KernelGroup) and isinstance(mlp.fused, KernelGroup)
    x = torch.randn(3, 2, 64)
    with torch.no_grad():
        together = attn.fused(x, (attn.q_proj, attn.k_proj, attn.v_proj))
        assert [y.shape[-1] for y in together] == [64, 32, 32]
        for y, layer in zip(together, (attn.q_proj, attn.k_proj, attn.v_proj)):
            assert torch.equal(y, layer(x))  # each output row is computed alike
        tokens = torch.randint(0, 50, (1, 8))
        assert torch.equal(model(tokens), unfused(copy.deepcopy(model))(tokens))
        # a long prompt: one product by the layers' weights side by side, dequantized
        long = torch.randn(1, 65, 64)
        for y, layer in zip(attn.fused(long, (attn.q_proj, attn.k_proj, attn.v_proj)),
                            (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(y, layer(long), rtol=1e-2, atol=1e-2)


def test_a_kernel_group_follows_new_weights_and_replaced_layers():
    model = quantize(tiny(**LLAMA), QuantSpec(4, 32))
    other = quantize(tiny(**LLAMA, init_std=0.2), QuantSpec(4, 32))
    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        before = model(tokens)
        model.load_state_dict(other.state_dict())  # in place: the same tensors, new values
        assert torch.equal(model(tokens), other(tokens))
        assert not torch.equal(model(tokens), before)
        attn = model.blocks[0].attn
        attn.v_proj = copy.deepcopy(other.blocks[1].attn.v_proj)  # no longer the group's
        assert attn.fused(torch.randn(1, 1, 64), (attn.q_proj, attn.k_proj, attn.v_proj)) is None
        assert torch.equal(model(tokens), unfused(copy.deepcopy(model))(tokens))


def test_scales_stay_as_rounded_when_the_model_changes_float_type(tmp_path):
    """Moving a model to another float type moves its norms, not its scales and zeros: they
    are part of the rounded weight (and float32 copies of them were memory for nothing)."""
    model = quantize(tiny(**LLAMA), QuantSpec(4, 32))
    tokens = torch.randint(0, 50, (1, 8))
    before = logits(model, tokens)
    up = model.blocks[0].mlp.up_proj
    scales, zeros = up.scales.clone(), up.zeros.clone()
    model.double().float()  # every float tensor back as it was
    assert torch.equal(logits(model, tokens), before)  # the kernels' operands made again
    model.half()
    assert model.final_norm.weight.dtype == torch.float16
    assert up.scales.dtype == up.zeros.dtype == quant.SCALE_DTYPE
    assert torch.equal(up.scales, scales) and torch.equal(up.zeros, zeros)
    save_model(tmp_path, model.float(), None)
    opened = open_model(tmp_path, dtype=torch.float32).model
    assert {t.dtype for name, t in opened.state_dict().items()
            if name.endswith(("scales", "zeros"))} == {quant.SCALE_DTYPE}


@pytest.mark.parametrize("spec", SPECS[:2], ids=QuantSpec.describe)
def test_kv_cache_decoding_matches_full_forward_when_quantized(spec):
    """A long prompt (dequantized matmuls), then decoding steps (the int kernels)."""
    model = quantize(tiny(**LLAMA, context_length=128), spec)
    x = torch.randint(0, 50, (1, 84))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1, 84)
        steps = [model(x[:, :80], cache=cache, start=0)]
        steps += [model(x[:, t:t + 1], cache=cache, start=t) for t in range(80, 84)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.01 * full.abs().max(), rtol=0)


@pytest.mark.parametrize("symmetric", [False, True], ids=["", "sym"])
@pytest.mark.parametrize("rows", [(1, 1), (2, 40)], ids=["step", "prompt"])
def test_a_short_last_group_quantizes_and_runs_like_its_dequantized_weight(symmetric, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)  # groups of 64: one whole, one of 32 columns
    layer = QuantLinear.from_linear(linear, 4, 64, symmetric)
    assert layer.scales.shape == (40, 2)
    w = layer.dequantized_weight()
    # Each group's grid is its own: the short group's error is bounded by its own range
    # (half a step; a symmetric grid's far side may clamp, a whole step).
    short = linear.weight.detach()[:, 64:]
    step = short.abs().amax(1) / 8 if symmetric else (short.amax(1) - short.amin(1)) / 15
    bound = step * (1.0 if symmetric else 0.5) * 1.02
    assert ((w[:, 64:] - short).abs() <= bound[:, None]).all()
    x = torch.randn(*rows, 96)
    with torch.no_grad():
        expected = F.linear(x.bfloat16().float(), w, linear.bias)
        torch.testing.assert_close(layer(x), expected, atol=0.02, rtol=0.02)


def test_a_symmetric_grid_has_zero_zeros_and_puts_the_largest_magnitude_on_a_level():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    packed, scales, zeros = quantize_int4(w, 32, symmetric=True)
    assert (zeros == 0).all()
    back = dequantize_int4(packed, scales, zeros, 32)
    groups, extremes = w.reshape(8, 2, 32), back.reshape(8, 2, 32)
    at = groups.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(extremes.gather(-1, at), groups.gather(-1, at),
                               rtol=2 ** -8, atol=0)
    assert QuantSpec(4, 32, symmetric=True).describe() == "int4 g32 sym"


def test_odd_widths_are_refused_for_int4():
    with pytest.raises(QuantizationError, match=r"blocks\.0\.attn\.q_proj has 63 input "
                                                r"features.*use 8 bits"):
        quantize(tiny(d_model=63, n_head=1), QuantSpec(4, 32))


def test_specs_that_make_no_sense_are_refused():
    with pytest.raises(QuantizationError, match="4 or 3 bits only"):
        QuantSpec(8, 32)
    with pytest.raises(QuantizationError, match="not one of 32, 64, 128"):
        QuantSpec(4, 16)
    with pytest.raises(QuantizationError, match="use 8, 4 or 3"):
        QuantSpec(2, 32)
    with pytest.raises(QuantizationError, match="unknown quantization method 'hqq'"):
        QuantSpec(4, 32, method="hqq")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(quantize(tiny(), QuantSpec(8)), QuantSpec(8))


def test_cli_quantizes_a_model_directory_and_generates_from_it(tmp_path, capsys):
    text = "To be, or not to be, that is the question.\n" * 4
    tokenizer = train_char(text, byte_fallback=False)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=tokenizer.vocab_size,
                                context_length=32))
    source = save_model(tmp_path / "float", model, tokenizer)
    out = tmp_path / "int4"

    assert main(["quantize", str(source), "--bits", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int4 g32" in printed and "MB ->" in printed
    assert json.loads((out / QUANTIZATION).read_text())["group_size"] == 32
    assert main(["generate", str(out), "--prompt", "To be", "--max-new-tokens", "8",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["info", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "needs the float model it was quantized from" in capsys.readouterr().err

    assert main(["quantize", str(out), "--bits", "8", "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(source), "--bits", "8", "--symmetric",
                 "--out", str(tmp_path / "sym")]) == 2
    assert "int8 is always symmetric" in capsys.readouterr().err

    head4 = tmp_path / "head4"
    assert main(["quantize", str(source), "--bits", "4", "--head-bits", "4",
                 "--out", str(head4)]) == 0
    assert "int4 g32 (int4 head)" in capsys.readouterr().out
    assert open_model(head4).model.lm_head.bits == 4
    assert main(["quantize", str(source), "--bits", "3", "--head-bits", "4",
                 "--out", str(tmp_path / "head3")]) == 2
    assert "head_bits=4" in capsys.readouterr().err


# ------------------------------------------------------------------- SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2_baseline(tmp_path_factory, shakespeare):
    """SmolLM2-135M-Instruct's directory, the tokens of 20k characters of Shakespeare, and
    its perplexity on them."""
    directory = import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))
    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    ids = tokenizer.encode(shakespeare[:20_000])
    return directory, ids, perplexity(model, ids)[0]


@pytest.mark.slow
@pytest.mark.parametrize("spec,budget", [(QuantSpec(8), 0.01), (QuantSpec(4, 32), 0.05)],
                         ids=["int8", "int4-g32"])
def test_smollm2_perplexity_stays_within_budget(smollm2_baseline, spec, budget):
    directory, ids, baseline = smollm2_baseline
    model = quantize(open_model(directory).model, spec)
    # 512-token windows take the dequantized-weight path; dequantizing once up front gives
    # the same numbers without redoing it for every window (minutes on 2 cores).
    ppl = perplexity(dequantized(model), ids)[0]
    print(f"\nSmolLM2 perplexity on {len(ids)} tokens: float {baseline:.3f}, "
          f"{spec.describe()} {ppl:.3f} ({ppl / baseline - 1:+.2%})")
    assert ppl / baseline - 1 < budget


def dequantized(model: Decoder) -> Decoder:
    """`model` with each quantized layer replaced by a float layer of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent, _, child = name.rpartition(".")
            weight = module.dequantized_weight().float()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
            linear.weight.data = weight
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


@pytest.mark.parametrize("spec", SPECS[:2], ids=QuantSpec.describe)
def test_a_vision_language_model_quantizes_its_decoder_and_still_reads_images(tmp_path, spec):
    from lmforge.compress.run import quantize_dir
    from lmforge.config import resolve_vlm_config
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.models import build_model

    torch.manual_seed(0)
    image_token = 3
    model = build_model(resolve_vlm_config({"preset": "vlm-tiny", "text": {"vocab_size": 50},
                                            "image_token_id": image_token})).eval()
    source = save_model(tmp_path / "float", model, None)
    out = quantize_dir(source, tmp_path / "quantized", spec)
    again = open_model(out, "cpu").model
    assert quantization_of(again) == spec
    # The decoder's layers are quantized, the vision encoder's and the projector's are not.
    assert all(not isinstance(m, nn.Linear) for m in again.text.modules())
    assert isinstance(again.text.lm_head, QuantLinear)
    for part in (again.vision, again.projector):
        assert not any(isinstance(m, QuantLinear) for m in part.modules())
        assert all(p.dtype == torch.float32 for p in part.parameters())
    tokens = torch.tensor([[5, *[image_token] * 4, 6, 7, 8]])
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference, quantized = model(tokens, images=image), again(tokens, images=image)
    assert (quantized - reference).norm() < (0.02 if spec.bits == 8 else 0.15) * reference.norm()
    request = Request(tokens[0].tolist(), 4, SamplingConfig(temperature=0), images=(image[0],))
    assert len(Engine(again, max_batch=1).run([request])[0].tokens) == 4
