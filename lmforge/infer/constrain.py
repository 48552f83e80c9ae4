"""Constrained decoding: a request's output made to match a JSON schema, a regular expression
or a grammar.

The grammar is compiled by llguidance (a Rust library with no dependencies of its own; see
`benchmarks/constrained.py` for how it compares with xgrammar here). At each step a
`Matcher` gives the tokens that may come next as a bitmask over the vocabulary; the engine
sets every other logit to -inf before penalties and sampling, so temperature, top-p and
seeds work as they do for free text, and then tells the matcher which token was chosen.

Kinds of constraint (`Constraint.kind`):
- ``json_schema``: a JSON schema (dict or JSON text); the output is one JSON value that
  validates against it.
- ``json_object``: any JSON object.
- ``regex``: the whole output matches a regular expression.
- ``grammar``: a Lark grammar (llguidance's dialect: ``start: ...``, regular expressions in
  ``/.../``, ``%json {...}`` for a JSON schema inside a larger grammar), or a GBNF grammar
  as llama.cpp writes them (``root ::= ...``).

JSON is written compactly (no free white space between tokens): letting the model choose
white space lets a sampled answer wander off into spaces and newlines until max_tokens.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import llguidance
import llguidance.numpy  # not llguidance.torch: importing it starts torch.compile (1.5 s)
import torch

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar")
# llguidance's JSON options: compact separators, no free white space, and the schema's
# keywords that it cannot enforce are an error rather than silently dropped.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
                 "coerce_one_of": False}


class ConstraintError(LmforgeError, ValueError):
    """A schema, regular expression or grammar that cannot be compiled into a constraint."""


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `kind` (one of KINDS) and its `spec` (a schema
    dict or JSON text, a regular expression, a Lark grammar; nothing for json_object)."""

    kind: str
    spec: Any = None

    def grammar(self) -> str:
        """The llguidance grammar, checked: a ConstraintError says why one does not compile."""
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}: choose from "
                                  f"{', '.join(KINDS)}")
        if self.kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if self.kind == "json_object" else _schema(self.spec)
            grammar = llguidance.grammar_from("json_schema",
                                              json.dumps({**schema, "x-guidance": _JSON_OPTIONS}))
        elif self.kind == "regex":
            if not isinstance(self.spec, str):
                raise ConstraintError("a regex constraint needs the expression as a string")
            grammar = llguidance.LLMatcher.grammar_from_regex(self.spec)
        else:
            if not isinstance(self.spec, str) or not self.spec.strip():
                raise ConstraintError("a grammar constraint needs the grammar's text (Lark or "
                                      "GBNF)")
            grammar = llguidance.grammar_from("grammar", self.spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ConstraintError(f"the {self.kind.replace('_', ' ')} cannot be compiled: "
                                  f"{'; '.join(messages) or 'no reason given'}")
        return grammar


def _schema(spec: Any) -> dict:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ConstraintError(f"the JSON schema is not JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ConstraintError(f"a JSON schema is a JSON object, not {type(spec).__name__}")
    return spec


_TOKENIZERS: WeakKeyDictionary = WeakKeyDictionary()
_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (built once per tokenizer: about half a second for a
    50k vocabulary), its vocabulary padded to the model's `vocab_size`."""
    with _LOCK:
        key = (vocab_size,)
        cached = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in cached:
            eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0
            cached[key] = llguidance.LLTokenizer(tokenizer.backend.to_str(),
                                                 n_vocab=vocab_size, eos_token=eos)
        return cached[key]


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, vocab_size: int,
                 stop_ids: tuple[int, ...], grammar: str | None = None) -> None:
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size),
                                            grammar or constraint.grammar())
        if self.matcher.is_error():
            raise ConstraintError(f"the {constraint.kind.replace('_', ' ')} cannot be "
                                  f"compiled: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self.words = torch.from_numpy(self.bitmask)  # the same memory
        self.shifts = torch.arange(32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        """Nothing more can follow: the output is complete."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """A bool mask (vocab,) of the tokens that may come next. The grammar's own end (the
        tokenizer's end-of-text token) stands for every stop token of the request."""
        # llguidance computes the mask without holding Python's lock (this call is what
        # lets the engine overlap it with the model's forward pass).
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = (self.words.view(-1, 1) >> self.shifts) & 1
        mask = bits.view(-1)[:self.vocab_size].bool()
        if self.matcher.is_accepting() and len(self.stop_ids):
            mask[self.stop_ids] = True
        return mask

    def accept(self, token: int) -> None:
        """Move past a sampled token (stop tokens end the output, and are not fed in)."""
        if token in self.stop_ids:
            return
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} does not fit the constraint: "
                                  f"{self.matcher.get_error()}")
