"""lmforge's CPU decoding kernels: int8/int4 matmuls against the float matmul of the same
quantized weights, decoding attention against PyTorch's."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress import kernels
from lmforge.compress.quant import QuantLinear, QuantSpec, kernel_operands, quantize
from lmforge.config import ModelConfig
from lmforge.layers import Linear, decodes_on_kernel
from lmforge.modeldir import save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model

from .test_allocator import on_tmpfs, resident_kb, written_out

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="lmforge's int kernels need AVX-512 VNNI and a C++ compiler")


def layer(in_features: int, out_features: int, bits: int, group_size: int | None,
          seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=True)
    return QuantLinear.from_linear(linear, bits, group_size)


def quantized_inputs(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: rounded to int8 in blocks of 32, a scale a block."""
    blocks = x.view(x.shape[0], -1, 32)
    scales = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scales) * scales).view_as(x)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13])
def test_kernel_is_the_matmul_of_its_rounded_inputs(bits, group_size, rows):
    # 576 is 4.5 groups of 128: the last group is short; 100 outputs is not a multiple of 4
    q = layer(576, 100, bits, group_size)
    operands = kernel_operands([q])
    assert operands.ours
    x = torch.randn(rows, 576)
    y = q(x)
    expected = quantized_inputs(x).double() @ q.dequantized_weight().double().t() + q.bias
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    # and close to the float inputs' product: int8 activations cost well under 1%
    exact = x @ q.dequantized_weight().t() + q.bias
    assert (y - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_a_row_does_not_depend_on_its_batch(bits, group_size):
    q = layer(128, 40, bits, group_size)
    x = torch.randn(11, 128)
    together = q(x)
    for i in range(11):
        assert torch.equal(q(x[i:i + 1]), together[i:i + 1])


def test_layers_of_other_widths_use_pytorchs_kernels():
    assert not kernel_operands([layer(80, 16, 8, None)]).ours  # 80 is no multiple of 32
    assert kernel_operands([layer(96, 16, 8, None)]).ours
    assert kernel_operands([layer(128, 16, 4, 32)]).ours


def test_a_quantized_model_decodes_the_same_step_by_step_and_whole():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=128, vocab_size=256, context_length=64,
                      positions="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    model = quantize(Decoder(cfg).eval(), QuantSpec(bits=4, group_size=32))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        whole = model(ids)
        cache = model.new_cache(1, 12)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache, start=i) for i in range(12)], 1)
    # each step's rows are quantized alone, as the whole prompt's are
    torch.testing.assert_close(steps, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("in_features,out_features", [(576, 100), (64, 4100), (128, 33)])
def test_the_tiles_dequantize_to_the_weight_as_stored(bits, group_size, in_features,
                                                        out_features):
    """A long prompt's weight, made from the kernels' tiles: the very floats of the weight as
    stored (outputs padded to whole tiles, groups short at the end, several row chunks)."""
    q = layer(in_features, out_features, bits, group_size)
    weight = kernels.dequantized(kernel_operands([q]).tensors)
    assert weight.shape == (-(-out_features // 16) * 16, in_features)
    assert torch.equal(weight[:out_features], q.dequantized_weight())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise's MADV_PAGEOUT")
def test_weights_as_stored_are_paged_out_once_the_kernels_have_their_own(tmp_path):
    if on_tmpfs(tmp_path):
        pytest.skip("the temporary directory is on tmpfs, whose pages stay when paged out")
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=512, vocab_size=4096, context_length=128,
                      positions="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    model = quantize(Decoder(cfg).eval(), QuantSpec(bits=4, group_size=32))
    short, long = torch.randint(0, 4096, (1, 12)), torch.randint(0, 4096, (1, 100))
    with torch.no_grad():
        expected = model(short), model(long)
    save_model(tmp_path, model, None)
    stored = tmp_path / "model.safetensors"
    written_out(stored)
    again = open_model(tmp_path, device="cpu").model
    for t in again.state_dict().values():  # every page read
        assert torch.isfinite(t.float()).all()
    read = resident_kb(stored)
    with torch.no_grad():
        assert torch.equal(again(short), expected[0])  # on the kernels' operands, made now
        # a long prompt multiplies by weights dequantized from the kernels' tiles
        assert torch.equal(again(long), expected[1])
    # what stays: the rows of the tied embedding looked up, and the pages tensors share
    left = resident_kb(stored)
    assert read > 5_000 and left < read / 10, (read, left)
    # what is read from the file again is what was there
    assert torch.equal(again.lm_head.dequantized_weight(), model.lm_head.dequantized_weight())
    assert torch.equal(again.blocks[1].mlp.down_proj.weight, model.blocks[1].mlp.down_proj.weight)


@pytest.mark.slow
def test_a_compiled_step_calls_the_kernels_grouped_and_decodes_as_the_eager_one():
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingConfig

    cfg = ModelConfig(n_layer=2, n_head=2, d_model=128, vocab_size=256, context_length=64,
                      positions="rope", norm="rmsnorm", mlp="swiglu")
    torch.manual_seed(0)
    model = quantize(Decoder(cfg).eval(), QuantSpec(bits=4, group_size=32))
    greedy = SamplingConfig(temperature=0)
    requests = [Request(torch.randint(0, 256, (n,)).tolist(), 8, greedy) for n in (3, 9, 5)]
    eager = Engine(model, max_batch=2, max_len=32).run(requests)
    torch._dynamo.reset()
    compiled = Engine(model, max_batch=2, max_len=32, compile=True)
    compiled.wait_compiled()
    assert [c.tokens for c in compiled.run(requests)] == [c.tokens for c in eager]
    # q, k and v, gate and up: one call each, on operands made before the step was traced
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert attn.fused._operands.ours and mlp.fused._operands.ours
    assert attn.q_proj._kernel_operands is None and model.blocks[0].attn.o_proj._kernel_operands


@pytest.mark.parametrize("heads,kv_heads,head_dim,window", [
    (4, 4, 64, None), (6, 2, 40, None), (9, 3, 64, 5), (2, 1, 128, 16), (3, 3, 8, None)])
def test_decode_attention_is_sdpa_over_each_rows_own_positions(heads, kv_heads, head_dim,
                                                               window):
    torch.manual_seed(0)
    B, L = 4, 37  # 37: no multiple of the vector width; 40 and 8 leave short vectors too
    q = torch.randn(B, heads, 1, head_dim)
    k, v = torch.randn(2, B, kv_heads, L, head_dim).unbind(0)
    lengths = torch.tensor([1, 37, 20, 6])
    keys = torch.arange(L)
    mask = keys < lengths[:, None]
    if window is not None:
        mask &= keys >= lengths[:, None] - window
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None],
                                              enable_gqa=True, scale=0.3)
    got = kernels.decode_attention(q, k, v, lengths, scale=0.3, window=window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # no lengths: every row sees all L positions
    everything = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(kernels.decode_attention(q, k[:, :, :L], v), everything,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_decode_attention_reads_a_16_bit_cache_as_its_float_values(dtype, head_dim):
    torch.manual_seed(0)
    q = torch.randn(3, 6, 1, head_dim)
    k, v = torch.randn(2, 3, 2, 29, head_dim).to(dtype).unbind(0)
    lengths = torch.tensor([29, 1, 13])
    expected = kernels.decode_attention(q, k.float(), v.float(), lengths)
    torch.testing.assert_close(kernels.decode_attention(q, k, v, lengths), expected,
                               rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_the_caches_own_views_and_large_scores():
    torch.manual_seed(1)
    cache = torch.randn(2, 3, 2, 50, 32)  # (layers, slots, heads, positions, dim)
    k, v = cache[1, 1:3], cache[0, 1:3]  # strided views, as a cache's rows are
    q = torch.randn(2, 4, 1, 32) * 40  # scores in the hundreds: the softmax must not overflow
    lengths = torch.tensor([50, 9])
    mask = (torch.arange(50) < lengths[:, None])[:, None, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(kernels.decode_attention(q, k, v, lengths), expected,
                               rtol=1e-5, atol=1e-5)


def test_decoding_steps_attend_on_the_kernel_only_where_it_applies():
    q = torch.randn(1, 2, 1, 64)
    assert decodes_on_kernel(q, q)
    assert not decodes_on_kernel(q.bfloat16(), q.bfloat16())
    assert not decodes_on_kernel(q.requires_grad_(), q)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("in_features,out_features", [(64, 48), (100, 37), (576, 1536)])
def test_the_float_kernel_is_pytorchs_product(rows, in_features, out_features):
    """Any width (a last partial vector of x and w, an odd count of weight rows)."""
    x, w = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    torch.testing.assert_close(kernels.float_matmul(x, w), x @ w.T, rtol=1e-5, atol=1e-4)


def test_linear_layers_take_the_float_kernel_for_a_decoding_step_only(monkeypatch):
    layer = Linear(96, 40)
    calls = []
    product = kernels.float_matmul
    monkeypatch.setattr(kernels, "float_matmul", lambda *a: calls.append(1) or product(*a))
    x = torch.randn(2, 4, 96)  # 8 rows
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        layer(torch.randn(3, 3, 96))  # 9 rows: a prefill's
        layer(x[:, :1])  # 2 rows
        assert len(calls) == 2
        Linear(96, 40).bfloat16()(x.bfloat16())  # PyTorch's product for other types
    torch.testing.assert_close(layer(x), expected)  # and when training
    assert len(calls) == 2


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (8, 1000), (3, 7), (2, 17)])
def test_greedy_tokens_are_each_row_s_first_largest_logit(rows, vocab):
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab).round(decimals=1)  # ties among the largest
    logits[0, :vocab // 2] = float("-inf")
    assert torch.equal(kernels.greedy_tokens(logits), logits.argmax(-1))
