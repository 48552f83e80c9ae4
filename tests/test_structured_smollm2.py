"""Structured output, tools and embeddings with the real SmolLM2-135M-Instruct: sampled JSON
that always validates, the server through the `openai` client and LangChain, and embeddings
that put paraphrases closer than unrelated sentences. `benchmarks/constrained.py` runs the
500-answer version and measures the cost per token."""

import json

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from lmforge.chat import chat_prompt_ids
from lmforge.infer.constrain import Constraint
from lmforge.infer.embed import embed_texts
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.open import open_model
from lmforge.serve.app import ServeConfig, create_app
from tests.conftest import DATA
from tests.smollm2 import smollm2_gguf
from tests.test_serve import serving

pytestmark = pytest.mark.slow

# Five schemas of the kinds applications ask for: nested objects, enums, arrays, bounded
# numbers; strings are bounded, so a sampled answer always ends.
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "product": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "price": {"type": "number", "minimum": 0, "maximum": 10000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "in_stock": {"type": "boolean"}},
        "required": ["title", "price", "tags", "in_stock"], "additionalProperties": False},
    "address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 40},
        "city": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "country": {"enum": ["France", "Germany", "Japan", "Brazil"]}},
            "required": ["name", "country"], "additionalProperties": False}},
        "required": ["street", "city"], "additionalProperties": False},
    "meeting": {"type": "object", "properties": {
        "topic": {"type": "string", "maxLength": 40},
        "people": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "name": {"type": "string", "maxLength": 20},
                "role": {"enum": ["host", "guest"]}},
            "required": ["name", "role"], "additionalProperties": False}}},
        "required": ["topic", "people"], "additionalProperties": False},
    "review": {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "summary": {"type": "string", "maxLength": 60}},
        "required": ["stars", "sentiment", "summary"], "additionalProperties": False},
}
ASK = {
    "person": "Invent a person. Answer in JSON.",
    "product": "Describe a product for an online shop in JSON.",
    "address": "Give an address as JSON.",
    "meeting": "Describe a meeting and who attends it, as JSON.",
    "review": "Write a short review of a restaurant as JSON.",
}


@pytest.fixture(scope="module")
def smollm2():
    return open_model(smollm2_gguf())


def test_sampled_answers_always_validate(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    requests = [Request(chat_prompt_ids(tokenizer, [{"role": "user", "content": ASK[name]}]),
                        200, SamplingConfig(temperature=1.0), seed=i, stop_ids=smollm2.stop_ids,
                        constraint=Constraint("json_schema", schema))
                for name, schema in SCHEMAS.items() for i in range(8)]
    done = Engine(model, tokenizer, max_batch=8).run(requests)
    for request, answer in zip(requests, done):
        jsonschema.validate(json.loads(answer.text), request.constraint.spec)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server(smollm2):
    app = create_app(smollm2.model, smollm2.tokenizer, smollm2.stop_ids,
                     ServeConfig("smollm2", max_batch=4))
    with serving(app) as url:
        yield url + "/v1"


def test_the_openai_client_gets_schema_valid_json(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    schema = SCHEMAS["review"]
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": ASK["review"]}], n=4, seed=1,
        temperature=1.0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "review",
                                                                "schema": schema}})
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_langchain_structured_output_and_tools(server):
    chat_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    llm = chat_openai.ChatOpenAI(model="smollm2", base_url=server, api_key="unused",
                                 temperature=0, max_tokens=120, max_retries=0)
    person = llm.with_structured_output(Person).invoke("Invent a person with a name and age.")
    assert isinstance(person, Person)

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    question = HumanMessage("What is 2 plus 3? Use the add tool.")
    call = llm.bind_tools([add], tool_choice="add").invoke([question])
    [used] = call.tool_calls
    assert used["name"] == "add" and set(used["args"]) == {"a", "b"}
    result = ToolMessage(str(add.invoke(used["args"])), tool_call_id=used["id"])
    answer = llm.bind_tools([add]).invoke([question, call, result])
    assert answer.content or answer.tool_calls


def test_paraphrases_are_closer_than_unrelated_sentences(smollm2):
    rows = [line.split("\t") for line in (DATA / "tatoeba-eng-paraphrases.tsv")
            .read_text().splitlines()]
    first = embed_texts(smollm2.model, smollm2.tokenizer, [r[0] for r in rows])
    second = embed_texts(smollm2.model, smollm2.tokenizer, [r[1] for r in rows])
    similarity = first @ second.T
    paraphrases = similarity.diag()
    unrelated = similarity[~torch.eye(len(rows), dtype=torch.bool)]
    assert paraphrases.mean() > unrelated.mean() + 0.01
    # each sentence is nearer its own paraphrase than most other sentences' paraphrases
    assert (paraphrases[:, None] > similarity).float().mean() > 0.7
