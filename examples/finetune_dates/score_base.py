"""Score a chat model on the date task: greedy answers, exact match and lenient match.

Exact match is the output, stripped, equal to the ISO date; lenient match is the ISO date
appearing anywhere in the output. A big gap between the two means the model knows the date
but not the format; both low means it lacks the skill. Run make_data.py first:

    python examples/finetune_dates/score_base.py --data data/dates/test_eval.jsonl [--limit 50]

--model takes a registry name or a model/run directory, so a fine-tuned model scores the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmforge.chat import chat_prompt_ids, render_chat
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.hub import resolve_model
from lmforge.modeldir import stop_token_ids
from lmforge.open import open_model
from lmforge.tokenizer import Tokenizer

# An ISO date is 10 characters, 5-7 tokens; a little slack shows what else the model says.
MAX_NEW_TOKENS = 24
# Prompts are under 100 tokens; a short cache keeps memory small (the default is the context).
CACHE_LEN = 256


def read_examples(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def exact(output: str, answer: str) -> bool:
    return output.strip() == answer


def lenient(output: str, answer: str) -> bool:
    return answer in output


def chat_length(tok: Tokenizer, prompt: str, answer: str) -> int:
    """Tokens in the whole conversation as the model is trained on it (template included)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return len(tok.encode(render_chat(tok, messages, add_generation_prompt=False)))


def answer_all(model_spec: str, prompts: list[str], batch: int) -> tuple[list[str], Tokenizer]:
    """Greedy replies to each prompt as a single user turn, in order."""
    directory = resolve_model(model_spec)
    opened = open_model(directory)
    model, tok = opened.model, opened.tokenizer
    stop = stop_token_ids(directory, tok)
    greedy = SamplingConfig(temperature=0)
    requests = [Request(chat_prompt_ids(tok, [{"role": "user", "content": p}]), MAX_NEW_TOKENS,
                        greedy, stop_ids=stop) for p in prompts]
    with torch.inference_mode():
        completions = Engine(model, tok, max_batch=batch, max_len=CACHE_LEN).run(requests)
    return [c.text for c in completions], tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="test_eval.jsonl from make_data.py")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="registry name or model/run directory")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--show", type=int, default=10, help="example outputs to print")
    parser.add_argument("--save", type=Path, default=None,
                        help="write every prompt, answer and output here (jsonl)")
    args = parser.parse_args()

    rows = read_examples(args.data, args.limit)
    start = time.perf_counter()
    outputs, tok = answer_all(args.model, [r["prompt"] for r in rows], args.batch)
    seconds = time.perf_counter() - start

    n = len(rows)
    n_exact = sum(exact(o, r["answer"]) for o, r in zip(outputs, rows))
    n_lenient = sum(lenient(o, r["answer"]) for o, r in zip(outputs, rows))
    tokens = sum(chat_length(tok, r["prompt"], r["answer"]) for r in rows) / n
    for r, o in list(zip(rows, outputs))[:args.show]:
        mark = "ok " if exact(o, r["answer"]) else "~  " if lenient(o, r["answer"]) else "no "
        print(f"{mark}{r['prompt']!r}\n   want {r['answer']}  got {o!r}")
    print(f"\n{args.model} on {n} examples ({seconds:.0f} s)")
    print(f"exact match   {n_exact / n:6.1%}  ({n_exact}/{n})")
    print(f"lenient match {n_lenient / n:6.1%}  ({n_lenient}/{n})  answer anywhere in the output")
    print(f"mean tokens per example with the chat template (prompt + answer): {tokens:.1f}")
    if args.save:
        with args.save.open("w") as f:
            for r, o in zip(rows, outputs):
                f.write(json.dumps({**r, "output": o, "exact": exact(o, r["answer"])}) + "\n")


if __name__ == "__main__":
    main()
