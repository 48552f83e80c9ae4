"""The chat page of `lmforge serve` in a real browser: Chromium driven by Playwright, against
a live server with a tiny model (streaming, Stop, history, settings, errors, Markdown, phone
width, images for a vision-language model). Needs `pip install playwright` and Debian's
chromium (`apt-get install chromium`)."""

import base64
import io
import json
import os
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig, resolve_vlm_config
from lmforge.finetune.vlm import with_image_token
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM
from lmforge.serve.app import ServeConfig, create_app
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

CHROMIUM = Path("/usr/bin/chromium")
# Refreshed only when asked (LMFORGE_UPDATE_DOCS=1), so a test run leaves the tree clean.
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "web-chat.png"
MODEL_NAME = "tiny-chat"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need `pip install playwright`")
expect = sync_api.expect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no {CHROMIUM}: the browser tests use "
                       "Debian's chromium (`apt-get install chromium`)"),
]


def printable_model(tokenizer: Tokenizer) -> Decoder:
    """A tiny random model whose greedy answers are printable ASCII and never end early."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      vocab_size=tokenizer.vocab_size, context_length=4096, positions="rope",
                      norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
    return keep_printable(Decoder(cfg).eval(), tokenizer)


def keep_printable(model, tokenizer: Tokenizer, *unwanted: int):
    """The model, its greedy answers kept to printable ASCII.

    A zero row in the output layer gives its token logit 0, and among ~400 random logits the
    greedy pick is always above 0; so zeroing the rows of special tokens (the stop token among
    them), of `unwanted` ones and of bytes that are not printable ASCII keeps them out of
    greedy answers."""
    head = (model.text if isinstance(model, VLM) else model).lm_head
    with torch.no_grad():
        for token in range(tokenizer.vocab_size):
            text = tokenizer.decode([token])
            if token < len(SPECIAL_TOKENS) or token in unwanted or not (
                    text.isascii() and text.replace("\n", "").isprintable()):
                head.weight[token] = 0
    return model


def vision_model(tokenizer: Tokenizer) -> VLM:
    torch.manual_seed(0)
    image_token = tokenizer.token_id("<|image|>")
    cfg = resolve_vlm_config({"preset": "vlm-tiny", "image_token_id": image_token,
                              "text": {"vocab_size": tokenizer.vocab_size, "context_length": 512,
                                       "tie_embeddings": False}})
    return keep_printable(VLM(cfg).eval(), tokenizer, image_token)


@pytest.fixture(scope="module")
def server(shakespeare):
    tokenizer = train_bpe([shakespeare[:50_000]], vocab_size=400)
    with serving(create_app(printable_model(tokenizer), tokenizer, (tokenizer.eos_id,),
                            ServeConfig(MODEL_NAME))) as url:
        yield url


@pytest.fixture(scope="module")
def vision_server(shakespeare):
    tokenizer = with_image_token(train_bpe([shakespeare[:50_000]], vocab_size=400))
    with serving(create_app(vision_model(tokenizer), tokenizer, (tokenizer.eos_id,),
                            ServeConfig(MODEL_NAME))) as url:
        yield url


@contextmanager
def serving(app):
    """The app on a free localhost port, served by uvicorn on a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # Whole tiles re-rastered: the screenshot comes out the same bytes run after run.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                             args=["--disable-partial-raster"])
        yield browser
        browser.close()


def open_page(browser, url: str, width: int = 1000, height: int = 720):
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(url)
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def settings(page, **values: str) -> None:
    """Fill settings fields by input id; the panel is opened and closed around it."""
    page.click("#settings-button")
    for field, value in values.items():
        page.fill(f"#{field.replace('_', '-')}", value)
    page.click("#settings-button")


def ask(page, text: str, press_enter: bool = True):
    """Send `text` and return the answer's element (still streaming, maybe)."""
    page.fill("#prompt", text)
    if press_enter:
        page.press("#prompt", "Enter")
    else:
        page.click("#send")
    return page.locator(".message.assistant").last


def answer_length(page) -> int:
    return page.evaluate(
        "[...document.querySelectorAll('.message.assistant .body')].at(-1).textContent.length")


def record_chat_requests(page) -> list:
    """The chat requests the page sends from now on (a list that fills up)."""
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/chat/completions") else None)
    return sent


def fake_stream(page, *events: dict | str) -> None:
    """Answer the next chat requests with these server-sent events instead of the model."""
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=body))


def decoding(server: str) -> int:
    """Sequences the server's engine is decoding now."""
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        return json.load(response)["active"]


def delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def test_answer_streams_and_stop_keeps_the_partial_answer(page, server):
    expect(page.locator("#model-name")).to_have_text(MODEL_NAME)
    settings(page, temperature="0", max_tokens="4000")
    answer = ask(page, "Tell me a long story.")
    page.wait_for_function("document.querySelector('.message.assistant .body').textContent")
    seen = answer_length(page)
    page.wait_for_function(
        "n => document.querySelector('.message.assistant .body').textContent.length > n", arg=seen)
    page.click("#stop")

    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".note")).to_have_text("Stopped.")
    stopped = answer_length(page)
    assert stopped > seen
    deadline = time.monotonic() + 10
    while decoding(server):
        assert time.monotonic() < deadline, "the server kept decoding after the client left"
        time.sleep(0.05)
    assert answer_length(page) == stopped  # nothing more arrives once the server stopped
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()

    sent = record_chat_requests(page)
    settings(page, max_tokens="5")
    expect(ask(page, "And then?")).to_have_attribute("data-state", "done")
    turns = sent[0].post_data_json["messages"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"]  # the partial answer is part of the conversation


def test_new_chat_in_the_middle_of_an_answer_starts_over(page):
    settings(page, temperature="0", max_tokens="4000")
    ask(page, "Tell me a long story.")
    page.wait_for_function("document.querySelector('.message.assistant .body').textContent")
    page.click("#new-chat")
    expect(page.locator("#messages > *")).to_have_count(0)

    sent = record_chat_requests(page)
    settings(page, max_tokens="5")
    expect(ask(page, "Hi")).to_have_attribute("data-state", "done")
    assert sent[0].post_data_json["messages"] == [{"role": "user", "content": "Hi"}]


def test_conversation_history_settings_and_screenshot(page, tmp_path):
    sent = record_chat_requests(page)
    settings(page, system_prompt="You are a helpful assistant.", temperature="0",
             max_tokens="48", api_key="secret-key")
    expect(ask(page, "Hello! Who are you?")).to_have_attribute("data-state", "done")
    expect(ask(page, "What can you do?", press_enter=False)).to_have_attribute(
        "data-state", "done")
    expect(page.locator(".message.assistant .note").last).to_have_text(
        "Stopped at the max tokens limit.")

    first, second = (r.post_data_json for r in sent)
    assert second["messages"][:2] == first["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! Who are you?"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"].strip()
    assert {k: second[k] for k in ("stream", "temperature", "max_tokens")} == {
        "stream": True, "temperature": 0, "max_tokens": 48}
    assert sent[1].headers["authorization"] == "Bearer secret-key"

    page.click("#settings-button")  # the picture shows the settings too
    shot = SCREENSHOT if os.environ.get("LMFORGE_UPDATE_DOCS") else tmp_path / "web-chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert SCREENSHOT.read_bytes()[:4] == b"\x89PNG"
    page.click("#settings-button")

    page.click("#new-chat")
    expect(page.locator("#messages > *")).to_have_count(0)
    page.reload()  # settings outlive the page
    assert page.input_value("#system-prompt") == "You are a helpful assistant."
    assert page.input_value("#max-tokens") == "48"
    assert page.input_value("#api-key") == "secret-key"


def test_errors_are_shown_in_the_conversation(page):
    settings(page, temperature="5")  # the server refuses: OpenAI's error shape, HTTP 400
    ask(page, "Hi")
    expect(page.locator(".message.error")).to_contain_text("temperature")
    expect(page.locator(".message.error")).to_contain_text("HTTP 400")
    expect(page.locator(".message.user")).to_have_class("message user unsent")
    assert page.input_value("#prompt") == "Hi"  # back in the box, to retry
    expect(page.locator(".message.assistant")).to_have_count(0)

    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=502,
                                                                     body="bad gateway"))
    ask(page, "Again")
    expect(page.locator(".message.error").last).to_contain_text("Error: HTTP 502")
    page.unroute("**/v1/chat/completions")

    fake_stream(page, delta("Half an"), {"error": {"message": "the server is busy"}}, "[DONE]")
    answer = ask(page, "Once more")
    expect(page.locator(".message.error").last).to_have_text("Error: the server is busy")
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".body")).to_have_text("Half an")  # what came stays


def test_markdown_is_rendered_and_output_cannot_inject_markup(page):
    fake_stream(page, *map(delta, [
        "## Plan\n\nSome **bold**, *italic* and `<b>code</b>` with snake_case_name.\n",
        "\n1. first\n2. [docs](https://example.com/a_b)\n\n- [bad](javascript:alert)\n",
        "- <img src=x onerror=alert(1)>\n\n```python\nprint('<script>')\n```\n",
    ]), "[DONE]")
    body = ask(page, "Format something").locator(".body")
    expect(body.locator("h2")).to_have_text("Plan")
    expect(body.locator("strong")).to_have_text("bold")
    expect(body.locator("em")).to_have_text("italic")
    expect(body.locator("p code")).to_have_text("<b>code</b>")
    expect(body.locator("ol li")).to_have_count(2)
    expect(body.locator("a")).to_have_attribute("href", "https://example.com/a_b")
    expect(body.locator("ul li").first).to_have_text("[bad](javascript:alert)")
    expect(body.locator("ul li").last).to_have_text("<img src=x onerror=alert(1)>")
    expect(body.locator(".code-lang")).to_have_text("python")
    expect(body.locator("pre code")).to_have_text("print('<script>')")
    expect(body.locator("img, script, b")).to_have_count(0)
    assert "snake_case_name" in body.inner_text()


def test_phone_width_never_scrolls_sideways(browser, server):
    page = open_page(browser, server, width=375, height=740)
    try:
        page.click("#settings-button")
        expect(page.locator("#settings")).to_be_visible()
        fake_stream(page, delta("W" * 300 + "\n\n```\n" + "x = 1; " * 60 + "\n```\n"), "[DONE]")
        ask(page, "y" * 300)
        expect(page.locator(".message.assistant")).to_have_attribute("data-state", "done")
        width, inner = page.evaluate(
            "[document.scrollingElement.scrollWidth, window.innerWidth]")
        assert width <= inner
        for control in ("#send", "#prompt", "#new-chat", "#settings-button"):
            box = page.locator(control).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= inner, control
    finally:
        page.context.close()


def png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(out, "PNG")
    return out.getvalue()


def hand_over(page, how: str, name: str, data: bytes) -> None:
    """Paste an image into the message box, or drop it on the page, as a browser would."""
    page.evaluate("""([how, name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, { type: "image/png" }));
        const event = how === "paste"
            ? new ClipboardEvent("paste", { clipboardData: files, bubbles: true })
            : new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true });
        (how === "paste" ? document.getElementById("prompt") : document.body)
            .dispatchEvent(event);
    }""", [how, name, base64.b64encode(data).decode()])


def test_images_attached_pasted_and_dropped_go_with_the_message(browser, vision_server):
    page = open_page(browser, vision_server)
    try:
        sent = record_chat_requests(page)
        settings(page, temperature="0", max_tokens="24")
        red, green, blue = png((220, 20, 20)), png((20, 200, 20)), png((20, 20, 220))
        page.set_input_files("#image-file", files=[
            {"name": "red.png", "mimeType": "image/png", "buffer": red}])
        hand_over(page, "paste", "green.png", green)
        hand_over(page, "drop", "blue.png", blue)
        thumbnails = page.locator("#attachments img")
        expect(thumbnails).to_have_count(3)
        page.click("[aria-label='Remove green.png']")
        expect(thumbnails).to_have_count(2)

        answer = ask(page, "What colours are these?")
        expect(answer).to_have_attribute("data-state", "done")
        assert answer.locator(".body").inner_text().strip()
        expect(page.locator("#attachments")).to_be_hidden()
        shown = page.locator(".message.user img")
        expect(shown).to_have_count(2)
        assert [shown.nth(i).get_attribute("alt") for i in range(2)] == ["red.png", "blue.png"]
        assert page.evaluate("[...document.querySelectorAll('.message.user img')]"
                             ".every((img) => img.complete && img.naturalWidth === 48)")

        urls = [f"data:image/png;base64,{base64.b64encode(b).decode()}" for b in (red, blue)]
        assert sent[0].post_data_json["messages"] == [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": url}} for url in urls),
            {"type": "text", "text": "What colours are these?"}]}]
        # The next turn sends the images again: the server keeps no conversation.
        expect(ask(page, "And now?")).to_have_attribute("data-state", "done")
        assert sent[1].post_data_json["messages"][0] == sent[0].post_data_json["messages"][0]
    finally:
        page.context.close()


def test_a_text_only_model_offers_no_images(page):
    expect(page.locator("#model-name")).to_have_text(MODEL_NAME)
    expect(page.locator("#attach")).to_be_hidden()
    hand_over(page, "drop", "red.png", png((220, 20, 20)))
    expect(page.locator(".message.error")).to_have_text(
        "Error: this model reads text only; it takes no images.")
    expect(page.locator("#attachments")).to_be_hidden()
