"""Pull fields out of free text into a JSON schema, with SmolLM2-135M-Instruct on this machine.

    lmforge serve smollm2-135m-instruct &          # the OpenAI-compatible API on :8000
    python examples/structured/extract.py          # or --base-url http://HOST:PORT/v1

Each text goes to the server with `response_format` naming the schema: the answer is always
JSON that validates (the server constrains decoding to the schema), and the small model
fills it in as well as it can read the text.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

CONTACT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "email": {"type": "string", "maxLength": 80},
        "city": {"type": "string", "maxLength": 40},
        "role": {"enum": ["customer", "supplier", "employee", "other"]},
    },
    "required": ["name", "email", "city", "role"],
    "additionalProperties": False,
}
TEXTS = [
    "Hi, I'm Maria Lopez from Madrid. I bought two chairs from you last week; you can reach "
    "me at maria.lopez@example.com.",
    "This is Tom Becker, sales lead at Becker Timber in Hamburg. We can deliver the oak "
    "boards on Monday. Write to tom@beckertimber.example.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="the served model (default: the first)")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    for text in TEXTS:
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=200,
            messages=[{"role": "system", "content": "Extract the contact details as JSON."},
                      {"role": "user", "content": text}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "contact", "schema": CONTACT}})
        print(text)
        print("->", json.dumps(json.loads(reply.choices[0].message.content), indent=2), "\n")


if __name__ == "__main__":
    main()
