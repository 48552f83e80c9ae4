"""The encoder-decoder model: padding never changes the output, the decoder is causal, and
cached step-by-step decoding equals the full forward pass."""

import pytest
import torch

from lmforge.config import SEQ2SEQ_PRESETS, Seq2SeqConfig
from lmforge.models.seq2seq import Seq2Seq

VARIANTS = {
    "post-norm, sinusoidal": dict(norm_first=False),
    "pre-norm, learned": dict(norm_first=True, positions="learned"),
    "pre-norm, rmsnorm, swiglu, untied": dict(norm_first=True, norm="rmsnorm", mlp="swiglu",
                                              bias=False, tie_embeddings=False),
}


def tiny(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(**{**SEQ2SEQ_PRESETS["transformer-tiny"], "n_head": 4, "d_model": 64,
                           "d_mlp": 128, "vocab_size": 97, "max_length": 32, "dropout": 0.0,
                           **overrides})
    return Seq2Seq(cfg).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_a_source_changes_nothing(variant):
    model = tiny(**VARIANTS[variant])
    source = torch.randint(1, 97, (1, 9))
    target = torch.randint(1, 97, (1, 6))
    alone = model(source, torch.ones_like(source, dtype=torch.bool), target)
    padded = torch.cat([source, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.arange(14)[None] < 9
    torch.testing.assert_close(model(padded, mask, target), alone, atol=1e-5, rtol=1e-5)
    # In a batch beside a longer source, too.
    other = torch.randint(1, 97, (1, 14))
    both = model(torch.cat([padded, other]), torch.cat([mask, torch.ones(1, 14, dtype=torch.bool)]),
                 torch.cat([target, target]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_decoder_is_causal(variant):
    model = tiny(**VARIANTS[variant])
    source = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(source, dtype=torch.bool)
    target = torch.randint(1, 97, (2, 8))
    changed = target.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 97
    a, b = model(source, mask, target), model(source, mask, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_decoding_equals_the_full_pass(variant):
    model = tiny(**VARIANTS[variant])
    source = torch.randint(1, 97, (2, 10))
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    target = torch.randint(1, 97, (2, 9))
    full = model(source, mask, target)
    memory = model.memory(model.encode(source, mask))
    cache = model.new_cache(2, 16)
    steps = [model.decode(target[:, :3], memory, mask, cache, start=0)]  # a prefix at once
    steps += [model.decode(target[:, t:t + 1], memory, mask, cache, start=t) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_transformer_base_has_the_papers_shape():
    with torch.device("meta"):
        model = Seq2Seq(Seq2SeqConfig(vocab_size=37000))
    # 6+6 layers of width 512 and a shared 37k vocabulary: the paper's ~65 M parameters.
    assert 60e6 < model.num_params() < 66e6


def test_too_long_inputs_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="past the model's max_length 32"):
        model.encode(torch.ones(1, 33, dtype=torch.long), torch.ones(1, 33, dtype=torch.bool))


def test_beam_search_with_one_beam_is_greedy_and_batching_changes_nothing():
    from lmforge.infer.seq2seq import beam_search, generate

    model = tiny()
    torch.manual_seed(3)
    sources = [torch.randint(3, 97, (n,)).tolist() for n in (5, 9, 7)]
    free = generate(model, sources, bos=1, eos=2, max_new_tokens=12)
    # An EOS the greedy path meets part way, so stopping is tested too.
    eos = free[0][4]
    greedy = generate(model, sources, bos=1, eos=eos, max_new_tokens=12)
    assert len(greedy[0]) == free[0].index(eos)
    assert beam_search(model, sources, bos=1, eos=eos, beam=1, max_new_tokens=12) == greedy
    batched = beam_search(model, sources, bos=1, eos=eos, beam=4, max_new_tokens=12)
    alone = [beam_search(model, [s], bos=1, eos=eos, beam=4, max_new_tokens=12)[0] for s in sources]
    assert batched == alone
