"""The HTTP server, driven by the official `openai` client against a real localhost server."""

import json
import re
import signal
import socket
import subprocess
import sys
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
from lmforge.tokenizer import SPECIAL_TOKENS, SpecialTokens, Tokenizer, train_bpe

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
    with serving(create_app(model, tokenizer, (), ServeConfig(NAME, **options))) as url:
        yield url


@contextmanager
def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
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


def test_a_server_with_a_float16_cache_answers_as_an_engine_with_one(model, tokenizer):
    """`serve --kv-cache float16`: the engine's cache holds float16 values."""
    with running(model, tokenizer, kv_dtype=torch.float16) as url:
        reply = openai.OpenAI(base_url=url + "/v1", api_key="unused").completions.create(
            model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0)
    done = Engine(model, tokenizer, kv_dtype=torch.float16).run(
        [Request(tokenizer.encode("ROMEO:"), 12, GREEDY)])
    assert reply.choices[0].text == done[0].text


def test_a_speculative_server_streams_the_plain_greedy_text(model, tokenizer):
    """`serve --speculative`: answers that repeat their prompt are drafted from it, and the
    text, whole or streamed, is plain greedy decoding's."""
    prompt = "To be, or not to be, that is the question. To be, or not to be,"
    expected = direct(model, tokenizer, prompt, 24)
    with running(model, tokenizer, draft=8) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=24,
                                          temperature=0)
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True)
        assert reply.choices[0].text == expected
        assert "".join(chunk.choices[0].text for chunk in stream) == expected


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


# ---------------------------------------------------------------- one request cannot break it
# Text to train a tokenizer on here, so these tests need no data files.
TEXT = """\
The river town wakes before the sun. Bakers light their ovens, boatmen check their ropes,
and the first carts roll over the stone bridge towards the market square. By seven the
stalls are open: apples and pears, cheese wrapped in cloth, bread still warm, fish on ice.
Children run between the tables; their parents argue about prices and the weather.
"Rain by noon," says the old ferryman, as he has said every morning for forty years.
He is right about half the time, which he counts as a good record.
In the afternoon the square empties. Shopkeepers sweep, count their coins, and talk
about the day. Some go down to the water to watch the boats come in; others climb the hill
to the chapel, where the bell rings at six. The light turns gold, then grey, then blue.
At night the taverns fill. Songs start slowly and grow loud; a fiddle joins, then a drum.
Travellers ask for rooms and stories, and the town has plenty of both: the flood of the
great winter, the mayor who fell into the river, the wolf that walked across the ice.
Nobody agrees on the details, and nobody minds. The stories change a little every year.
When the last candle goes out, the river keeps talking to itself under the bridge,
and the town sleeps until the bakers wake again.
"""


@pytest.fixture(scope="module")
def own_tokenizer() -> Tokenizer:
    return train_bpe([TEXT] * 4, vocab_size=320)


@pytest.fixture(scope="module")
def small_model(own_tokenizer, tiny_llama) -> Decoder:
    return tiny_llama(own_tokenizer.vocab_size, context_length=64)


@pytest.fixture(scope="module")
def slow_model(own_tokenizer) -> Decoder:
    """Slow enough that a 4000-token answer takes seconds."""
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                                vocab_size=own_tokenizer.vocab_size, context_length=4096,
                                positions="rope", norm="rmsnorm", mlp="swiglu")).eval()
    with torch.no_grad():  # logits of 0 never win: no answer ends early at a special token
        model.lm_head.weight[:len(SPECIAL_TOKENS)] = 0
    return model


@pytest.fixture(scope="module")
def sturdy(small_model, own_tokenizer):
    with running(small_model, own_tokenizer, max_batch=2, timeout=5) as url:
        yield url


def still_serving(url: str) -> None:
    """The next request is answered, and /health says all is well."""
    reply = httpx.post(url + "/v1/completions", timeout=10,
                       json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], **body}, timeout=10)


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-300},
                                     {"temperature": 1e-300, "top_p": 1e-300}])
def test_vanishing_temperature_or_top_p_answers_greedily(sturdy, extreme):
    greedy = complete(sturdy, max_tokens=6, temperature=0).json()["choices"][0]["text"]
    reply = complete(sturdy, max_tokens=6, **extreme)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == greedy
    still_serving(sturdy)


@pytest.mark.parametrize("body", [
    {"max_tokens": 6, "repetition_penalty": 1e-300},
    {"max_tokens": 6, "repetition_penalty": 1e300},
    {"prompt": [5], "echo": True, "logprobs": 0, "max_tokens": 1},  # lm-eval's shape
    {"prompt": [5], "echo": True, "logprobs": 2, "max_tokens": 0},
])
def test_values_at_the_edges_of_the_schema_are_answered(sturdy, body):
    reply = complete(sturdy, **body)
    assert reply.status_code == 200, reply.text
    still_serving(sturdy)


def test_a_token_id_past_the_model_s_vocabulary_is_a_400(own_tokenizer, tiny_llama):
    """The tokenizer may know more ids than the model has embeddings for."""
    model = tiny_llama(own_tokenizer.vocab_size - 8, context_length=64)
    with running(model, own_tokenizer, timeout=5) as url:
        reply = complete(url, prompt=[5, own_tokenizer.vocab_size - 3])
        assert reply.status_code == 400
        assert "outside the model's vocabulary" in reply.json()["error"]["message"]
        still_serving(url)


def test_a_failing_engine_step_fails_only_its_own_requests(own_tokenizer, tiny_llama):
    """A model that gives NaN logits: sampling from them raises in the engine thread."""
    model = tiny_llama(own_tokenizer.vocab_size, context_length=64)
    with torch.no_grad():
        model.final_norm.weight.fill_(float("nan"))
    with running(model, own_tokenizer, timeout=5) as url:
        failed = complete(url, max_tokens=3, temperature=1.0)
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error"
        assert "probability tensor" in failed.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", timeout=10, json={
                "prompt": [5], "max_tokens": 3, "temperature": 1.0, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == "engine_failed"
        assert lines[-1] == "data: [DONE]"
        still_serving(url)  # greedy decoding of NaN logits does not raise
        assert "lmforge_failed_requests_total 2.0" in httpx.get(url + "/metrics").text


def test_a_stopped_engine_is_reported_at_once(small_model, own_tokenizer):
    app = create_app(small_model, own_tokenizer, (), ServeConfig(NAME, timeout=60))
    with serving(app) as url:
        app.state.scheduler.stop()
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "engine thread" in health.json()["reason"]
        started = time.monotonic()
        reply = complete(url, max_tokens=2)
        assert reply.status_code == 503 and time.monotonic() - started < 5


def test_sigterm_stops_the_server_in_the_middle_of_a_request(own_tokenizer, slow_model,
                                                             tmp_path):
    from lmforge.modeldir import save_model

    save_model(tmp_path / "model", slow_model, own_tokenizer)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve",
                               str(tmp_path / "model"), "--port", str(port), "--max-batch", "1",
                               "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: server.poll() is None and _up(url), timeout=120)
        for _ in range(6):  # a minute of work: one decoding, five waiting
            threading.Thread(target=lambda: httpx.post(url + "/v1/completions", timeout=120,
                             json={"prompt": [5], "max_tokens": 4000, "temperature": 0}),
                             daemon=True).start()
        wait_for(lambda: "lmforge_queue_length 5.0" in httpx.get(url + "/metrics").text)
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        server.wait(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        server.kill()
    assert "KV cache: 1 sequences x 4096 positions" in server.stderr.read()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


def test_a_non_streaming_client_that_leaves_frees_its_slot(slow_model, own_tokenizer):
    with running(slow_model, own_tokenizer, max_batch=2) as url:
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", timeout=1, json={
                    "prompt": [5], "max_tokens": 4000, "temperature": 0})
        # Both answers had seconds to go: their slots are free as soon as their clients left.
        wait_for(lambda: httpx.get(url + "/health").json()["active"] == 0, timeout=3)


def test_metrics_label_requests_by_route_not_by_path(small_model, own_tokenizer):
    with running(small_model, own_tokenizer, api_key="k3y") as url:
        for i in range(20):
            assert httpx.get(f"{url}/v1/probe-{i}").status_code == 401
            assert httpx.get(f"{url}/probe-{i}").status_code == 404
        httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"})
        httpx.get(url + "/health")
        series = [line for line in httpx.get(url + "/metrics").text.splitlines()
                  if line.startswith("lmforge_requests_total{")]
    routes = {re.search(r'route="([^"]*)"', line)[1] for line in series}
    assert routes == {"unmatched", "/v1/models", "/health"}


def test_cors_preflight_needs_no_key_and_a_401_carries_cors_headers(small_model,
                                                                    own_tokenizer):
    page = "http://page.example"
    with running(small_model, own_tokenizer, api_key="k3y", cors_origins=[page]) as url:
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == page
        refused = httpx.post(url + "/v1/completions", json={"prompt": "x"},
                             headers={"Origin": page})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == page


def test_the_api_key_is_only_taken_as_a_bearer_token(small_model, own_tokenizer):
    with running(small_model, own_tokenizer, api_key="k3y") as url:
        for header in ("k3y", "Basic k3y", "Bearer wrong", "Bearerk3y"):
            reply = httpx.get(url + "/v1/models", headers={"Authorization": header})
            assert reply.status_code == 401, header
        for header in ("Bearer k3y", "bearer k3y"):
            assert httpx.get(url + "/v1/models", headers={"Authorization": header}).is_success


@pytest.mark.parametrize("route, body, param, says", [
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": 123}]}]}, "messages.0.content",
     "content part 0 has type text but its text is 123"),
    ("completions", {"prompt": "a\ud800b"}, "prompt", "lone surrogate"),
    ("completions", {"prompt": ["ok", "a\ud800b"]}, "prompt", "prompt 1 has a lone surrogate"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages.0.content", "lone surrogate ('\\ud800' at character 1)"),
])
def test_malformed_texts_are_400s_that_name_the_field(sturdy, route, body, param, says):
    reply = httpx.post(f"{sturdy}/v1/{route}", content=json.dumps(body),
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param and says in reply.json()["error"]["message"]


def test_max_completion_tokens_zero_means_zero(sturdy):
    reply = httpx.post(sturdy + "/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0,
        "max_tokens": 5})
    assert reply.json()["usage"]["completion_tokens"] == 0
    assert reply.json()["choices"][0]["finish_reason"] == "length"


def test_a_slow_chat_template_neither_stalls_the_server_nor_runs_on(small_model,
                                                                    own_tokenizer):
    slow = Tokenizer(own_tokenizer.backend, SpecialTokens(chat_template=(
        "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
        "{% if a['role'] == c['role'] %}{% endif %}{% endfor %}{% endfor %}{% endfor %}")))
    with running(small_model, slow) as url:
        answer = {}
        chat = threading.Thread(target=lambda: answer.update(reply=httpx.post(
            url + "/v1/chat/completions", timeout=30,
            json={"messages": [{"role": "user", "content": "hi"}] * 300})))
        chat.start()
        time.sleep(0.5)  # rendering by now
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
        chat.join(timeout=30)
    assert answer["reply"].status_code == 400
    assert "the chat template ran for more than" in answer["reply"].json()["error"]["message"]


def test_long_prompts_tokenize_without_stalling_the_server(sturdy):
    prompt = (TEXT * 600)[:900_000]
    threads = [threading.Thread(target=complete, args=(sturdy,), kwargs={"prompt": prompt})
               for _ in range(20)]
    for thread in threads:
        thread.start()
    slowest = 0.0
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        httpx.get(sturdy + "/health", timeout=30)
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 1, slowest


def test_the_advertised_context_is_the_one_served(own_tokenizer, tiny_llama):
    model = tiny_llama(own_tokenizer.vocab_size, context_length=8192)
    with running(model, own_tokenizer) as url:
        limit = httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"]
        assert limit == httpx.get(url + "/health").json()["max_len"] == 8192
        assert complete(url, prompt=[5] * (limit - 1), max_tokens=1).status_code == 200
        refused = complete(url, prompt=[5] * limit, max_tokens=1)
        assert refused.json()["error"]["code"] == "context_length_exceeded"


def test_chat_logprob_bytes_are_the_token_s_own_bytes(sturdy, own_tokenizer):
    reply = httpx.post(sturdy + "/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0,
        "logprobs": True, "top_logprobs": 20}).json()
    entries = [e for position in reply["choices"][0]["logprobs"]["content"]
               for e in [position, *position["top_logprobs"]]]
    vocabulary = {own_tokenizer.token_bytes(t) for t in range(own_tokenizer.vocab_size)}
    assert all(bytes(e["bytes"]) in vocabulary for e in entries)
    partial = [e for e in entries if e["token"].startswith("bytes:")]
    assert partial  # pieces of characters, each with its byte: 0x80 and up, alone
    assert all(len(e["bytes"]) == 1 and e["bytes"][0] >= 0x80 for e in partial)


def test_completion_top_logprobs_have_as_many_texts_as_asked(sturdy):
    reply = complete(sturdy, max_tokens=8, temperature=0, logprobs=20, echo=True).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert [len(top) for top in logprobs["top_logprobs"][1:]] == [20] * 10
    # The greedy token is the likeliest text at each position (how lm-eval checks greed).
    for token, top in zip(logprobs["tokens"][3:], logprobs["top_logprobs"][3:]):
        assert max(top, key=top.get) == token


def test_seeds_of_any_size_are_taken(sturdy):
    small = complete(sturdy, max_tokens=6, temperature=1.0, seed=7).json()
    big = complete(sturdy, max_tokens=6, temperature=1.0, seed=2**64 + 7, n=2).json()
    assert big["choices"][0]["text"] == small["choices"][0]["text"]


def test_left_out_sampling_settings_are_lmforge_s_defaults(client, model, tokenizer):
    """A request without temperature or top_p samples as `lmforge generate` does by default
    (SamplingConfig()), not with OpenAI's temperature 1."""
    reply = client.completions.create(model=NAME, prompt="KING:", max_tokens=24, seed=11)
    done = Engine(model, tokenizer).run([Request(tokenizer.encode("KING:"), 24, SamplingConfig(),
                                                 seed=11)])
    assert reply.choices[0].text == done[0].text
    hotter = Engine(model, tokenizer).run([Request(tokenizer.encode("KING:"), 24,
                                                   SamplingConfig(temperature=1.0, top_p=None),
                                                   seed=11)])
    assert hotter[0].text != done[0].text  # the check can tell the two apart
