"""Prompt-lookup speculative decoding in the engine on SmolLM2-135M-Instruct: plain vs
speculative greedy.

    python benchmarks/speculative.py                 # up to 200 new tokens, best of 3
    python benchmarks/speculative.py --max-draft 4 --ngram 2

The tasks are grounded in their input, where drafting from the prompt pays: the chat
template around a request to correct the mistakes in a ~150-word paragraph, or to repeat it
with one word changed, so much of the answer is copied (how much is up to the model: the
first task's answer rewords more). fp32, greedy, up to the end-of-turn token: each task alone
(batch 1), then both in one batch.
Speculative decoding must give the very tokens plain decoding gives; the table says whether
it did. Timings: the best of --repeats runs of each, plain and speculative alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.chat import chat_prompt_ids
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.speculative import SpeculativeStats
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


def decode(model, tokenizer, requests: list[Request], draft: int, ngram: int
           ) -> tuple[list[list[int]], SpeculativeStats]:
    engine = Engine(model, tokenizer, max_batch=len(requests), draft=draft, ngram=ngram)
    return [c.tokens for c in engine.run(requests)], engine.speculation


def run_requests(model, tokenizer, requests: list[Request], args: argparse.Namespace) -> dict:
    stats = SpeculativeStats()  # summed over the repeats, which all make the same tokens
    plain_s = spec_s = float("inf")
    # Plain and speculative runs alternate, so both meet the same load on a shared machine.
    for _ in range(args.repeats):
        seconds, (plain, _) = timed(lambda: decode(model, tokenizer, requests, 0, args.ngram))
        plain_s = min(plain_s, seconds)
        seconds, (spec, run) = timed(lambda: decode(model, tokenizer, requests, args.max_draft,
                                                    args.ngram))
        spec_s = min(spec_s, seconds)
        for name in ("forwards", "drafted", "accepted"):
            setattr(stats, name, getattr(stats, name) + getattr(run, name))
    tokens = sum(map(len, spec))
    return {"prompt": sum(len(r.prompt) for r in requests), "tokens": tokens,
            "plain": sum(map(len, plain)) / plain_s, "speculative": tokens / spec_s,
            "speedup": plain_s / spec_s, "acceptance": stats.acceptance,
            "per_forward": tokens * args.repeats / stats.forwards,
            "identical": spec == plain, "text": tokenizer.decode(spec[0])}


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
    greedy = SamplingConfig(temperature=0)
    requests = {task: Request(chat_prompt_ids(tokenizer, [{"role": "user", "content":
                                                           f"{instruction}\n\n{PARAGRAPH}"}]),
                              args.new_tokens, greedy, stop_ids=stop)
                for task, instruction in TASKS.items()}
    decode(model, tokenizer, [Request(tokenizer.encode(PARAGRAPH), 8, greedy)], 0, 1)  # warm-up
    rows = {}
    for task, request in requests.items():
        rows[task] = run_requests(model, tokenizer, [request], args)
        print(f"{task}: {rows[task]['text']}\n")
    rows["both, in one batch"] = run_requests(model, tokenizer, list(requests.values()), args)
    print(f"SmolLM2-135M-Instruct, fp32, greedy, {torch.get_num_threads()} threads, "
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
