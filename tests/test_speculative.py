"""Prompt-lookup speculative decoding in the engine: drafts, greedy identity with plain
decoding (batched, with penalties, stop strings and limits), the sampled distribution; and
the same greedy identity on the real SmolLM2 (slow)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.infer.engine import Engine, PromptTooLong, Request, generate
from lmforge.infer.sampling import SamplingConfig, filtered_logits
from lmforge.infer.speculative import SpeculativeStats, propose
from lmforge.modeldir import save_model
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import train_char

from .smollm2 import smollm2_gguf

GREEDY = SamplingConfig(temperature=0)
VARIANTS = {
    "gpt2-style": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama-gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                      tie_embeddings=False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models' ops are too small to split; on a busy machine, waiting for a second
    thread costs more than the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(vocab_size: int = 50, **overrides) -> Decoder:
    # A wider init than the default, so greedy output wanders instead of repeating one token.
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=vocab_size,
                      context_length=32, init_std=0.2, **overrides)
    return Decoder(cfg).eval()


def successor(vocab_size: int, sharpness: float) -> Decoder:
    """A model whose next token is mostly the current one plus 1 (mod vocab): one-hot
    embeddings and an output layer that maps each to its successor dominate the random
    blocks, so a prompt that counts up drafts exactly what the model then predicts."""
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                vocab_size=vocab_size, context_length=32, positions="rope",
                                norm="rmsnorm", mlp="swiglu", tie_embeddings=False)).eval()
    with torch.no_grad():
        eye = torch.eye(vocab_size, 32)
        model.embed.weight.copy_(eye)
        model.lm_head.weight.copy_(sharpness * eye.roll(1, dims=0))
    return model


def speculative(model: Decoder, prompt: list[int], n: int, sampling=GREEDY, ngram: int = 3,
                max_draft: int = 8, stats: SpeculativeStats | None = None, **request
                ) -> list[int]:
    """The tokens of one request through an engine that drafts; `stats` adds its counts."""
    engine = Engine(model, draft=max_draft, ngram=ngram)
    tokens = engine.run([Request(prompt, n, sampling, **request)])[0].tokens
    if stats is not None:
        for name in ("forwards", "drafted", "accepted"):
            setattr(stats, name, getattr(stats, name) + getattr(engine.speculation, name))
    return tokens


def test_propose_copies_what_followed_the_latest_occurrence_of_the_longest_suffix():
    tokens = [1, 2, 3, 4, 5, 3, 4, 6, 2, 3, 4]
    assert propose(tokens, 3, 3) == [5, 3, 4]  # "2 3 4" occurred at the start
    assert propose(tokens, 2, 3) == [6, 2, 3]  # "3 4" last occurred in the middle
    assert propose([1, 2, 8, 1, 2, 9, 1, 2], 2, 8)[:1] == [9]  # the latest occurrence wins
    assert propose([7, 1, 9, 9, 1], 3, 2) == [9, 9]  # back off to a single token
    assert propose([1, 2, 3, 4], 3, 8) == []  # nothing repeats
    assert propose([1, 2, 3], 3, 8) == []  # the suffix is not an earlier occurrence of itself
    assert propose([5], 3, 8) == []
    assert propose([1, 2, 1, 2], 2, 0) == []


def test_propose_continues_a_repeat_that_reaches_the_end():
    assert propose([1, 2, 3, 1, 2, 3], 3, 8) == [1, 2, 3, 1, 2, 3, 1, 2]
    assert propose([4, 5, 5], 3, 4) == [5, 5, 5, 5]
    assert propose([0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 3, 4) == [2, 3, 4, 5]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ngram,max_draft", [(3, 8), (1, 3), (2, 1)])
def test_greedy_speculation_gives_the_tokens_of_plain_greedy_decoding(variant, ngram, max_draft):
    model = tiny(**VARIANTS[variant])
    for prompt in ([5, 6, 7, 8, 5, 6, 7, 9, 5, 6], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7]):
        stats = SpeculativeStats()
        out = speculative(model, prompt, 20, ngram=ngram, max_draft=max_draft, stats=stats)
        assert out == generate(model, prompt, 20, GREEDY)
        assert stats.drafted > 0 and stats.accepted <= stats.drafted


def test_a_vision_language_model_speculates_on_text_as_it_decodes_plainly():
    from lmforge.config import resolve_vlm_config
    from lmforge.models.vlm import VLM

    torch.manual_seed(0)
    model = VLM(resolve_vlm_config({"preset": "vlm-tiny", "image_token_id": 49,
                                    "text": {"vocab_size": 50}})).eval()
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    assert speculative(model, prompt, 20) == generate(model, prompt, 20, GREEDY)


def test_drafts_the_model_agrees_with_are_all_accepted():
    model = successor(16, sharpness=5.0)
    prompt = list(range(16)) + [0, 1]
    stats = SpeculativeStats()
    out = speculative(model, prompt, 12, max_draft=4, stats=stats)
    assert out == generate(model, prompt, 12, GREEDY) == list(range(2, 14))
    # The first token from the prompt's pass, then [last token] + 4 drafted per step: 5
    # tokens a step, and a last step with no room left to draft.
    assert (stats.forwards, stats.drafted, stats.accepted) == (3, 8, 8)
    assert stats.acceptance == 1.0


def test_stop_ids_and_max_new_tokens_are_respected():
    model = tiny()
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    full = generate(model, prompt, 20, GREEDY)
    stop = full[6]
    assert speculative(model, prompt, 20, stop_ids=(stop,)) == full[:full.index(stop) + 1]
    for n in (0, 1, 2, 7):
        assert speculative(model, prompt, n) == full[:n]
    # A draft that would pass the limit is cut: the model agrees with all of it.
    assert speculative(successor(16, 5.0), list(range(16)) + [0, 1], 3) == [2, 3, 4]


def test_generation_stops_at_the_context_end_like_plain_decoding():
    model = successor(16, 5.0)  # context 32; every draft would be accepted
    prompt = list(range(16)) + list(range(14))
    assert speculative(model, prompt, 100) == generate(model, prompt, 100, GREEDY) == [14, 15]
    long = list(range(16)) * 3
    out = speculative(model, long, 100, truncate=True)
    assert out == generate(model, long, 100, GREEDY, truncate=True) == [0]
    with pytest.raises(PromptTooLong, match="truncation"):
        speculative(model, long, 100)


def test_sequences_drafting_together_decode_as_each_alone_with_penalties():
    """A batch of drafting sequences, some penalised: every one gets plain decoding's tokens;
    the penalties count each kept draft token before the next is checked."""
    model = tiny()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 9, 5, 6], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7],
               [9, 8, 9, 8, 9, 8]]
    settings = [GREEDY, SamplingConfig(temperature=0, repetition_penalty=1.3),
                SamplingConfig(temperature=0, presence_penalty=0.5, frequency_penalty=0.4),
                GREEDY]
    requests = [Request(p, 16 + i, cfg) for i, (p, cfg) in enumerate(zip(prompts, settings))]
    engine = Engine(model, max_batch=3, draft=6)
    done = engine.run(requests)
    alone = Engine(model, max_batch=3).run(requests)
    assert [c.tokens for c in done] == [c.tokens for c in alone]
    assert engine.speculation.accepted > 0
    with pytest.raises(ValueError, match="draft must be >= 0"):
        Engine(model, draft=-1)


def exact_distribution(model: Decoder, prompt: list[int], n: int, cfg: SamplingConfig
                       ) -> dict[tuple[int, ...], float]:
    """Probability of every n-token continuation under plain sampling, by enumeration."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        longer = {}
        for seq, p in dist.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(seq)]))[:, -1]
            probs = torch.softmax(filtered_logits(logits, cfg), dim=-1)
            for token, q in enumerate(probs[0].tolist()):
                if q > 0:
                    longer[seq + (token,)] = p * q
        dist = longer
    return dist


def chi_square_fits(counts: Counter, expected: dict, draws: int) -> tuple[float, float]:
    """Pearson's statistic (cells expecting fewer than 5 draws pooled) and its critical value
    at p = 0.001 (Wilson-Hilferty approximation of the chi-square quantile)."""
    statistic, cells, pooled_seen, pooled_expected = 0.0, 0, 0, 0.0
    for seq, p in expected.items():
        if p * draws < 5:
            pooled_seen += counts[seq]
            pooled_expected += p * draws
        else:
            statistic += (counts[seq] - p * draws) ** 2 / (p * draws)
            cells += 1
    assert sum(counts.values()) == draws and set(counts) <= set(expected)
    statistic += (pooled_seen - pooled_expected) ** 2 / pooled_expected
    df = cells  # cells + the pooled one, minus one
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return statistic, critical


def test_sampled_tokens_follow_the_plain_sampling_distribution():
    """The first three sampled tokens over 1,500 seeds against their exact distribution.
    The prompt counts up, so the draft's tokens are likely but not certain (p ~ 0.7) and
    acceptance and rejection both happen often. Seeds are fixed: the test cannot flake; a
    sampler that keeps the rejected token in the residual scores ~500 against ~35."""
    model = successor(8, sharpness=0.45)
    prompt = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    cfg = SamplingConfig(temperature=0.9, top_k=6, top_p=0.95, min_p=0.05)
    stats = SpeculativeStats()
    draws = 1500
    counts = Counter(tuple(speculative(model, prompt, 3, cfg, seed=seed, stats=stats))
                     for seed in range(draws))
    assert 0.3 < stats.acceptance < 0.9
    statistic, critical = chi_square_fits(counts, exact_distribution(model, prompt, 3, cfg),
                                          draws)
    assert statistic < critical
    assert speculative(model, prompt, 10, cfg, seed=3) == speculative(model, prompt, 10, cfg,
                                                                     seed=3)


def test_stop_strings_and_the_cli_flag_match_plain_generation(tmp_path, capsys):
    tokenizer = train_char("abcdefgh ")
    model = tiny(vocab_size=tokenizer.vocab_size)
    prompt = "abc defg abc de"
    ids = tokenizer.encode(prompt)
    plain = generate(model, ids, 12, GREEDY)
    stop = tokenizer.decode(plain[4:6])
    requests = [Request(ids, 12, GREEDY, stop=(stop,)), Request(ids, 12, GREEDY)]
    drafted = Engine(model, tokenizer, draft=8).run(requests)
    assert [c.text for c in drafted] == [c.text for c in Engine(model, tokenizer).run(requests)]
    assert drafted[0].finish_reason == "stop" and stop not in drafted[0].text
    save_model(tmp_path, model, tokenizer)
    args = ["generate", str(tmp_path), "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "12"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert main([*args, "--speculative"]) == 0
    assert capsys.readouterr().out == expected == prompt + tokenizer.decode(plain) + "\n"


CORRECTION_REQUEST = (
    "Correct the spelling mistakes in this text and reply with the corrected text only.\n\n"
    "The river runs throught the valley and past the old mill, wich was built in 1820. "
    "Every spring the water rises and the farmers move there sheep to the higher fields."
)


@pytest.mark.slow
def test_smollm2_speculative_greedy_matches_plain_greedy(tmp_path_factory):
    from lmforge.chat import chat_prompt_ids
    from lmforge.interop.gguf import import_gguf
    from lmforge.modeldir import stop_token_ids
    from lmforge.open import open_model

    directory = import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))
    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    stop = stop_token_ids(directory, tokenizer)
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": CORRECTION_REQUEST}])
    stats = SpeculativeStats()
    out = speculative(model, prompt, 64, stop_ids=stop, stats=stats)
    assert out == generate(model, prompt, 64, GREEDY, stop_ids=stop)
    assert out[-1] in stop  # the answer ended by itself: every token was checked
    # The answer copies much of the text: drafts are accepted and forwards saved.
    assert stats.acceptance > 0.2 and stats.forwards < 0.75 * len(out)
