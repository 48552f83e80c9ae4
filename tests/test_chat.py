"""Chat templates (parity with transformers) and the terminal chat session."""

import io
import json
import time

import pytest
import torch

from lmforge.chat import (
    CHATML_TEMPLATE,
    RENDER_CHARS,
    RENDER_SECONDS,
    ChatSession,
    TemplateError,
    render_chat,
    run_terminal_chat,
)
from lmforge.config import ModelConfig
from lmforge.infer.sampling import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import SpecialTokens, Tokenizer, train_bpe

# A template in the style of real models: a default system prompt, a loop, an error branch.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "  A small model. 😀 "},
    {"role": "user", "content": "Écris un haïku."},
]


@pytest.fixture(scope="module")
def tokenizer(shakespeare) -> Tokenizer:
    bpe = train_bpe([shakespeare[:50_000]], vocab_size=400)
    return Tokenizer(bpe.backend, SpecialTokens(bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>", chat_template=TEMPLATE))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(tokenizer, tmp_path, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    tokenizer.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    ours = render_chat(tokenizer, CONVERSATION, add_generation_prompt)
    theirs = hf.apply_chat_template(CONVERSATION, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|endoftext|><|im_start|>system\nYou are helpful.")


def test_template_errors_surface(tokenizer):
    with pytest.raises(ValueError, match="unknown role tool"):
        render_chat(tokenizer, [{"role": "tool", "content": "x"}])


def test_models_without_a_template_use_chatml(shakespeare):
    plain = train_bpe([shakespeare[:20_000]], vocab_size=300)
    assert plain.chat_template is None
    text = render_chat(plain, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "<|im_start|>" in CHATML_TEMPLATE


def test_session_keeps_history_and_commands_work(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=tokenizer.vocab_size,
                                context_length=256, positions="rope")).eval()
    session = ChatSession(model, tokenizer, (tokenizer.eos_id,), SamplingConfig(temperature=0),
                          system="Be brief.", max_new_tokens=5)
    inputs = iter(["hi there", "/save " + str(tmp_path / "chat.json"), "/reset", "/help",
                   "again", "/quit"])
    out = io.StringIO()
    run_terminal_chat(session, read=lambda _prompt: next(inputs), out=out)
    saved = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[2]["content"] and saved[2]["content"] in out.getvalue()
    # After /reset only the system prompt and the last exchange remain.
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[1]["content"] == "again"
    assert "/reset" in out.getvalue() and "(conversation cleared)" in out.getvalue()


def test_a_long_conversation_leaves_out_its_oldest_turns(tokenizer):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=tokenizer.vocab_size,
                                context_length=96, positions="rope")).eval()
    session = ChatSession(model, tokenizer, (tokenizer.eos_id,), SamplingConfig(temperature=0),
                          system="Be brief.", max_new_tokens=8)
    for i in range(8):
        "".join(session.reply(f"Tell me about the king, part {i}."))
    assert len(session.messages) == 17  # the history keeps every turn
    prompt, images = session._prompt()
    text = tokenizer.decode(prompt)
    assert images == ()
    assert len(prompt) <= 96 - 8
    assert "system\nBe brief." in text and "part 0" not in text and "part 7" in text
    assert text.split("<|im_end|>\n")[1].startswith("<|im_start|>user")  # whole exchanges


def with_template(template: str) -> Tokenizer:
    bpe = train_bpe(["Hello there, how are you? I am well, and you?\n"] * 20, vocab_size=300)
    return Tokenizer(bpe.backend, SpecialTokens(chat_template=template))


NESTED_RANGES = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                 "{% endfor %}")


@pytest.mark.parametrize("template, says", [
    (NESTED_RANGES, "steps with range()"),
    ("{{ 'x' * 10**9 }}", "makes a value of 1000000000 items"),
    ("{{ 10 ** (10 ** 10) }}", "a number over"),
    ("{% for i in range(20) %}{{ messages[0]['content'] * 100 }}{% endfor %}",
     f"wrote more than {RENDER_CHARS} characters"),
    ("{% for a in messages %}{% for b in messages %}{% for c in messages %}"
     "{% if a['role'] == c['role'] %}{% endif %}{% endfor %}{% endfor %}{% endfor %}",
     f"ran for more than {RENDER_SECONDS:g} s"),
])
def test_rendering_stops_at_its_limits(template, says):
    """A template comes with the model: one that loops or grows without end is refused
    within the time limit, before it fills the memory."""
    messages = [{"role": "user", "content": "hello there " * 1000}] * 300
    started = time.monotonic()
    with pytest.raises(TemplateError, match=says):
        render_chat(with_template(template), messages)
    assert time.monotonic() - started < RENDER_SECONDS + 1


def test_templates_use_range_as_usual():
    template = ("{% for i in range(messages|length - 1, -1, -1) %}{{ messages[i]['content'] }}"
                "{% endfor %}{{ range(3)|list }}{{ 2 ** 10 }}{{ '-' * 3 }}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat(with_template(template), messages) == "ba[0, 1, 2]1024---"
