"""Chat: rendering conversations with a model's Jinja chat template, and a terminal session.

Templates are rendered the way transformers renders them (a sandboxed Jinja environment with
trim_blocks, lstrip_blocks and loop controls; `raise_exception`, `strftime_now` and a
non-ASCII-escaping `tojson`), so the same messages give the same prompt string. Models
without a template of their own (the ones lmforge trains) use ChatML, below.

A template is code that comes with a model, so rendering has limits a server can live with:
time, the text it writes, how far `range` counts, and the size of what `*` and `**` make.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from lmforge.config import MAX_NEW_TOKENS
from lmforge.errors import LmforgeError
from lmforge.images import (
    ImageError,
    ImageProcessor,
    Prepared,
    expand_images,
    image_processor,
    load_image,
    tiles_of,
)
from lmforge.infer.engine import Request, prompt_ids, stream_one
from lmforge.infer.sampling import SamplingConfig
from lmforge.models import LanguageModel
from lmforge.tokenizer import Tokenizer

# ChatML, the format our BPE's <|im_start|> / <|im_end|> tokens exist for.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# What one rendering may take. Real templates use a fraction: a conversation is at most a
# request body (1 MB by default), and a prompt far past any context is of no use.
RENDER_SECONDS = 2.0
RENDER_CHARS = 16 << 20
RENDER_RANGE = 1_000_000  # all range() calls together
_MAX_POWER_BITS = 1 << 16


class TemplateError(LmforgeError, ValueError):
    """The chat template refused the conversation (e.g. roles out of order), or went past
    a rendering limit."""


class _Budget:
    """What is left to one rendering."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.range = RENDER_RANGE

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran for more than {RENDER_SECONDS:g} s")

    def count(self, steps: int) -> None:
        self.range -= steps
        if self.range < 0:
            raise TemplateError(f"the chat template counts more than {RENDER_RANGE} steps "
                                "with range()")
        self.check_time()


_budget: ContextVar[_Budget] = ContextVar("render_budget")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders in, with the limits of `_Budget`: lookups and calls
    check the time (a loop that does anything does them), `*` and `**` refuse to build huge
    values before building them."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left, right):
        _budget.get().check_time()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right * abs(left).bit_length() > _MAX_POWER_BITS:
            raise TemplateError(f"the chat template computes {left} ** {right}, a number "
                                f"over {_MAX_POWER_BITS} bits")
        if operator == "*" and not ints:
            sized, times = (left, right) if isinstance(right, int) else (right, left)
            if hasattr(sized, "__len__") and isinstance(times, int) \
                    and len(sized) * times > RENDER_CHARS:
                raise TemplateError(f"the chat template makes a value of {len(sized) * times} "
                                    f"items with `*`, over the limit of {RENDER_CHARS}")
        return super().call_binop(context, operator, left, right)

    def getitem(self, obj, argument):
        _budget.get().check_time()
        return super().getitem(obj, argument)

    def getattr(self, obj, attribute: str):
        _budget.get().check_time()
        return super().getattr(obj, attribute)

    def call(self, context, obj, /, *args, **kwargs):
        _budget.get().check_time()
        return super().call(context, obj, *args, **kwargs)


def _counted_range(*args: int) -> range:
    steps = safe_range(*args)  # also refuses any one range over jinja's own limit
    _budget.get().count(len(steps))
    return steps


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols

    def raise_exception(message: str):
        raise TemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _counted_range
    return env.from_string(template)


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """The prompt text for `messages` ([{"role", "content"}, ...]) in the model's format;
    `tools` (OpenAI's function tools) go to the template as transformers gives them.
    Raises TemplateError when the template refuses them or goes past a limit (see above)."""
    special = tokenizer.special
    budget = _budget.set(_Budget())
    extra = {"tools": tools} if tools else {}
    try:
        pieces = _compile(special.chat_template or CHATML_TEMPLATE).generate(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=special.bos_token or "", eos_token=special.eos_token or "", **extra,
        )
        return "".join(_capped(pieces))
    finally:
        _budget.reset(budget)


def _capped(pieces: Iterator[str]) -> Iterator[str]:
    written = 0
    for piece in pieces:
        written += len(piece)
        if written > RENDER_CHARS:
            raise TemplateError(f"the chat template wrote more than {RENDER_CHARS} characters")
        _budget.get().check_time()
        yield piece


# The image token of lmforge's own vision-language models, added to the tokenizer when one is
# trained (`image_tokens` copies of it stand for an image; see lmforge.images.SquareView).
IMAGE_TOKEN = "<|image|>"
IMAGE_PARTS = ("image", "image_url")  # OpenAI's image part, and the training data's


def text_of_parts(content: str | list[dict], placeholder: str) -> str:
    """A message's content as text: a string as it is; OpenAI-style parts joined, each image
    part (`{"type": "image"}` or `{"type": "image_url", ...}`) written as `placeholder`."""
    if isinstance(content, str):
        return content
    return "".join(placeholder if part["type"] in IMAGE_PARTS else part["text"]
                   for part in content)


def image_count(messages: list[dict]) -> int:
    """How many image parts a conversation has."""
    return sum(1 for m in messages if isinstance(m["content"], list)
               for part in m["content"] if part["type"] in IMAGE_PARTS)


def template_messages(messages: list[dict], processor: ImageProcessor) -> list[dict]:
    """Messages as the chat template of `processor`'s model reads them: contents as lists of
    parts (a string becomes one text part, each image part `{"type": "image"}`) for a template
    that writes the image token itself, else strings with the image token in each image's
    place."""
    if processor.template_parts:
        return [{"role": m["role"], "content": _parts(m["content"])} for m in messages]
    return [{"role": m["role"], "content": text_of_parts(m["content"], processor.image_token)}
            for m in messages]


def _parts(content: str | list[dict]) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "image"} if part["type"] in IMAGE_PARTS
            else {"type": "text", "text": part["text"]} for part in content]


def vision_prompt_ids(tokenizer: Tokenizer, processor: ImageProcessor, text: str,
                      images: Sequence[Prepared]) -> list[int]:
    """Token ids of a plain prompt whose image tokens (`processor.image_token`) stand for
    `images`, each replaced by its prepared text."""
    return tokenizer.encode(expand_images(text, processor.image_token, [i.text for i in images]))


def vision_chat_prompt_ids(tokenizer: Tokenizer, processor: ImageProcessor,
                           messages: list[dict], images: Sequence[Prepared]) -> list[int]:
    """`chat_prompt_ids` for a vision-language model: the i-th image part becomes the
    prepared text of `images[i]`."""
    text = render_chat(tokenizer, template_messages(messages, processor))
    return _with_bos(tokenizer, tokenizer.encode(
        expand_images(text, processor.image_token, [i.text for i in images])))


def prompt_with_images(processor: ImageProcessor | None, tokenizer: Tokenizer, text: str,
                       images: Sequence[str | Path] = (), chat: bool = False
                       ) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """A prompt's token ids and its images' pixel tiles (images before the text): the text as
    it is, or with `chat` as a user message through the model's chat template. `processor`:
    how the model sees images (None: a model that reads text only)."""
    if processor is None:
        if images:
            raise ImageError("this model reads text only: images need a vision-language model")
        message = [{"role": "user", "content": text}]
        return (chat_prompt_ids(tokenizer, message) if chat else prompt_ids(tokenizer, text)), ()
    prepared = [processor.prepare(load_image(path)) for path in images]
    if chat:
        content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
        message = [{"role": "user", "content": content}]
        return vision_chat_prompt_ids(tokenizer, processor, message, prepared), tiles_of(prepared)
    if images:
        text = processor.image_token * len(images) + text
        return vision_prompt_ids(tokenizer, processor, text, prepared), tiles_of(prepared)
    return prompt_ids(tokenizer, text), ()


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict],
                    tools: list[dict] | None = None) -> list[int]:
    """Token ids of the rendered conversation, ready for the assistant's turn."""
    return _with_bos(tokenizer, tokenizer.encode(render_chat(tokenizer, messages, tools=tools)))


def _with_bos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    if tokenizer.special.add_bos_token and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        return [tokenizer.bos_id, *ids]
    return ids


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; `reply` streams the assistant's answer.

    With a vision-language model, `attach` adds an image to the next user message (kept in
    the history as `{"type": "image", "path": ...}`, read again for each reply) and
    `processor` says how the model sees it (`OpenedModel.processor`; None: lmforge's own
    square view for one of lmforge's vision-language models)."""

    model: LanguageModel
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    processor: ImageProcessor | None = None
    messages: list[dict] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)  # images for the next message

    def __post_init__(self) -> None:
        self.processor = self.processor or image_processor(self.model.cfg, self.tokenizer)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.attached = []

    def attach(self, path: str | Path) -> None:
        """Put an image on the next message; a model that reads no images, or a file that is
        no image, is refused now."""
        if self.processor is None:
            raise ImageError("this model reads text only: it takes no images")
        load_image(path)
        self.attached.append(str(path))

    def reply(self, user_text: str, seed: int | None = None) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; the turn is kept in the history
        even when the caller stops early (the partial answer is what the user saw)."""
        content: str | list[dict] = user_text
        if self.attached:
            content = [*({"type": "image", "path": p} for p in self.attached),
                       {"type": "text", "text": user_text}]
            self.attached = []
        self.messages.append({"role": "user", "content": content})
        prompt, images = self._prompt()
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
        request = Request(prompt, self.max_new_tokens, self.sampling, seed,
                          stop_ids=self.stop_ids, truncate=True, images=images)
        for event in stream_one(self.model, self.tokenizer, request):
            answer["content"] += event.text
            if event.text:
                yield event.text

    def _prompt(self) -> tuple[list[int], tuple[torch.Tensor, ...]]:
        """The conversation's prompt and image tiles, leaving out its oldest turns (never the
        system prompt or the new message) when it would not fit the context with room for an
        answer; the saved history keeps everything."""
        room = self.model.cfg.context_length - min(self.max_new_tokens,
                                                   self.model.cfg.context_length // 4)
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        turns = self.messages[len(system):]
        images = self._prepared(turns)  # once: a dropped turn's images are the first ones
        prompt = self._ids(system + turns, images)
        while len(prompt) > room and len(turns) > 1:
            # Whole exchanges go: what is left still starts with a user message.
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
            images = images[len(images) - image_count(turns):]
            prompt = self._ids(system + turns, images)
        # A single message longer than the context keeps its end (truncate=True below).
        return prompt, tiles_of(images)

    def _prepared(self, messages: list[dict]) -> list[Prepared]:
        """The messages' images, in order, as the model sees them."""
        if self.processor is None:
            return []
        return [self.processor.prepare(load_image(part["path"]))
                for m in messages if isinstance(m["content"], list)
                for part in m["content"] if part["type"] == "image"]

    def _ids(self, messages: list[dict], images: list[Prepared]) -> list[int]:
        if self.processor is not None:
            return vision_chat_prompt_ids(self.tokenizer, self.processor, messages, images)
        return chat_prompt_ids(self.tokenizer, messages)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False))
        return path


HELP = """commands:
  /reset        start a new conversation (keeps the system prompt)
  /image FILE   attach an image to your next message (a vision-language model)
  /save FILE    write the conversation as JSON
  /help         this text
  /quit         leave (or Ctrl-D)
Ctrl-C stops the current answer and keeps the session."""


def run_terminal_chat(session: ChatSession, read: Callable[[str], str] = input,
                      out=sys.stdout) -> None:
    """The interactive loop of `lmforge chat`."""
    print("lmforge chat: /help for commands, Ctrl-D to leave", file=out)
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/quit":
                return
            if command == "/reset":
                session.reset()
                print("(conversation cleared)", file=out)
            elif command == "/save" and arg:
                print(f"(saved to {session.save(arg.strip())})", file=out)
            elif command == "/image" and arg:
                try:
                    session.attach(arg.strip())
                    print(f"(image {arg.strip()} goes with your next message)", file=out)
                except (ImageError, FileNotFoundError) as err:
                    print(f"(no image attached: {err})", file=out)
            else:
                print(HELP, file=out)
            continue
        try:
            for piece in session.reply(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        print(file=out)
