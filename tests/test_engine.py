"""The inference engine: batching, continuous batching, text streaming, stops, logprobs."""

import pytest
import torch

from lmforge.infer.engine import Detokenizer, Engine, PromptTooLong, Request, generate
from lmforge.infer.sampling import SamplingConfig, apply_penalties, filtered_logits
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer) -> Tokenizer:
    return bpe_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer, tiny_llama) -> Decoder:
    return tiny_llama(tokenizer.vocab_size, context_length=64)


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


@pytest.mark.slow
def test_a_compiled_engine_decodes_the_same_tokens(model, tokenizer):
    requests = [Request(p, 8, GREEDY) for p in prompts(tokenizer)[:3]]
    eager = Engine(model, tokenizer, max_batch=2, max_len=40).run(requests)
    compiled = Engine(model, tokenizer, max_batch=2, max_len=40, compile=True).run(requests)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
