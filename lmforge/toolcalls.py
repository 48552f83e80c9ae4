"""Tool calls: functions offered to a chat model in its prompt, and its calls read back out.

A model's chat template that speaks of `tools` gets them as transformers passes them (the
`tools` variable: OpenAI's `[{"type": "function", "function": {...}}]`), and the
conversation's earlier calls and results as OpenAI messages (`tool_calls` on assistant
messages, `role: "tool"` messages with `tool_call_id`).

A template that does not (SmolLM2's, and the ChatML of the models lmforge trains) gets the
fallback format, documented here because a model has to be told it in its prompt:
- a system message (added first, or appended to the conversation's own) lists the functions
  as JSON, one a line, between <tools> and </tools>, and says to answer a call as
  <tool_call>{"name": ..., "arguments": {...}}</tool_call>;
- an earlier assistant call is written that way in the assistant's turn;
- a tool's result is a user turn: <tool_response>{"name": ..., "content": ...}</tool_response>.

Either way the model's calls are read from <tool_call>...</tool_call> blocks of JSON (the
format most open models with tools write, Qwen2.5's and Hermes' among them). When a call is
required (`tool_choice: "required"` or a named function), the output is constrained to
exactly one such block whose arguments match the function's JSON schema, so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.infer.constrain import Constraint, ConstraintError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(\{.*?\})\s*(?:" + re.escape(CALL_CLOSE) + r"|$)",
                   re.DOTALL)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolError(LmforgeError, ValueError):
    """Tools or a tool choice that cannot be used as given."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}

    def call_schema(self) -> dict:
        """The JSON schema of a call of this function: its name and its arguments."""
        return {"type": "object", "properties": {"name": {"const": self.name},
                                                 "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


def functions_of(tools: list[dict]) -> list[Function]:
    """OpenAI `tools`, checked: each a function with a name and a JSON schema of parameters
    that compiles (a ToolError names the tool and what is wrong)."""
    out: list[Function] = []
    for i, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(spec, dict):
            raise ToolError(f"tools[{i}] is not {{\"type\": \"function\", \"function\": {{...}}}}")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -; "
                            f"got {name!r}")
        parameters = spec.get("parameters", {"type": "object", "properties": {}})
        try:
            Constraint("json_schema", parameters).grammar()
        except ConstraintError as err:
            raise ToolError(f"tools[{i}] ({name}): its parameters are not a usable JSON "
                            f"schema: {err}") from None
        if any(f.name == name for f in out):
            raise ToolError(f"tools[{i}]: two tools are named {name!r}")
        out.append(Function(name, str(spec.get("description") or ""), parameters))
    return out


def chosen(functions: list[Function], choice: Any) -> tuple[list[Function], bool]:
    """The functions a reply may call under `tool_choice`, and whether it must call one.
    `none`: none; `auto` (the default with tools): any, or none; `required`: one of them;
    `{"type": "function", "function": {"name": N}}`: N."""
    if choice is None or choice == "auto":
        return functions, False
    if choice == "none":
        return [], False
    if choice == "required":
        if not functions:
            raise ToolError("tool_choice is \"required\" but no tools were given")
        return functions, True
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice must be \"none\", \"auto\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    match = [f for f in functions if f.name == name]
    if not match:
        raise ToolError(f"tool_choice names function {name!r}, which is not among the tools "
                        f"({', '.join(f.name for f in functions) or 'none given'})")
    return match, True


def call_constraint(functions: list[Function]) -> Constraint:
    """Output that is exactly one call of one of `functions`, arguments by its schema."""
    schema = functions[0].call_schema() if len(functions) == 1 else \
        {"anyOf": [f.call_schema() for f in functions]}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                       "key_separator": ": "}}
    grammar = (f"start: {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}\n"
               f"call: %json {json.dumps(schema)}")
    return Constraint("grammar", grammar)


def speaks_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (else: the fallback format)."""
    return template is not None and "tools" in template


def fallback_messages(messages: list[dict], functions: list[Function]) -> list[dict]:
    """The conversation in the fallback format (module docstring): plain messages that any
    chat template renders."""
    called = {c.get("id"): c["function"]["name"] for m in messages
              for c in m.get("tool_calls") or () if m["role"] == "assistant"}
    out = [_fallback_message(m, called) for m in messages]
    if not functions:
        return out
    listing = "\n".join(json.dumps(f.openai(), ensure_ascii=False) for f in functions)
    guide = ("You can call functions. They are described here, one a line, in JSON:\n"
             f"<tools>\n{listing}\n</tools>\n"
             "To call one, answer with its name and arguments as JSON between tags, like "
             f'this:\n{CALL_OPEN}\n{{"name": "function_name", "arguments": {{"arg": "value"}}}}'
             f"\n{CALL_CLOSE}\nThe result comes back in <tool_response> tags.")
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": f"{out[0]['content']}\n\n{guide}"}, *out[1:]]
    return [{"role": "system", "content": guide}, *out]


def _fallback_message(m: dict, called: dict[str | None, str]) -> dict:
    if m["role"] == "tool":
        name = m.get("name") or called.get(m.get("tool_call_id"), "")
        result = {"name": name, "content": m["content"]}
        return {"role": "user",
                "content": f"<tool_response>\n{json.dumps(result, ensure_ascii=False)}\n"
                           "</tool_response>"}
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"])
                          for c in m["tool_calls"])
        text = m.get("content") or ""
        return {"role": "assistant", "content": f"{text}\n{calls}" if text else calls}
    return {"role": m["role"], "content": m.get("content") or ""}


def format_call(name: str, arguments: str | dict) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{call}\n{CALL_CLOSE}"


def parse_calls(text: str, functions: list[Function]) -> tuple[str | None, list[dict]]:
    """The text's tool calls of known functions, as OpenAI `tool_calls` entries, and the
    text around them (None when nothing else was said). Text without a well-formed call of
    a known function is all content."""
    calls, kept, at = [], [], 0
    names = {f.name for f in functions}
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": json.dumps(arguments, ensure_ascii=False)}})
        kept.append(text[at:match.start()])
        at = match.end()
    if not calls:
        return text, []
    content = ("".join(kept) + text[at:]).strip()
    return content or None, calls


class CallFilter:
    """Streams a reply's text while holding back what may be a tool call: text is released
    until CALL_OPEN starts (or may be starting) and kept from there on, for `parse_calls` at
    the end."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.calling = False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.calling:
            return ""
        start = self.text.find(CALL_OPEN, self.sent)
        if start >= 0:
            self.calling = True
            out, self.sent = self.text[self.sent:start], start
            return out
        safe = len(self.text)
        for n in range(min(len(CALL_OPEN) - 1, len(self.text)), 0, -1):
            if self.text.endswith(CALL_OPEN[:n]):
                safe -= n
                break
        out, self.sent = self.text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return out
