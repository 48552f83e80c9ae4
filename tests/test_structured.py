"""Structured output (JSON schema, regex, grammar), tool calls and embeddings: the engine,
the fallback tool format, and the server driven by the official `openai` client."""

import base64
import json
import re

import jsonschema
import numpy as np
import openai
import pytest
import torch

from lmforge.infer.constrain import Constraint, ConstraintError
from lmforge.infer.embed import embed
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.serve.app import ServeConfig, create_app
from lmforge.toolcalls import (
    CallFilter,
    ToolError,
    call_constraint,
    chosen,
    fallback_messages,
    functions_of,
    parse_calls,
)
from tests.test_serve import serving

GREEDY = SamplingConfig(temperature=0)
HOT = SamplingConfig(temperature=1.0)

# What a random model must get right under each constraint: nested objects, enums, arrays
# and bounded numbers (strings bounded too: a random model never chooses to close one).
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1},
                  "minItems": 1, "maxItems": 3}},
     "required": ["colour", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -50, "maximum": 50},
            "y": {"type": "integer", "minimum": -50, "maximum": 50}},
                  "required": ["x", "y"], "additionalProperties": False},
        "ok": {"type": "boolean"}},
     "required": ["point", "ok"], "additionalProperties": False},
]
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ECHO = {"type": "function", "function": {
    "name": "echo", "parameters": {"type": "object", "properties": {
        "word": {"enum": ["yes", "no"]}}, "required": ["word"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


@pytest.fixture(scope="module")
def model(tokenizer, tiny_llama):
    # room for the fallback tool prompt (the tools' JSON) in this small vocabulary's tokens
    return tiny_llama(tokenizer.vocab_size, context_length=1024)


def prompt(tokenizer):
    return tokenizer.encode("First Citizen:\n")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum-array", "nested"])
def test_sampled_json_always_validates(model, tokenizer, schema):
    requests = [Request(prompt(tokenizer), 120, HOT, seed=i,
                        constraint=Constraint("json_schema", schema)) for i in range(12)]
    for done in Engine(model, tokenizer, max_batch=6).run(requests):
        assert done.finish_reason == "stop", done.text
        jsonschema.validate(json.loads(done.text), schema)


def test_constraints_compose_with_sampling_settings(model, tokenizer):
    settings = SamplingConfig(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3,
                              presence_penalty=0.5)
    ask = Request(prompt(tokenizer), 120, settings, seed=3,
                  constraint=Constraint("json_schema", SCHEMAS[1]))
    first, again = (Engine(model, tokenizer).run([ask])[0] for _ in range(2))
    jsonschema.validate(json.loads(first.text), SCHEMAS[1])
    assert first.tokens == again.tokens  # the seed still fixes the output


def test_regex_grammar_and_any_object(model, tokenizer):
    lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,2}/'
    gbnf = 'root ::= "<" word (" " word)? ">"\nword ::= [a-z] [a-z]? [a-z]?'
    kinds = [Constraint("regex", r"[a-c]{2,4}-[0-9]{3}"), Constraint("grammar", lark),
             Constraint("grammar", gbnf), Constraint("json_object")]
    done = Engine(model, tokenizer, max_batch=4).run(
        [Request(prompt(tokenizer), 60, HOT, seed=1, constraint=k) for k in kinds])
    texts = [c.text for c in done]
    assert re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", texts[0])
    assert re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", texts[1])
    assert re.fullmatch(r"<[a-z]{1,3}( [a-z]{1,3})?>", texts[2])
    # a random model's keys run on (SmolLM2 closes its objects: test_structured_smollm2)
    assert texts[3].startswith("{")
    if done[3].finish_reason == "stop":
        assert isinstance(json.loads(texts[3]), dict)


def test_free_requests_beside_constrained_ones_are_unchanged(model, tokenizer):
    free = [Request(tokenizer.encode(t), 24, GREEDY) for t in ("ROMEO:", "To be", "Good")]
    alone = [c.tokens for c in Engine(model, tokenizer).run(free)]
    mixed = free[:1] + [Request(prompt(tokenizer), 40, HOT, seed=i,
                                constraint=Constraint("json_schema", SCHEMAS[0]))
                        for i in range(2)] + free[1:]
    together = Engine(model, tokenizer, max_batch=5).run(mixed)
    assert [c.tokens for c in together[:1] + together[3:]] == alone


def test_uncompilable_constraints_name_the_problem(model, tokenizer):
    cases = [(Constraint("json_schema", {"type": "objekt"}), "objekt"),
             (Constraint("json_schema", "{not json"), "not JSON"),
             (Constraint("regex", "[a-"), "unclosed"),
             (Constraint("grammar", "start: missing_rule"), "missing_rule"),
             (Constraint("xml", "<a/>"), "unknown constraint kind")]
    engine = Engine(model, tokenizer)
    for constraint, says in cases:
        with pytest.raises(ConstraintError, match=says):
            engine.submit(Request(prompt(tokenizer), 5, constraint=constraint))


def test_a_required_call_always_parses(model, tokenizer):
    functions = functions_of([ADD, ECHO])
    requests = [Request(prompt(tokenizer), 120, HOT, seed=i,
                        constraint=call_constraint(functions))
                for i in range(8)]
    for done in Engine(model, tokenizer, max_batch=8).run(requests):
        content, calls = parse_calls(done.text, functions)
        assert content is None and len(calls) == 1, done.text
        call = calls[0]["function"]
        schema = next(f.parameters for f in functions if f.name == call["name"])
        jsonschema.validate(json.loads(call["arguments"]), schema)


def test_parsing_tool_calls():
    functions = functions_of([ADD])
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = parse_calls(text, functions)
    assert content == "Let me add."
    assert calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    # an unknown function, broken JSON: plain text
    for text in ('<tool_call>{"name": "mul", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "add", "arguments": </tool_call>'):
        assert parse_calls(text, functions) == (text, [])
    # a call cut off before its closing tag still counts once its JSON is whole
    assert parse_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}',
                       functions)[1]


def test_streamed_text_is_held_back_from_where_a_call_may_start():
    held = CallFilter()
    pieces = ["Sure", ". <tool", "_ca", "ll>\n{", '"name": "add"}']
    assert [held.push(p) for p in pieces] == ["Sure", ". ", "", "", ""]
    assert held.calling and held.text[held.sent:].startswith("<tool_call>")
    plain = CallFilter()
    assert [plain.push(p) for p in ["a <", "b"]] == ["a ", "<b"]


def test_the_fallback_format_carries_tools_calls_and_results():
    functions = functions_of([ADD])
    call = {"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = fallback_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}], functions)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert json.dumps(ADD) in messages[0]["content"] or '"name": "add"' in messages[0]["content"]
    assert json.loads(messages[2]["content"].split("\n")[1]) == {"name": "add",
                                                                  "arguments": {"a": 2, "b": 3}}
    assert json.loads(messages[3]["content"].split("\n")[1]) == {"name": "add", "content": "5"}


def test_tool_choices_and_bad_tools():
    functions = functions_of([ADD, ECHO])
    assert chosen(functions, None) == (functions, False)
    assert chosen(functions, "none") == ([], False)
    assert chosen(functions, "required") == (functions, True)
    named = {"type": "function", "function": {"name": "echo"}}
    assert chosen(functions, named) == (functions[1:], True)
    with pytest.raises(ToolError, match="'mul'.*not among"):
        chosen(functions, {"type": "function", "function": {"name": "mul"}})
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    with pytest.raises(ToolError, match="tools\\[0\\] \\(f\\)"):
        functions_of([bad])
    with pytest.raises(ToolError, match="name"):
        functions_of([{"type": "function", "function": {"name": "has space"}}])


def test_embeddings_are_unit_mean_pooled_states_whatever_the_batch(model, tokenizer):
    texts = ["To be, or not to be", "ROMEO:", "a longer line of text for the batch to pad"]
    ids = [tokenizer.encode(t) for t in texts]
    together = embed(model, ids, batch_size=3)
    for row, tokens in zip(together, ids):
        states = model.features(torch.tensor([tokens]))[0]
        expected = torch.nn.functional.normalize(states.mean(0), dim=0)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embed(model, ids, batch_size=1), together, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def client(model, tokenizer):
    app = create_app(model, tokenizer, (), ServeConfig("tiny", max_batch=4))
    with serving(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_through_the_client(client):
    schema = SCHEMAS[2]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a point"}], max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        n=3, seed=5)
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a point"}], max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        stream=True, seed=5)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content
    done = client.completions.create(model="tiny", prompt="First", max_tokens=60, extra_body={
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "person", "schema": SCHEMAS[0]}}})
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMAS[0])


def test_forced_tool_calls_plain_and_streamed(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": "add 2 and 3"}],
               tools=[ADD, ECHO], tool_choice={"type": "function", "function": {"name": "add"}},
               max_tokens=80, seed=2)
    reply = client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    chunks = list(client.chat.completions.create(**ask, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    [streamed] = [d.tool_calls for d in deltas if d.tool_calls]
    assert streamed[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the result goes back as a tool message, and the next turn is answered
    follow = client.chat.completions.create(
        model="tiny", tools=[ADD], max_tokens=8, messages=[
            *ask["messages"], choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "5"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                  "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "grammar", "grammar": "start: nowhere"}}, "response_format",
     "nowhere"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice", "mul"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools", "parameters"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "drop one"),
])
def test_bad_structured_requests_are_400s(client, body, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", max_tokens=4, extra_body=body,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == param and says in caught.value.body["message"]


def test_embeddings_through_the_client(client, model, tokenizer):
    texts = ["To be, or not to be", "ROMEO:"]
    floats = client.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in floats.data] == [0, 1]
    expected = embed(model, [tokenizer.encode(t) for t in texts])
    assert np.allclose([d.embedding for d in floats.data], expected.numpy(), atol=1e-5)
    raw = client.embeddings.with_raw_response.create(model="tiny", input="ROMEO:",
                                                     encoding_format="base64").http_response
    packed = raw.json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), "<f4"), expected[1].numpy())
    for bad, says in [({"input": []}, "empty"), ({"input": "x", "dimensions": 3}, "dimensions")]:
        with pytest.raises(openai.BadRequestError, match=says):
            client.embeddings.create(model="tiny", **bad)
