"""The HTTP server, driven by the official `openai` client against a real localhost server."""

import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge.config import ModelConfig
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.serve.app import ServeConfig, create_app
from lmforge.tokenizer import Tokenizer

NAME = "tiny-shakespeare"
GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer) -> Tokenizer:
    return bpe_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer, tiny_llama) -> Decoder:
    return tiny_llama(tokenizer.vocab_size, context_length=128)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(model, tokenizer, **options):
    cfg = ServeConfig(NAME, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, (), cfg),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with running(model, tokenizer, max_batch=4) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def direct(model, tokenizer, prompt: str, n: int, **request) -> str:
    done = Engine(model, tokenizer).run([Request(tokenizer.encode(prompt), n, GREEDY, **request)])
    return done[0].text


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_is_the_engine_s_greedy_text(client, model, tokenizer):
    reply = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0)
    assert reply.choices[0].text == direct(model, tokenizer, "ROMEO:", 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(tokenizer.encode("ROMEO:"))


def test_several_prompts_and_n_choices(client):
    reply = client.completions.create(model=NAME, prompt=["To be", "or not"], max_tokens=5,
                                      n=2, temperature=1.0, seed=4)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = client.completions.create(model=NAME, prompt=["To be", "or not"], max_tokens=5,
                                      n=2, temperature=1.0, seed=4)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


def test_streamed_completion_concatenates_to_the_whole(client):
    whole = client.completions.create(model=NAME, prompt="KING:", max_tokens=20, temperature=0)
    stream = client.completions.create(model=NAME, prompt="KING:", max_tokens=20,
                                       temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == whole.choices[0].text


def test_chat_completion_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who are you?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=15,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 15
    assert chunks[-2].choices[0].finish_reason == "length"


def test_echoed_logprobs_are_the_model_s_log_softmax(client, model, tokenizer):
    """What lm-evaluation-harness asks for log-likelihoods: the prompt's token logprobs plus
    exactly one generated token."""
    prompt = tokenizer.encode("Good morrow, cousin")
    reply = client.completions.create(model=NAME, prompt=[prompt], max_tokens=1, logprobs=2,
                                      echo=True, temperature=0)
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    generated = int(Engine(model, tokenizer).run([Request(prompt, 1, GREEDY)])[0].tokens[0])
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + [generated]]))[0], dim=-1)
    expected = full[torch.arange(len(prompt)), torch.tensor(prompt[1:] + [generated])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert reply.choices[0].text.startswith("Good morrow, cousin")


def test_scoring_a_prompt_with_no_new_tokens(client, tokenizer):
    prompt = tokenizer.encode("Good morrow")
    reply = client.completions.create(model=NAME, prompt=[prompt], max_tokens=0, logprobs=1,
                                      echo=True)
    assert len(reply.choices[0].logprobs.token_logprobs) == len(prompt)


def test_chat_logprobs_with_top_alternatives(client):
    reply = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the best one


def test_stop_sequences_cut_the_text(client, model, tokenizer):
    free = direct(model, tokenizer, "ROMEO:", 30)
    stop = free[6:9]
    reply = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=30,
                                      temperature=0, stop=[stop])
    assert reply.choices[0].text == free[:free.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"n": 100}, "n"),
    ({"top_p": 0}, "top_p"),
])
def test_out_of_range_values_are_400s(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", **fields)
    assert err.value.body["param"] == param


def test_unknown_model_is_404_and_too_long_prompt_is_400(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="x")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[list(range(128))])
    assert err.value.code == "context_length_exceeded"


def test_malformed_and_oversized_bodies(server):
    reply = httpx.post(server + "/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "message" in reply.json()["error"]
    reply = httpx.post(server + "/v1/chat/completions", json={"model": NAME})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    reply = httpx.post(server + "/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert reply.status_code == 413


def test_api_key(model, tokenizer):
    with running(model, tokenizer, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == NAME
        assert httpx.get(url + "/health").status_code == 200


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(tokenizer):
    torch.manual_seed(0)
    slow = Decoder(ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=tokenizer.vocab_size,
                               context_length=4096)).eval()  # room for a long answer
    with running(slow, tokenizer, max_batch=1, max_queue=1) as url:
        body = {"model": NAME, "prompt": "A", "max_tokens": 4000, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=30) as http, http.stream(
                "POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: dropping the iterator closes the stream
            next(lines)  # decoding: it holds the only slot
            waiting = threading.Thread(target=lambda: httpx.post(
                url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2},
                timeout=60))
            waiting.start()
            wait_for(lambda: "lmforge_queue_length 1.0" in httpx.get(url + "/metrics").text)
            refused = httpx.post(url + "/v1/completions", json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        # The first client left mid-stream: its slot goes to the waiting request at once.
        waiting.join(timeout=30)
        wait_for(lambda: httpx.get(url + "/health").json()["active"] == 0)
        metrics = httpx.get(url + "/metrics").text
        assert "lmforge_rejected_requests_total 1.0" in metrics
        assert "lmforge_time_to_first_token_seconds_bucket" in metrics
        generated = next(float(line.split()[1]) for line in metrics.splitlines()
                         if line.startswith("lmforge_generation_tokens_total "))
        assert generated < 3000  # the abandoned answer did not run to its end


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stream_ends_with_done(server):
    with httpx.stream("POST", server + "/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"


def test_a_seq2seq_model_answers_completions_and_chat(tokenizer):
    from lmforge.config import Seq2SeqConfig
    from lmforge.infer.seq2seq import translate
    from lmforge.models.seq2seq import Seq2Seq

    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(n_encoder_layer=1, n_decoder_layer=1, n_head=2, d_model=32,
                                  d_mlp=64, vocab_size=tokenizer.vocab_size, max_length=24,
                                  dropout=0.0)).eval()
    sources = ["To be, or not to be", "Romeo"]
    wanted = translate(model, tokenizer, sources, max_new_tokens=8)
    with running(model, tokenizer, max_batch=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=NAME, prompt=sources, max_tokens=8,
                                          temperature=0)
        assert [c.text for c in reply.choices] == wanted
        stream = client.completions.create(model=NAME, prompt=sources[0], max_tokens=8,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == wanted[0]
        chat = client.chat.completions.create(model=NAME, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": sources[1]}])
        assert chat.choices[0].message.content == wanted[1]
        with pytest.raises(openai.BadRequestError, match="source has 30 tokens"):
            client.completions.create(model=NAME, prompt=[[5] * 30], max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="does not score its source"):
            client.completions.create(model=NAME, prompt="x", echo=True, logprobs=1)
