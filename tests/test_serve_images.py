"""Images through the HTTP API: a tiny vision-language model served for real, its answers to
image messages checked against the engine run directly on the same prompt and pixels."""

import base64
import http.server
import io
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from lmforge.chat import vision_chat_prompt_ids
from lmforge.config import resolve_vlm_config
from lmforge.finetune.vlm import with_image_token
from lmforge.images import image_processor, load_image, tiles_of
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.models.vlm import VLM
from lmforge.serve.app import ServeConfig, create_app
from lmforge.tokenizer import Tokenizer, train_bpe
from tests.test_serve import NAME, TEXT, _up, free_port, running, serving, wait_for

GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return with_image_token(train_bpe([TEXT] * 4, vocab_size=300))


@pytest.fixture(scope="module")
def model(tokenizer) -> VLM:
    torch.manual_seed(0)
    # Untied embeddings: a tiny random decoder with tied ones repeats its last token.
    return VLM(resolve_vlm_config({
        "preset": "vlm-tiny", "image_token_id": tokenizer.token_id("<|image|>"),
        "text": {"vocab_size": tokenizer.vocab_size, "tie_embeddings": False,
                 "context_length": 256}})).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with running(model, tokenizer, max_batch=2, max_images=2, max_image_pixels=64 * 64) as url:
        yield url


@pytest.fixture(scope="module")
def roomy(model, tokenizer):
    """A server with the default limits, and its app (to see its engine's batches)."""
    app = create_app(model, tokenizer, (), ServeConfig(NAME, max_batch=2))
    with serving(app) as url:
        yield url, app


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai_client(server)


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def asking(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                          *map(image_part, urls)]}]


def direct(model, tokenizer, messages: list[dict], max_tokens: int):
    """The engine's greedy completion (with logprobs) for these messages, no server between."""
    processor = image_processor(model.cfg, tokenizer)
    images = [processor.prepare(load_image(part["image_url"]["url"]))
              for m in messages if isinstance(m["content"], list)
              for part in m["content"] if part["type"] == "image_url"]
    prompt = vision_chat_prompt_ids(tokenizer, processor, messages, images)
    return Engine(model, tokenizer, max_batch=1).run(
        [Request(prompt, max_tokens, GREEDY, logprobs=0, images=tiles_of(images))])[0]


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 12, **options):
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **options)


def test_models_and_health_say_which_models_read_images(server, tokenizer, tiny_llama):
    listed = httpx.get(server + "/v1/models").json()["data"][0]
    assert listed["modalities"] == httpx.get(server + "/health").json()["modalities"] == [
        "text", "image"]
    with running(tiny_llama(tokenizer.vocab_size, context_length=64), tokenizer) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["modalities"] == ["text"]
        assert httpx.get(url + "/health").json()["modalities"] == ["text"]


@pytest.mark.parametrize("kind, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                              ("WEBP", "image/webp")])
def test_an_image_sent_by_the_openai_client_is_read_as_the_engine_reads_it(
        client, model, tokenizer, kind, media_type):
    messages = asking(data_url(encoded(picture(1), kind), media_type))
    expected = direct(model, tokenizer, messages, 12)
    reply = chat(client, messages, logprobs=True)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(expected.prompt)
    # Log-probabilities move with every pixel, so they show the server's pixels are the same.
    torch.testing.assert_close([t.logprob for t in reply.choices[0].logprobs.content],
                               [lp.logprob for lp in expected.logprobs], atol=1e-5, rtol=0)
    chunks = chat(client, messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text


def test_the_openai_client_gets_the_answer_lmforge_generate_gives(client, model, tokenizer,
                                                                  tmp_path, capsys):
    """The same image file and question: `lmforge generate --chat --image` offline, and the
    official client through the server, plain and streaming."""
    from lmforge.cli import main
    from lmforge.modeldir import save_model

    save_model(tmp_path / "model", model, tokenizer)
    (tmp_path / "photo.png").write_bytes(encoded(picture(3)))
    question = "What is in the picture?"
    assert main(["generate", str(tmp_path / "model"), "--chat", "--image",
                 str(tmp_path / "photo.png"), "--prompt", question, "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    offline = capsys.readouterr().out.strip()
    messages = [{"role": "user", "content": [
        image_part(data_url((tmp_path / "photo.png").read_bytes())),
        {"type": "text", "text": question}]}]
    assert offline and chat(client, messages).choices[0].message.content.strip() == offline
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, messages,
                                                                       stream=True))
    assert streamed.strip() == offline


def test_another_image_moves_the_log_probabilities_far_past_that_tolerance(client):
    """So the check above fails when the server reads an image differently."""
    first, second = ([t.logprob for t in chat(client, asking(data_url(encoded(picture(seed)))),
                                             logprobs=True).choices[0].logprobs.content]
                     for seed in (1, 2))
    assert max(abs(a - b) for a, b in zip(first, second)) > 1e-3


def test_image_and_text_requests_batch_together_as_they_run_alone(roomy, model, tokenizer):
    url, app = roomy
    client = openai_client(url)
    image = asking(data_url(encoded(picture(3))))
    text = [{"role": "user", "content": "Tell me about the river town."}]
    alone = [chat(client, m, max_tokens=150).choices[0].message.content for m in (image, text)]
    batches = app.state.scheduler.stats.batch_sizes
    assert max(batches) == 1
    together: dict[int, str] = {}
    start = threading.Barrier(2)

    def ask(index: int, messages: list[dict]) -> None:
        start.wait()
        together[index] = chat(client, messages, max_tokens=150).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate((image, text))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert max(batches) == 2  # they did share decode steps
    assert [together[0], together[1]] == alone
    assert alone[0] == direct(model, tokenizer, image, 150).text


@pytest.mark.parametrize("content, says", [
    ([image_part("data:image/png;base64,!!not base64!!")], "has invalid base64 data"),
    ([image_part(data_url(b"just some text, not a picture"))], "not an image"),
    ([image_part(data_url(encoded(picture(0), "GIF"), "image/gif"))],
     "a GIF image; lmforge reads PNG, JPEG and WebP"),
    ([image_part(data_url(encoded(picture(0, (100, 100)))))],
     "100x100 = 10,000 pixels, more than the 4,096 allowed"),
    ([image_part(data_url(encoded(picture(0))))] * 3,
     "the messages hold 3 images; this server takes at most 2 per request (lmforge serve "
     "--max-images)"),
    ([image_part("https://example.com/cat.png")], "--allow-image-urls"),
    ([image_part("/etc/hostname")], "is not an image URL"),
])
def test_bad_images_are_400s_that_name_the_part(server, content, says):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                      *content]}]}
    reply = httpx.post(server + "/v1/chat/completions", json=body, timeout=10)
    assert reply.status_code == 400
    error = reply.json()["error"]
    where = "messages[1].content[3]" if "--max-images" in says else "messages[1].content[1]"
    assert error["param"] == where and error["message"].startswith(where + ": ")
    assert says in error["message"]


@pytest.mark.parametrize("part, says", [
    ({"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
     "content part 0 has type image_url but no image_url.url"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA"}},
     "content part 0 has type 'input_audio'; the parts read here are text and image_url"),
])
def test_malformed_parts_are_400s(server, part, says):
    reply = httpx.post(server + "/v1/chat/completions", timeout=10,
                       json={"messages": [{"role": "user", "content": [part]}]})
    assert reply.status_code == 400 and says in reply.json()["error"]["message"]


def test_an_image_for_a_text_only_model_is_a_400(tokenizer, tiny_llama):
    with running(tiny_llama(tokenizer.vocab_size, context_length=64), tokenizer) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, asking(data_url(encoded(picture(0)))))
    assert err.value.body["param"] == "messages[0].content[1]"
    assert "this model reads text only" in err.value.body["message"]


@pytest.fixture(scope="module")
def image_site():
    """A local web server: /small.png is picture(4), /large.png is over 1 MB, others 404."""
    files = {"/small.png": encoded(picture(4)), "/large.png": encoded(picture(5, (800, 800)))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}", files
    site.shutdown()


def test_image_urls_are_downloaded_when_allowed(model, tokenizer, image_site):
    site, files = image_site
    with running(model, tokenizer, allow_image_urls=True, max_body_bytes=1 << 20) as url:
        client = openai_client(url)
        reply = chat(client, asking(site + "/small.png"))
        assert reply.choices[0].message.content == direct(
            model, tokenizer, asking(data_url(files["/small.png"])), 12).text
        for path, says in (("/missing.png", "HTTP 404"),
                           ("/large.png", "over the server's limit of 1,048,576 bytes")):
            with pytest.raises(openai.BadRequestError, match=says):
                chat(client, asking(site + path))


def test_a_server_for_images_takes_bodies_of_megabytes(roomy):
    large = encoded(picture(5, (800, 800)))  # noise does not compress: 1.9 MB
    assert len(large) > 1 << 20  # over a text model's limit
    reply = httpx.post(roomy[0] + "/v1/chat/completions", timeout=30, json={
        "messages": asking(data_url(large)), "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    too_large = httpx.post(roomy[0] + "/v1/chat/completions", timeout=30, json={
        "messages": asking(*[data_url(large)] * 11)})
    assert too_large.status_code == 413


def test_images_decode_without_stalling_the_server(roomy):
    """A 4096 x 4096 image takes a third of a second to decode and scale down on a small CPU:
    eight of them on the event loop would hold up every other request for seconds."""
    big = data_url(encoded(Image.new("RGB", (4096, 4096), (200, 30, 60))))
    answer = {}
    request = threading.Thread(target=lambda: answer.update(reply=httpx.post(
        roomy[0] + "/v1/chat/completions", timeout=60,
        json={"messages": asking(*[big] * 8), "max_tokens": 1})))
    request.start()
    slowest = 0.0
    while request.is_alive():
        started = time.monotonic()
        httpx.get(roomy[0] + "/health", timeout=30)
        slowest = max(slowest, time.monotonic() - started)
    assert answer["reply"].status_code == 200
    assert slowest < 1, slowest


def test_lmforge_serve_takes_the_image_flags(model, tokenizer, image_site, tmp_path):
    from lmforge.modeldir import save_model

    save_model(tmp_path / "vlm", model, tokenizer)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "serve", str(tmp_path / "vlm"), "--port",
         str(port), "--max-images", "1", "--max-body-mb", "0.5", "--allow-image-urls",
         "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: server.poll() is None and _up(url), timeout=120)
        assert httpx.get(url + "/v1/models").json()["data"][0]["modalities"] == ["text", "image"]
        site, files = image_site
        chat = url + "/v1/chat/completions"
        assert httpx.post(chat, timeout=30, json={
            "messages": asking(site + "/small.png"), "max_tokens": 2}).status_code == 200
        two = httpx.post(chat, timeout=30, json={"messages": asking(*[site + "/small.png"] * 2)})
        assert "takes at most 1 per request" in two.json()["error"]["message"]
        large = httpx.post(chat, timeout=30, json={"messages": asking(site + "/large.png")})
        assert "over the server's limit of 524,288 bytes" in large.json()["error"]["message"]
        assert httpx.post(chat, json={"messages": asking(data_url(files["/large.png"]))}
                          ).status_code == 413
    finally:
        server.kill()
