"""The inference engine: batching, continuous batching, text streaming, stops, logprobs."""

import copy

import pytest
import torch

from lmforge.compress.quant import QuantSpec, quantize
from lmforge.infer.engine import (
    PAGE,
    CacheTooLarge,
    Detokenizer,
    Engine,
    PromptTooLong,
    Request,
    default_kv_dtype,
    generate,
    kv_dtype_named,
)
from lmforge.infer.sampling import SamplingConfig, apply_penalties, filtered_logits, sample
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer) -> Tokenizer:
    return bpe_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer, tiny_llama) -> Decoder:
    return tiny_llama(tokenizer.vocab_size, context_length=64)


@pytest.fixture(scope="module")
def id_model(tiny_llama) -> Decoder:
    """A model over 300 token ids, for tests that need no text."""
    return tiny_llama(300, context_length=64)


def prompts(tokenizer) -> list[list[int]]:
    texts = ["ROMEO:", "First Citizen:\nBefore we proceed", "O", "Café — naïve 😀 so",
             "What light through yonder window breaks? It is"]
    return [tokenizer.encode(t) for t in texts]


def test_batched_and_continuous_decoding_match_decoding_each_alone(model, tokenizer):
    """Five prompts of different lengths through three slots: sequences join as others
    finish (different max_new_tokens), and every one gets its solo greedy tokens."""
    requests = [Request(p, max_new_tokens=6 + 3 * i, sampling=GREEDY)
                for i, p in enumerate(prompts(tokenizer))]
    done = Engine(model, tokenizer, max_batch=3).run(requests)
    for request, completion in zip(requests, done):
        assert completion.tokens == generate(model, request.prompt, request.max_new_tokens, GREEDY)
        assert completion.finish_reason == "length"
        assert completion.usage["completion_tokens"] == request.max_new_tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_cache_holds_half_the_bytes_and_scores_as_a_float32_one(model, tokenizer, dtype):
    """The same tokens fed through an engine whose cache rounds keys and values to 16 bits:
    their log-probabilities (batched, a prompt read in chunks) within that rounding."""
    texts = prompts(tokenizer)[:3]
    full = Engine(model, tokenizer, max_batch=3, prefill_chunk=4)
    half = Engine(model, tokenizer, max_batch=3, prefill_chunk=4, kv_dtype=dtype)
    assert 2 * half.cache_bytes(3) == full.cache_bytes(3)
    requests = [Request(p, 8, GREEDY, logprobs=0) for p in texts]
    done = full.run(requests)
    # scored: each prompt followed by what the float32 engine generated
    scored = half.run([Request(p + d.tokens, 0, GREEDY, prompt_logprobs=True)
                       for p, d in zip(texts, done)])
    for d, s, p in zip(done, scored, texts):
        expected = torch.tensor([lp.logprob for lp in d.logprobs])
        got = torch.tensor([lp.logprob for lp in s.prompt_logprobs[len(p):]])
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
    # and decoding steps (on a CPU, lmforge's kernel reading the 16-bit cache) the same way
    generated = half.run(requests)
    rescored = full.run([Request(p + g.tokens, 0, GREEDY, prompt_logprobs=True)
                         for p, g in zip(texts, generated)])
    for g, r, p in zip(generated, rescored, texts):
        expected = torch.tensor([lp.logprob for lp in r.prompt_logprobs[len(p):]])
        got = torch.tensor([lp.logprob for lp in g.logprobs])
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(model, tokenizer, kv_dtype=torch.int8)


def test_a_quantized_model_caches_float16_unless_asked_otherwise(model, tokenizer):
    """int8 or int4 weights computing in float32: a float16 cache by default, as llama.cpp
    keeps one; a float model, or `--kv-cache model`, keeps the model's own float type."""
    quantized = quantize(copy.deepcopy(model), QuantSpec(4, 32))
    assert default_kv_dtype(model) is None and default_kv_dtype(quantized) == torch.float16
    assert default_kv_dtype(copy.deepcopy(quantized).to(torch.bfloat16)) is None
    chosen = {name: Engine(quantized, tokenizer, max_batch=2, prefill_chunk=4,
                           kv_dtype=kv_dtype_named(name, quantized)) for name in ("auto", "model")}
    auto, float32 = chosen["auto"], chosen["model"]
    assert float32.kv_dtype == torch.float32 and auto.kv_dtype == torch.float16
    assert 2 * auto.cache_bytes(2) == float32.cache_bytes(2)
    assert Engine(model, tokenizer).cache_bytes(2) == float32.cache_bytes(2)
    # the same prompts scored through each cache, a few tokens a step
    requests = [Request(p, 0, GREEDY, prompt_logprobs=True) for p in prompts(tokenizer)[:2]]
    for a, f in zip(auto.run(requests), float32.run(requests)):
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.prompt_logprobs[1:]]),
                                   torch.tensor([lp.logprob for lp in f.prompt_logprobs[1:]]),
                                   atol=0.05, rtol=0)


def test_a_prompt_read_in_chunks_decodes_as_one_read_whole(model, tokenizer):
    """Prompts go into the cache a few tokens a step, beside sequences already decoding
    (in slots before and after theirs): the same tokens, log-probabilities and prompt
    log-probabilities as prompts read whole."""
    texts = prompts(tokenizer) + [tokenizer.encode("Now is the winter of our discontent "
                                                   "made glorious summer by this sun of York")]
    requests = [Request(p, 5 + 2 * i, GREEDY, logprobs=2, prompt_logprobs=True)
                for i, p in enumerate(texts)]
    whole = Engine(model, tokenizer, max_batch=3, prefill_chunk=0).run(requests)
    chunked = Engine(model, tokenizer, max_batch=3, prefill_chunk=3).run(requests)
    for a, b in zip(whole, chunked):
        assert a.tokens == b.tokens
        for first, second in ((a.logprobs, b.logprobs), (a.prompt_logprobs[1:], b.prompt_logprobs[1:])):
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in first]),
                                       torch.tensor([lp.logprob for lp in second]),
                                       atol=1e-5, rtol=0)


def test_a_long_prompt_does_not_stall_the_sequences_decoding(id_model):
    """With prefill_chunk=4, a 40-token prompt takes 10 steps to go in, and the sequence
    already decoding gets a token in every one of them."""
    engine = Engine(id_model, max_batch=2, prefill_chunk=4)
    running = engine.submit(Request([5, 9], 30, GREEDY))
    assert [e.request_id for e in engine.step()] == [running]
    long = engine.submit(Request(list(range(1, 41)), 3, GREEDY))
    steps = [engine.step()]
    while long not in [e.request_id for e in steps[-1]]:
        steps.append(engine.step())
    assert len(steps) == 10
    assert all(running in [e.request_id for e in step] for step in steps)
    assert not engine.filling
    with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
        Engine(id_model, prefill_chunk=-1)


def test_streamed_text_concatenates_to_the_full_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    request = Request(tokenizer.encode("Café 😀"), max_new_tokens=40,
                      sampling=SamplingConfig(temperature=1.0, top_k=None), seed=3)
    events = list(engine.stream(request))
    text = "".join(e.text for e in events)
    tokens = [e.token for e in events]
    assert text == tokenizer.decode(tokens)
    assert events[-1].finish_reason == "length" and len(tokens) == 40


def test_detokenizer_never_releases_half_a_character(tokenizer):
    text = "naïve 😀🎉 日本語 — ok"
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(t) for t in tokenizer.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text


def test_stop_strings_cut_the_text_exactly(model, tokenizer):
    prompt = tokenizer.encode("KING RICHARD:")
    sampling = SamplingConfig(temperature=1.0, top_k=None)
    free = Engine(model, tokenizer).run([Request(prompt, 40, sampling, seed=1)])[0]
    stop = free.text[7:10]
    cut_at = free.text.find(stop)
    engine = Engine(model, tokenizer)
    events = list(engine.stream(Request(prompt, 40, sampling, seed=1, stop=(stop, "never!"))))
    assert "".join(e.text for e in events) == free.text[:cut_at]
    assert events[-1].finish_reason == "stop"


def test_stop_ids_end_the_sequence_and_stay_out_of_the_text(model, tokenizer):
    prompt = tokenizer.encode("ROMEO:")
    free = Engine(model, tokenizer).run([Request(prompt, 20, GREEDY)])[0]
    stop_id = free.tokens[5]
    done = Engine(model, tokenizer).run([Request(prompt, 20, GREEDY, stop_ids=(stop_id,))])[0]
    first = free.tokens.index(stop_id)
    assert done.tokens == free.tokens[:first + 1]
    assert done.text == tokenizer.decode(free.tokens[:first])
    assert done.finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_a_full_forward_pass(model, tokenizer):
    prompt = tokenizer.encode("To be, or not to be")
    done = Engine(model, tokenizer).run([
        Request(prompt, 8, SamplingConfig(temperature=1.0), seed=0, logprobs=3,
                prompt_logprobs=True)])[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + done.tokens]))[0], dim=-1)
    expected = full[torch.arange(len(prompt) - 1, len(prompt) + 7), torch.tensor(done.tokens)]
    got = torch.tensor([lp.logprob for lp in done.logprobs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    for i, lp in enumerate(done.logprobs):
        top = full[len(prompt) - 1 + i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
    assert done.prompt_logprobs[0] is None
    prompt_expected = full[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    got = torch.tensor([lp.logprob for lp in done.prompt_logprobs[1:]])
    torch.testing.assert_close(got, prompt_expected, atol=1e-4, rtol=0)


def test_scoring_only_needs_no_new_tokens(model, tokenizer):
    prompt = tokenizer.encode("Good morrow")
    done = Engine(model, tokenizer).run([Request(prompt, 0, GREEDY, prompt_logprobs=True,
                                                 logprobs=0)])[0]
    assert done.tokens == [] and done.finish_reason == "length"
    assert len(done.prompt_logprobs) == len(prompt)


def test_seeded_sampling_repeats_exactly_even_beside_other_requests(model, tokenizer):
    sampling = SamplingConfig(temperature=1.0, top_k=None)
    prompt = tokenizer.encode("HAMLET:")
    alone = Engine(model, tokenizer).run([Request(prompt, 25, sampling, seed=11)])[0].tokens
    crowd = [Request(p, 25, sampling, seed=i) for i, p in enumerate(prompts(tokenizer))]
    batched = Engine(model, tokenizer, max_batch=4).run(
        crowd[:2] + [Request(prompt, 25, sampling, seed=11)] + crowd[2:])
    assert batched[2].tokens == alone
    other = Engine(model, tokenizer).run([Request(prompt, 25, sampling, seed=12)])[0].tokens
    assert other != alone


def test_a_prompt_longer_than_the_context_is_refused_unless_truncation_is_asked(model):
    engine = Engine(model)
    with pytest.raises(PromptTooLong, match="64 tokens; at most 63"):
        engine.submit(Request(list(range(64)), 5))
    done = engine.run([Request(list(range(70)), 5, GREEDY, truncate=True)])[0]
    assert done.prompt == list(range(7, 70)) and len(done.tokens) == 1
    assert len(generate(model, list(range(60)), 100, GREEDY)) == 4


def test_cancel_frees_the_slot_for_a_waiting_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    first = engine.submit(Request(tokenizer.encode("A"), 50, GREEDY))
    second = engine.submit(Request(tokenizer.encode("B"), 3, GREEDY))
    engine.step()
    assert (engine.stats().active, engine.stats().waiting) == (1, 1)
    engine.cancel(first)
    finished = []
    while engine.has_work():
        finished += [e.request_id for e in engine.step() if e.finish_reason is not None]
    assert finished == [second]


def test_penalties_and_min_p():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 2.0, 0.0, 0.0])
    cfg = SamplingConfig(repetition_penalty=2.0)
    assert apply_penalties(logits, cfg, seen, counts).tolist() == [1.0, -2.0, 0.5, 0.0]
    cfg = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits, cfg, seen, counts).tolist() == [2.0, -2.0, 0.5, 0.0]
    cut = filtered_logits(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])),
                          SamplingConfig(temperature=1.0, top_k=None, min_p=0.35))
    assert torch.isinf(cut).tolist() == [[False, False, True, True]]


def test_penalised_greedy_decoding_avoids_repeats(model, tokenizer):
    prompt = tokenizer.encode("the the the")
    plain = Engine(model, tokenizer).run([Request(prompt, 30, GREEDY)])[0].tokens
    penalised = Engine(model, tokenizer).run([Request(
        prompt, 30, SamplingConfig(temperature=0, frequency_penalty=2.0))])[0].tokens
    assert len(set(penalised)) > len(set(plain))


def test_an_engine_compiling_after_its_first_answer_gives_that_answer_eagerly(
        model, tokenizer, monkeypatch):
    # a server's engine: compiling beside its first request would hold that answer up
    requests = [Request(p, 8, GREEDY) for p in prompts(tokenizer)[:2]]
    eager = [c.tokens for c in Engine(model, tokenizer, max_batch=2, max_len=40).run(requests)]
    engine = Engine(model, tokenizer, max_batch=2, max_len=40, compile=True, compile_after=1)
    started = []  # when compiling would start: after how many answers
    monkeypatch.setattr(engine, "start_compiling", lambda: started.append(engine.answered))
    engine.compile_if_due()  # a server's engine thread, idle before any request
    assert [c.tokens for c in engine.run(requests[:1])] == eager[:1] and started == []
    engine.compile_if_due()  # idle again, one request answered
    assert started == [1]
    assert [c.tokens for c in engine.run(requests[1:])] == eager[1:] and set(started) == {1}


@pytest.mark.slow
def test_a_compiled_engine_decodes_the_same_tokens_and_answers_at_once_the_next_time(
        model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled yet
    requests = [Request(p, 8, GREEDY) for p in prompts(tokenizer)[:3]]
    eager = [c.tokens for c in Engine(model, tokenizer, max_batch=2, max_len=40).run(requests)]
    torch._dynamo.reset()
    engine = Engine(model, tokenizer, max_batch=2, max_len=40, compile=True)
    first = engine.stream(requests[0])
    assert next(first).token == eager[0][0] and engine.compiled  # the first step compiled
    assert engine.cache.batch == 2 and engine.cache.length == 40
    first.close()
    assert [c.tokens for c in engine.run(requests)] == eager

    torch._dynamo.reset()  # a new process, as far as compiling goes
    again = Engine(model, tokenizer, max_batch=2, max_len=40, compile=True)
    first = again.stream(requests[0])
    assert next(first).token == eager[0][0] and not again.compiled  # eager meanwhile
    first.close()
    again.wait_compiled()
    assert again.compiled and [c.tokens for c in again.run(requests)] == eager
    again.prefill_chunk = 2  # prompts going in beside the compiled step's rows
    assert [c.tokens for c in again.run(requests)] == eager


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_a_compiled_quantized_engine_decodes_the_same_tokens(model, tokenizer, bits):
    """The int kernels run inside the compiled step (nothing in a layer's forward breaks
    the graph), with the eager engine's tokens."""
    import copy

    from lmforge.compress.quant import QuantSpec, quantize

    quantized = quantize(copy.deepcopy(model), QuantSpec(bits, None if bits == 8 else 32))
    requests = [Request(p, 8, GREEDY) for p in prompts(tokenizer)[:3]]
    eager = Engine(quantized, tokenizer, max_batch=2, max_len=40).run(requests)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        compiled = Engine(quantized, tokenizer, max_batch=2, max_len=40, compile=True)
        compiled.wait_compiled()
        assert [c.tokens for c in compiled.run(requests)] == [c.tokens for c in eager]
    with torch.no_grad():
        explained = torch._dynamo.explain(compiled.model)(
            torch.zeros(2, 1, dtype=torch.long), cache=compiled.cache, start=torch.tensor([3, 5]))
    assert explained.graph_break_count == 0


@pytest.mark.slow
def test_a_compiled_engine_with_a_16_bit_cache_decodes_as_the_eager_one(model, tokenizer):
    requests = [Request(p, 8, GREEDY) for p in prompts(tokenizer)[:3]]
    half = dict(max_batch=2, max_len=40, kv_dtype=torch.float16)
    eager = Engine(model, tokenizer, **half).run(requests)
    torch._dynamo.reset()
    compiled = Engine(model, tokenizer, compile=True, **half)
    compiled.wait_compiled()
    assert compiled.cache.k.dtype == torch.float16
    assert [c.tokens for c in compiled.run(requests)] == [c.tokens for c in eager]


@pytest.mark.parametrize("settings", [dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300),
                                      dict(temperature=1e-300, top_p=1e-300)])
def test_vanishing_temperature_or_top_p_picks_the_best_token(settings):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [30.0, -30.0, 29.0, 0.0]])
    assert sample(logits, SamplingConfig(top_k=None, **settings)).tolist() == [1, 0]


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_extreme_repetition_penalties_keep_the_logits_finite(penalty):
    logits = torch.tensor([2.0, -1.0, 0.0, 0.5])
    seen = torch.tensor([True, True, True, False])
    cfg = SamplingConfig(temperature=1.0, repetition_penalty=penalty)
    penalised = apply_penalties(logits, cfg, seen, torch.zeros(4))
    assert torch.isfinite(penalised).all()
    sample(penalised.view(1, -1), cfg, torch.Generator().manual_seed(0))  # a distribution
    best = penalised.argmax().item()
    assert best == (0 if penalty < 1 else 3)  # the seen 2.0 grows, or shrinks below 0.5


def test_generating_at_a_vanishing_temperature_is_greedy(id_model):
    """`lmforge generate --temperature 1e-300` decodes through here."""
    prompt = [5, 9, 12]
    tiny = generate(id_model, prompt, 8, SamplingConfig(temperature=1e-300), seed=0)
    assert tiny == generate(id_model, prompt, 8, GREEDY)


def test_scoring_a_one_token_prompt(id_model):
    """What lm-eval asks for a one-token context: nothing to score before it."""
    done = Engine(id_model).run([Request([5], 1, GREEDY, logprobs=2, prompt_logprobs=True),
                              Request([5], 0, GREEDY, logprobs=0, prompt_logprobs=True)])
    assert [c.prompt_logprobs for c in done] == [[None], [None]]
    assert len(done[0].tokens) == 1 and len(done[0].logprobs[0].top) == 2


def test_token_ids_outside_the_model_s_vocabulary_are_refused(id_model):
    engine = Engine(id_model)
    vocab = id_model.cfg.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the model's vocabulary"):
            engine.submit(Request([5, bad], 3, GREEDY))
    assert not engine.has_work()


def test_any_integer_is_a_seed(id_model):
    sampling = SamplingConfig(temperature=1.0, top_k=None)
    runs = Engine(id_model, max_batch=3).run(
        [Request([5, 9], 6, sampling, seed=seed) for seed in (7, 2**64 + 7, -(2**70))])
    assert runs[0].tokens == runs[1].tokens  # seeds are taken modulo 2**64
    assert len(runs[2].tokens) == 6


def test_a_compiled_engine_s_whole_kv_cache_is_refused_before_it_is_allocated(id_model):
    with pytest.raises(CacheTooLarge, match=r"needs .* GB .*--max-batch N --max-len N"):
        Engine(id_model, max_batch=1 << 40, compile=True)


def test_the_paged_kv_cache_holds_the_blocks_of_the_tokens_in_use(tiny_llama):
    model = tiny_llama(300, context_length=1024)
    engine = Engine(model, max_batch=4)
    idle = engine.cache.nbytes
    assert engine.stats().kv_cache_bytes == idle and engine.cache.k.shape[1] == 1  # block 0 only
    requests = [Request([5, 9], 4, GREEDY), Request(list(range(1, 251)), 20, GREEDY),
                Request([7], 30, GREEDY)]
    ids = [engine.submit(r) for r in requests]
    pool, done = [], {}
    while engine.has_work():
        done.update((e.request_id, e.completion) for e in engine.step() if e.completion)
        for s in filter(None, engine.slots):
            # each sequence holds the fewest blocks its cached positions fit in
            assert len(engine.cache.owned[s.slot]) in (-(-s.position // PAGE),
                                                       -(-(s.position + 1) // PAGE))
        pool.append(engine.cache.k.shape[1])
    for i, request in zip(ids, requests):
        assert done[i].tokens == generate(model, request.prompt, request.max_new_tokens, GREEDY)
    # at most 1 + 17 + 2 blocks in use at once (270, 6 and 31 positions): the pool, grown by
    # half at a time, stays near that, far from 4 slots x 1024 positions
    assert 20 <= max(pool) <= 2 * 20 < 4 * 1024 // PAGE
    assert engine.cache.nbytes == idle  # all given back once idle
    # a finished sequence's blocks go to the next one at once
    engine.run([Request([5, 9], 40, GREEDY)])
    assert engine.cache.nbytes == idle


def test_the_cache_s_layer_views_are_its_own_memory_held_as_frozen_parameters(tiny_llama):
    """A compiled step checks the Parameters it reads less often than other tensors (see
    `lmforge.layers.frozen`): the views stay the cache's memory, and follow its pool's growth."""
    engine = Engine(tiny_llama(300, context_length=1024), max_batch=2)
    first = engine.cache.k.shape[1]
    engine.submit(Request(list(range(1, 100)), 4, GREEDY))
    engine.step()
    cache = engine.cache
    assert cache.k.shape[1] > first  # the pool grew: new tensors, new views
    for i, layer in enumerate(cache.layers):
        for view, whole in ((layer.k, cache.k), (layer.v, cache.v)):
            assert isinstance(view, torch.nn.Parameter) and not view.requires_grad
            assert view.data_ptr() == whole[i].data_ptr() and view.shape == whole[i].shape


def test_a_cache_that_cannot_grow_fails_its_step_with_the_fix(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama(300, context_length=1024), max_batch=2)
    engine.submit(Request(list(range(1, 300)), 4, GREEDY))
    monkeypatch.setattr("lmforge.infer.engine.available_memory", lambda device: 10_000)
    with pytest.raises(CacheTooLarge, match=r"KV cache needs .* GB .*--max-len N"):
        engine.step()


def test_a_seq2seq_cache_counts_each_slot_s_source_memory():
    from lmforge.config import Seq2SeqConfig
    from lmforge.infer.seq2seq import Seq2SeqEngine
    from lmforge.models.seq2seq import Seq2Seq
    from lmforge.tokenizer import train_bpe

    tokenizer = train_bpe(["a small text to frame targets with"], vocab_size=300)
    model = Seq2Seq(Seq2SeqConfig(n_encoder_layer=1, n_decoder_layer=2, n_head=2, d_model=16,
                                  d_mlp=32, vocab_size=tokenizer.vocab_size, max_length=24))
    engine = Seq2SeqEngine(model, tokenizer, max_batch=3, max_len=10)
    memory = 2 * 2 * 24 * 16 * 4  # k and v, 2 layers, 24 source positions, fp32: per slot
    assert engine.cache_bytes(3) == 3 * (2 * 2 * 10 * 16 * 4 + memory)
    assert engine.cache.nbytes == engine.cache_bytes(1)  # one slot until a second is used


def test_a_compiled_step_of_other_code_is_not_taken_for_one_compiled_before(id_model, monkeypatch):
    # a step compiled before compiles again in the background; one of edited (or upgraded)
    # code compiles from nothing, which must happen in the foreground
    from lmforge.infer import engine as engine_module

    before = engine_module._compiled_marker(id_model, 2, 64, 2, torch.float32)
    assert engine_module._compiled_marker(id_model, 2, 64, 2, torch.float32) == before
    assert engine_module._compiled_marker(id_model, 2, 64, 2, torch.float16) != before
    monkeypatch.setattr(engine_module, "_source_digest", lambda: "edited")
    assert engine_module._compiled_marker(id_model, 2, 64, 2, torch.float32) != before
