"""The decoder model: causality, KV-cache equivalence, learning, presets."""

import platform

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import ConfigError
from lmforge.layers import ROTARY_BLOCK, Linear, onednn_products, rotary_tables
from lmforge.models.decoder import Decoder

VARIANTS = {
    "gpt2-style": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama-gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                      tie_embeddings=False),
    "mqa-qknorm-relu2": dict(positions="rope", norm="rmsnorm", mlp="relu2", n_kv_head=1,
                             qk_norm=True),
    "mistral-window-5": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                             sliding_window=5),
    # a windowed layer with its own rotary base, then a full one; wide heads, sandwich norms
    "gemma3-style": dict(positions="rope", norm="rmsnorm", mlp="geglu", n_kv_head=1, head_dim=16,
                         qk_norm=True, post_norms=True, embed_scale=True, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_local_base=100.0),
}


def tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=50, context_length=32,
                      **overrides)
    return Decoder(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_future_token_never_changes_past_logits(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 16))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_a_sliding_window_bounds_how_far_back_a_token_reaches():
    """With a window of 5, a token reaches 4 positions further per layer: after 2 layers,
    token 0 changes positions 0..8 and nothing after."""
    model = tiny(**VARIANTS["mistral-window-5"])
    x = torch.randint(0, 50, (1, 16))
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert not torch.allclose(a[:, 8], b[:, 8])
    torch.testing.assert_close(a[:, 9:], b[:, 9:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_matches_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        # A prompt of 7, then a chunk of 5 (prefill after a cache), then one at a time.
        pieces = [model(x[:, :7], cache=cache, start=0), model(x[:, 7:12], cache=cache, start=7)]
        pieces += [model(x[:, t:t + 1], cache=cache, start=t) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_at_different_positions_decode_together(variant):
    """Sequences of lengths 9 and 4 share a cache and decode in one batched forward per step
    (per-row start positions) with the logits of each sequence run alone."""
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (2, 14))
    lengths = [9, 4]
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        for row, n in enumerate(lengths):
            model(x[row:row + 1, :n], cache=cache.rows(row), start=0)
        steps = []
        for t in range(5):
            column = torch.stack([x[row, n + t] for row, n in enumerate(lengths)]).view(2, 1)
            steps.append(model(column, cache=cache, start=torch.tensor(lengths) + t))
        for row, n in enumerate(lengths):
            alone = model(x[row:row + 1, :n + 5])[0, n:]
            got = torch.cat([step[row] for step in steps])
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_only_the_windowed_layers_turn_by_the_local_rotary_base():
    model = tiny(**VARIANTS["gemma3-style"])
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        before = model(x)
        model.rope_local_cos.copy_(model.rope_cos)
        model.rope_local_sin.copy_(model.rope_sin)
        assert not torch.allclose(model(x), before)  # the windowed layer read the local table
    full = tiny(**{**VARIANTS["gemma3-style"], "layer_types": ["full_attention"] * 2})
    assert not hasattr(full, "rope_local_cos")  # no windowed layer, no second table


def test_rotary_tables_grow_as_positions_are_reached_and_decode_as_the_full_pass():
    """Tables for a long context are made a block of positions at a time (Gemma 3's 32,768
    positions took 128 MB), by a forward pass or by a KV cache of that many positions."""
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=50,
                      context_length=3 * ROTARY_BLOCK, **VARIANTS["gemma3-style"])
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    assert model.rope_cos.shape[0] == model.rope_local_cos.shape[0] == ROTARY_BLOCK
    x = torch.randint(0, 50, (1, ROTARY_BLOCK + 10))
    with torch.no_grad():
        full = model(x)
    for prefix, base in (("rope", model.cfg.rope_base), ("rope_local", 100.0)):
        cos, sin = rotary_tables(16, 2 * ROTARY_BLOCK, base)
        torch.testing.assert_close(getattr(model, f"{prefix}_cos"), cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(getattr(model, f"{prefix}_sin"), sin, atol=1e-6, rtol=0)
    again = Decoder(cfg).eval()
    again.load_state_dict(model.state_dict())
    cache = again.new_cache(1, ROTARY_BLOCK + 10)  # its positions' tables made with it
    assert again.rope_cos.shape[0] == again.rope_local_cos.shape[0] == 2 * ROTARY_BLOCK
    with torch.no_grad():
        prompt = again(x[:, :-3], cache=cache)
        steps = [again(x[:, t:t + 1], cache=cache, start=t)
                 for t in range(x.shape[1] - 3, x.shape[1])]
    torch.testing.assert_close(torch.cat([prompt, *steps], dim=1), full, atol=1e-5, rtol=1e-4)


def test_layer_types_are_checked():
    with pytest.raises(ConfigError, match="one entry for each of the 2 layers"):
        tiny(sliding_window=4, layer_types=["full_attention"])
    with pytest.raises(ConfigError, match="sliding_window is not set"):
        tiny(layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="'global' is not one of"):
        tiny(sliding_window=4, layer_types=["global", "full_attention"])
    kept = tiny(**VARIANTS["gemma3-style"]).cfg.of_layers([1, 1, 0])  # a student's blocks
    assert (kept.n_layer, kept.layer_types) == (3, ["full_attention", "full_attention",
                                                    "sliding_attention"])


def test_tiny_model_overfits_one_batch():
    model = tiny(**VARIANTS["llama-gqa"]).train()
    x = torch.randint(0, 50, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_tied_embeddings_share_one_tensor():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


@pytest.mark.parametrize("name,params", [("gpt2", 124_439_808), ("smollm2-135m", 134_515_008),
                                         ("shakespeare-char", 804_096)])
def test_presets_have_the_published_parameter_counts(name, params):
    with torch.device("meta"):
        model = Decoder(preset(name))
    assert model.num_params() == params


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            assert Decoder(preset(name)).num_params() > 0


def test_context_overflow_and_bad_config_are_clear():
    model = tiny()
    with pytest.raises(ValueError, match="context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        preset("gpt2", n_layers=3)
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ConfigError, match="did you mean 'gpt2'"):
        preset("gtp2")


def ops_run(fn) -> set[str]:
    """The names of the operators `fn()` ran."""
    with torch.profiler.profile() as profile:
        fn()
    return {event.name for event in profile.events()}


def test_float32_products_and_their_gradients_go_through_onednn():
    """Where PyTorch has oneDNN (x86): F.linear's numbers and gradients, for a 3-d input, a
    strided one and a bias; a compiled graph's product stays F.linear."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert onednn_products() == torch.backends.mkldnn.is_available()
    torch.manual_seed(0)
    layer = Linear(96, 40)
    x = torch.randn(2, 30, 96, requires_grad=True)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        ran = ops_run(lambda: torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5))
        torch.testing.assert_close(layer(x[:, ::3]), expected[:, ::3], rtol=1e-5, atol=1e-5)
    assert ("mkldnn::_linear_pointwise" in ran) == onednn_products()

    grad = torch.randn_like(expected)
    expected.backward(grad)
    wanted = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    x.grad = layer.weight.grad = layer.bias.grad = None
    ran = ops_run(lambda: layer(x).backward(grad))
    assert ("mkldnn::_linear_pointwise" in ran) == onednn_products()
    for got, want in zip((x.grad, layer.weight.grad, layer.bias.grad), wanted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, 96, requires_grad=True)  # no rows: F.linear's empty gradients
    layer.weight.grad = None
    layer(empty).sum().backward()
    assert empty.grad.shape == (0, 96) and layer.weight.grad.abs().sum() == 0
    layer.weight.requires_grad_(False)  # a frozen layer (LoRA's base): x's gradient alone
    x.grad = None
    layer(x).backward(grad)
    torch.testing.assert_close(x.grad, wanted[0], rtol=1e-5, atol=1e-5)

    compiled = torch.compile(layer, backend="eager")  # Dynamo's graph, without a C++ build
    with torch.no_grad():
        ran = ops_run(lambda: torch.testing.assert_close(compiled(x), expected,
                                                         rtol=1e-5, atol=1e-5))
    assert "mkldnn::_linear_pointwise" not in ran


def test_lmforge_onednn_0_keeps_pytorch_s_product(monkeypatch):
    onednn_products.cache_clear()
    monkeypatch.setenv("LMFORGE_ONEDNN", "0")
    try:
        assert not onednn_products()
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" not in ops_run(lambda: Linear(96, 40)(torch.randn(20, 96)))
    finally:
        onednn_products.cache_clear()
