"""Prompt-lookup speculative decoding on SmolLM2-135M-Instruct: plain vs speculative greedy.

    python benchmarks/speculative.py                 # up to 200 new tokens, best of 3
    python benchmarks/speculative.py --max-draft 4 --ngram 2

The tasks are grounded in their input, where drafting from the prompt pays: the chat
template around a request to correct the mistakes in a ~150-word paragraph, or to repeat it
with one word changed, so much of the answer is copied (how much is up to the model: the
first task's answer rewords more). fp32, batch 1, greedy, up to the end-of-turn token.
Speculative decoding must give the very tokens plain decoding gives; the table says whether
it did. Timings: the best of --repeats runs of each, plain and speculative alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.chat import chat_prompt_ids
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.speculative import SpeculativeStats, speculative_stream
from lmforge.interop.hub import resolve_model
from lmforge.modeldir import stop_token_ids
from lmforge.open import open_model

NAME = "smollm2-135m-instruct"
PARAGRAPH = (
    "The old lighthouse on the northern cape have stood for more then two hundred years. "
    "Every evening the keeper climbed the narrow stairs, cleaned the big lens and lit the "
    "lamp before the sun was gone. Ships that passed the rocks at night relied on it's "
    "beam to find the safe channel into the harbour. In the winter storms the waves was "
    "so high that spray reached the top of the tower, and the keeper sometimes stayed "
    "awake until morning to make sure the light never went out. When the lamp was "
    "replaced by an automatic one, the last keeper moved to the village, but he still "
    "walked up the hill every sunday to look at the sea. Today the building is a small "
    "museum where visitors can see his logbooks, the brass instruments he used, and a "
    "photograph of the day the fishing fleet returned safely after the great storm of "
    "1953, guided home by the light he refused to leave."
)
TASKS = {
    "correct the mistakes": "Rewrite the following paragraph with its grammar and spelling "
                            "mistakes corrected. Keep every sentence.",
    "repeat with one word changed": 'Repeat the following paragraph, replacing the word '
                                    '"keeper" with "guardian".',
}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_task(model, tokenizer, stop: tuple[int, ...], request: str,
             args: argparse.Namespace) -> dict:
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": request}])
    greedy = SamplingConfig(temperature=0)
    stats = SpeculativeStats()  # summed over the repeats, which all make the same tokens
    plain_s = spec_s = float("inf")
    # Plain and speculative runs alternate, so both meet the same load on a shared machine.
    for _ in range(args.repeats):
        seconds, plain = timed(lambda: generate(model, prompt, args.new_tokens, greedy,
                                                stop_ids=stop))
        plain_s = min(plain_s, seconds)
        seconds, spec = timed(lambda: list(speculative_stream(
            model, prompt, args.new_tokens, greedy, stop_ids=stop, ngram=args.ngram,
            max_draft=args.max_draft, stats=stats)))
        spec_s = min(spec_s, seconds)
    return {"prompt": len(prompt), "tokens": len(spec), "plain": len(plain) / plain_s,
            "speculative": len(spec) / spec_s, "speedup": plain_s / spec_s,
            "acceptance": stats.acceptance,
            "per_forward": len(spec) * args.repeats / stats.forwards,
            "identical": spec == plain, "text": tokenizer.decode(spec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    directory = resolve_model(NAME)
    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    stop = stop_token_ids(directory, tokenizer)
    generate(model, tokenizer.encode(PARAGRAPH), 8, SamplingConfig(temperature=0))  # warm-up
    rows = {}
    for task, instruction in TASKS.items():
        rows[task] = run_task(model, tokenizer, stop, f"{instruction}\n\n{PARAGRAPH}", args)
        print(f"{task}: {rows[task]['text']}\n")
    print(f"SmolLM2-135M-Instruct, fp32, batch 1, greedy, {torch.get_num_threads()} threads, "
          f"ngram {args.ngram}, max draft {args.max_draft}, best of {args.repeats}\n")
    print("| task | prompt / new tokens | plain | speculative | speedup | acceptance "
          "| tokens per forward | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for task, r in rows.items():
        print(f"| {task} | {r['prompt']} / {r['tokens']} | {r['plain']:.1f} tok/s "
              f"| {r['speculative']:.1f} tok/s | **{r['speedup']:.2f}x** | {r['acceptance']:.0%} "
              f"| {r['per_forward']:.1f} | {'yes' if r['identical'] else 'no'} |")


if __name__ == "__main__":
    main()
