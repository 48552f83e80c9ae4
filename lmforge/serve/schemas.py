"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Fields follow the OpenAI API; `top_k`, `min_p` and `repetition_penalty` are common
extensions. Unknown fields are accepted and ignored, as clients send many (`user`, ...).
Texts must be valid Unicode: JSON can spell a lone surrogate (`"\\ud800"`), which no
tokenizer can encode. A message's content parts are text or OpenAI's image_url (a vision-
language model's images); any other part is refused rather than silently left out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.infer.constrain import Constraint

MAX_N = 8
MAX_LOGPROBS = 20


def _unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} has a lone surrogate ({text[err.start]!r} at character "
                         f"{err.start}), which is not Unicode text: send UTF-8 text") from None
    return text


class StreamOptions(BaseModel):
    include_usage: bool = False


SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format` (`text`, `json_object`, `json_schema` with
    `{"name", "schema", "strict"}`), and two lmforge extensions: `{"type": "regex", "regex":
    "..."}` and `{"type": "grammar", "grammar": "<Lark>"}`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: dict | None = None
    regex: str | None = None
    grammar: str | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if not isinstance(self.json_schema, dict) or "schema" not in self.json_schema:
                raise ValueError('a json_schema response format needs {"json_schema": '
                                 '{"name": ..., "schema": {...}}}')
            return Constraint("json_schema", self.json_schema["schema"])
        spec = {"json_object": None, "regex": self.regex, "grammar": self.grammar}[self.type]
        if self.type != "json_object" and not spec:
            raise ValueError(f'a {self.type} response format needs its "{self.type}" field')
        return Constraint(self.type, spec)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    # Sampling settings left out take lmforge's defaults (`SamplingConfig`), as the command
    # line and the Python API do.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list")
        if isinstance(value, str):
            return _unicode(value, "the prompt")
        for i, text in enumerate(value):
            if isinstance(text, str):
                _unicode(text, f"prompt {i}")
        return value


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, value: str | list[dict] | None) -> str | list[dict] | None:
        if isinstance(value, str):
            return _unicode(value, "the content")
        for i, part in enumerate(value or []):
            kind = part.get("type")
            if kind == "image_url":
                _image_url(part, i)
            elif kind != "text":
                raise ValueError(f"content part {i} has type {kind!r}; the parts read here are "
                                 "text and image_url")
            elif not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type text but its text is "
                                 f"{part.get('text')!r}: give a string")
            else:
                _unicode(part["text"], f"content part {i}")
        return value

    def text(self) -> str:
        """The message's text; content parts of type text are joined (no images here)."""
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content if part.get("type") == "text")
        return self.content or ""


def _image_url(part: dict, index: int) -> str:
    """The URL of an image part, `{"type": "image_url", "image_url": {"url": ...}}`."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else None
    if not isinstance(url, str) or not url:
        raise ValueError(f"content part {index} has type image_url but no image_url.url: give "
                         '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')
    return url


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None

    def image_urls(self) -> list[tuple[str, str]]:
        """(where, url) of each image part, in the order the prompt holds them; `where` names
        the part for errors, as `messages[0].content[1]`."""
        return [(f"messages[{m}].content[{p}]", _image_url(part, p))
                for m, message in enumerate(self.messages) if isinstance(message.content, list)
                for p, part in enumerate(message.content) if part.get("type") == "image_url"]


MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, value):
        if isinstance(value, str):
            return [_unicode(value, "the input")]
        if not value:
            raise ValueError("input is an empty list")
        if isinstance(value[0], int):
            return [value]
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} "
                             "a request")
        for i, text in enumerate(value):
            if isinstance(text, str):
                _unicode(text, f"input {i}")
        return value
