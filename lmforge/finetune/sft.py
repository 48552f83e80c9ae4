"""Chat fine-tuning (SFT): conversations rendered with the model's chat template, the loss on
the assistant's tokens only.

Data is JSONL, one conversation per line, in OpenAI's `messages` format
(`{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`) or as a
`{"prompt": "...", "completion": "..."}` pair (a user turn and the assistant's answer).

The assistant's tokens are found by rendering the conversation up to each assistant turn
with and without that turn: what the turn adds (its text and the template's end-of-turn
marker, e.g. `<|im_end|>`) is learned; the system and user turns and the template's own
framing are read but not scored. Each piece is tokenized on its own, so the prompt part is
exactly the token sequence the model will be given when it chats.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.chat import TemplateError, chat_prompt_ids, render_chat
from lmforge.errors import ConfigError
from lmforge.finetune.task import FinetuneTask, pad_rows, read_jsonl, split_examples
from lmforge.infer.engine import Request, stream_one
from lmforge.infer.sampling import SamplingConfig
from lmforge.modeldir import stop_token_ids
from lmforge.tokenizer import Tokenizer
from lmforge.train.task import register_task

ROLES = ("system", "user", "assistant")
IGNORE = -100  # cross_entropy's ignore_index: targets that are not scored


def conversation(value: Any, where: str) -> list[dict[str, str]]:
    """The messages of one JSONL record, checked; `where` is "file:line" for errors."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object with \"messages\" (or \"prompt\" "
                          f"and \"completion\"), got {type(value).__name__}")
    if "messages" not in value:
        if "prompt" in value and "completion" in value:
            value = {"messages": [{"role": "user", "content": value["prompt"]},
                                  {"role": "assistant", "content": value["completion"]}]}
        else:
            raise ConfigError(f"{where}: missing \"messages\" (found keys: "
                              f"{', '.join(map(repr, value)) or 'none'}); each line needs "
                              "{\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list of "
                          "{\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: message {i} needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            close = difflib.get_close_matches(str(m["role"]), ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: message {i} has unknown role {m['role']!r}{hint}; "
                              f"roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: message {i}'s content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn, so nothing to "
                          "learn from it; add the answer as {\"role\": \"assistant\", ...}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for every conversation in a JSONL file."""
    return [(n, conversation(value, f"{path}:{n}")) for n, value in read_jsonl(path)]


def template_pieces(tokenizer: Tokenizer, messages: list[dict[str, str]]
                    ) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces, up to the last
    assistant turn. Joined, the pieces are exactly the template's rendering."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    full = render_chat(tokenizer, messages[:last + 1], add_generation_prompt=False)
    pieces, cursor = [], 0
    for i, m in enumerate(messages[:last + 1]):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise TemplateError(
                "the chat template renders the start of a conversation differently once the "
                "conversation goes on, so the assistant's tokens cannot be told apart")
        # What the turn adds, minus the whitespace the template puts between turns.
        end = len(turn.rstrip())
        pieces += [(full[cursor:len(prompt)], False), (full[len(prompt):end], True)]
        cursor = end
    return [(text, scored) for text, scored in pieces if text]


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, for each, whether the loss scores it."""
    return encode_pieces(tokenizer, template_pieces(tokenizer, messages))


def encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]
                  ) -> tuple[list[int], list[bool]]:
    """Token ids of (text, is_assistant) pieces and, for each, whether the loss scores it."""
    ids: list[int] = []
    scored: list[bool] = []
    if tokenizer.special.add_bos_token and tokenizer.bos_id is not None:
        ids, scored = [tokenizer.bos_id], [False]
    for text, is_assistant in pieces:
        piece = tokenizer.encode(text)
        ids += piece
        scored += [is_assistant] * len(piece)
    return ids, scored


def training_row(ids: list[int], scored: list[bool]) -> tuple[list[int], list[int]]:
    """Inputs and targets for next-token prediction; unscored targets are IGNORE."""
    return ids[:-1], [t if s else IGNORE for t, s in zip(ids[1:], scored[1:])]


def pack(rows: list[tuple[list[int], list[int]]], length: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate consecutive short rows into rows of at most `length` tokens (the order is
    already shuffled). Packed conversations see the ones before them in the row, a small
    price for far less padding."""
    packed: list[tuple[list[int], list[int]]] = []
    x: list[int] = []
    y: list[int] = []
    for rx, ry in rows:
        if x and len(x) + len(rx) > length:
            packed.append((x, y))
            x, y = [], []
        x, y = x + rx, y + ry
    if x:
        packed.append((x, y))
    return packed


class ChatTask(FinetuneTask):
    """Chat SFT: next-token loss on the assistant's tokens."""

    def read_examples(self):
        cfg = self.cfg
        train = read_conversations(cfg.data)
        if cfg.val_data:
            val = read_conversations(cfg.val_data)
        else:
            train, val = split_examples(train, cfg.val_fraction, cfg.seed)
        self.sample_messages = next((m for _, m in val or train), None)
        notes: dict[str, Any] = {}
        rows, val_rows = self._rows(train, notes), self._rows(val, notes)
        if cfg.packing:
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
            rows = pack([rows[i] for i in order.tolist()], self.context)
            notes["packed_rows"] = len(rows)
        if notes.get("skipped_too_long"):
            print(f"skipped {notes['skipped_too_long']} conversations longer than the context "
                  f"({self.context} tokens); truncate=true cuts them instead")
        return rows, val_rows, notes

    def _rows(self, conversations, notes: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
        rows = []
        for _, messages in conversations:
            ids, scored = encode_conversation(self.tokenizer, messages)
            if len(ids) > self.context + 1:
                if not self.cfg.truncate:
                    notes["skipped_too_long"] = notes.get("skipped_too_long", 0) + 1
                    continue
                ids, scored = ids[:self.context + 1], scored[:self.context + 1]
                notes["truncated"] = notes.get("truncated", 0) + 1
            x, y = training_row(ids, scored)
            if any(t != IGNORE for t in y):
                rows.append((x, y))
        return rows

    def collate(self, rows):
        lengths = torch.tensor([len(x) for x, _ in rows])
        return (pad_rows([x for x, _ in rows], self.pad_id), pad_rows([y for _, y in rows], IGNORE),
                lengths)

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch[0], batch[1]
        # The output projection only where a target is scored: most positions of a chat are
        # prompt, and the vocabulary-wide logits (and their gradient) are the largest
        # activations of a small model.
        scored = y != IGNORE
        logits = model(x, select=scored)
        return F.cross_entropy(logits.float(), y[scored])

    @staticmethod
    def count(batch) -> int:
        return int((batch[1] != IGNORE).sum())

    @staticmethod
    def tokens(batch) -> int:
        return int(batch[2].sum())

    def sample(self, model: nn.Module) -> str | None:
        """The model's answer to the first validation conversation's last question."""
        if self.sample_messages is None:
            return None
        messages = self.sample_messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        request = Request(chat_prompt_ids(self.tokenizer, messages[:last]), self.cfg.sample_tokens,
                          SamplingConfig(temperature=0.0), stop_ids=stop_token_ids(
                              self.base_dir, self.tokenizer), truncate=True)
        answer = "".join(e.text for e in stream_one(model, self.tokenizer, request))
        question = messages[last - 1]['content'] if last else ''
        return f"{question}\n>>> {answer}"


register_task("sft", ChatTask)
