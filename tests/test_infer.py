"""Sampling and cached generation."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig, sample
from lmforge.models.decoder import Decoder


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, vocab_size=40,
                      context_length=48, positions="rope", norm="rmsnorm", mlp="swiglu")
    return Decoder(cfg).eval()


def test_greedy_generation_matches_recomputing_the_whole_sequence(model):
    prompt = [3, 1, 4, 1, 5, 9]
    out = generate(model, prompt, 20, SamplingConfig(temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_seeded_sampling_is_reproducible_and_stops_at_stop_ids(model):
    cfg = SamplingConfig(temperature=1.0, top_k=None)
    a = generate(model, [1, 2, 3], 30, cfg, seed=7)
    assert a == generate(model, [1, 2, 3], 30, cfg, seed=7)
    assert a != generate(model, [1, 2, 3], 30, cfg, seed=8)
    stopped = generate(model, [1, 2, 3], 30, cfg, seed=7, stop_ids=(a[4],))
    assert stopped == a[:a.index(a[4]) + 1]


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample(logits, SamplingConfig(temperature=1.0, top_k=2), gen)
    assert set(picked.tolist()) == {0, 1}
    # p(0) ~ 0.64, p(1) ~ 0.24: the nucleus for top_p=0.7 is tokens {0, 1}.
    picked = sample(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.7), gen)
    assert set(picked.tolist()) == {0, 1}
    picked = sample(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.5), gen)
    assert set(picked.tolist()) == {0}
    assert sample(logits[:1], SamplingConfig(temperature=0)).item() == 0


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
