"""Chat: rendering conversations with a model's Jinja chat template, and a terminal session.

Templates are rendered the way transformers renders them (a sandboxed Jinja environment with
trim_blocks, lstrip_blocks and loop controls; `raise_exception`, `strftime_now` and a
non-ASCII-escaping `tojson`), so the same messages give the same prompt string. Models
without a template of their own (the ones lmforge trains) use ChatML, below.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from lmforge.config import MAX_NEW_TOKENS
from lmforge.infer.engine import Request, stream_one
from lmforge.infer.sampling import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer

# ChatML, the format our BPE's <|im_start|> / <|im_end|> tokens exist for.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template refused the conversation (e.g. roles out of order)."""


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True
                ) -> str:
    """The prompt text for `messages` ([{"role", "content"}, ...]) in the model's format."""
    special = tokenizer.special
    return _compile(special.chat_template or CHATML_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=special.bos_token or "", eos_token=special.eos_token or "",
    )


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the rendered conversation, ready for the assistant's turn."""
    ids = tokenizer.encode(render_chat(tokenizer, messages))
    if tokenizer.special.add_bos_token and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; `reply` streams the assistant's answer."""

    model: Decoder
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, seed: int | None = None) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces; the turn is kept in the history
        even when the caller stops early (the partial answer is what the user saw)."""
        self.messages.append({"role": "user", "content": user_text})
        prompt = self._prompt()
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
        request = Request(prompt, self.max_new_tokens, self.sampling, seed,
                          stop_ids=self.stop_ids, truncate=True)
        for event in stream_one(self.model, self.tokenizer, request):
            answer["content"] += event.text
            if event.text:
                yield event.text

    def _prompt(self) -> list[int]:
        """The conversation's prompt, leaving out its oldest turns (never the system prompt
        or the new message) when it would not fit the context with room for an answer; the
        saved history keeps everything."""
        room = self.model.cfg.context_length - min(self.max_new_tokens,
                                                   self.model.cfg.context_length // 4)
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        turns = self.messages[len(system):]
        prompt = chat_prompt_ids(self.tokenizer, system + turns)
        while len(prompt) > room and len(turns) > 1:
            # Whole exchanges go: what is left still starts with a user message.
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns = turns[1:]
            prompt = chat_prompt_ids(self.tokenizer, system + turns)
        # A single message longer than the context keeps its end (truncate=True below).
        return prompt

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False))
        return path


HELP = """commands:
  /reset        start a new conversation (keeps the system prompt)
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
