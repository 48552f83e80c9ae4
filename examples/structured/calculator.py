"""A tool-using loop through the OpenAI client: the model calls a calculator, reads the result
and answers.

    lmforge serve smollm2-135m-instruct &
    python examples/structured/calculator.py "What is 17 times 23?"

The first request requires a call (`tool_choice: "required"`), so the reply is always a
well-formed call of `calculate` whose arguments match its schema; the result goes back as a
`tool` message and the model writes the answer. SmolLM2's chat template has no tool section,
so the server describes the tools in lmforge's fallback format (see lmforge/toolcalls.py).
"""

from __future__ import annotations

import argparse
import json
import operator

from openai import OpenAI

OPERATIONS = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
              "divide": operator.truediv}
CALCULATOR = {"type": "function", "function": {
    "name": "calculate",
    "description": "Apply an arithmetic operation to two numbers.",
    "parameters": {"type": "object", "properties": {
        "operation": {"enum": list(OPERATIONS)},
        "a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["operation", "a", "b"], "additionalProperties": False}}}


def calculate(operation: str, a: float, b: float) -> str:
    try:
        return str(OPERATIONS[operation](a, b))
    except ZeroDivisionError:
        return "error: division by zero"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="What is 17 times 23?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR],
                                           tool_choice="required", temperature=0, max_tokens=100)
    message = reply.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        result = calculate(**arguments)
        print(f"call: {call.function.name}({arguments}) = {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    answer = client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR],
                                            tool_choice="none", temperature=0, max_tokens=60)
    print("answer:", answer.choices[0].message.content)


if __name__ == "__main__":
    main()
