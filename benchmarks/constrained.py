"""Constrained decoding on this CPU: how often sampled JSON validates, what the constraint
costs per token, and the two grammar libraries side by side.

    python benchmarks/constrained.py                 # 500 answers (5 schemas x 100)
    python benchmarks/constrained.py --samples 20    # quick

SmolLM2-135M-Instruct answers each schema's request (`tests/test_structured_smollm2.py`'s
five schemas) at temperature 1.0 through the Engine (llguidance, the library lmforge uses),
8 at a time; every answer is parsed and checked with `jsonschema`. Then the same through
`lmforge serve`'s app and the official `openai` client (`response_format: json_schema`,
four choices a request, --server-samples per schema).

Cost per token: the same prompts decoded with the constraint and then without it, each
free request made to generate exactly as many tokens as its constrained twin did (stop
tokens off), batch 1 and batch 8; the table shows ms per generated token and the ratio.

Libraries: the tokens of those answers replayed through each library's matcher (a mask for
every step, then the token accepted): mean and worst time for one mask, and whether every
token of the answers was allowed. xgrammar's row appears when `xgrammar` imports (it pulls in
transformers and triton, so lmforge does not depend on it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jsonschema
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.chat import chat_prompt_ids  # noqa: E402
from lmforge.config import SamplingConfig  # noqa: E402
from lmforge.infer.constrain import Constraint, Matcher  # noqa: E402
from lmforge.infer.engine import Engine, Request  # noqa: E402
from lmforge.open import open_model  # noqa: E402
from tests.test_structured_smollm2 import ASK, SCHEMAS  # noqa: E402


def requests_for(opened, samples: int, temperature: float) -> list[Request]:
    tokenizer = opened.tokenizer
    return [Request(chat_prompt_ids(tokenizer, [{"role": "user", "content": ASK[name]}]), 256,
                    SamplingConfig(temperature=temperature), seed=i, stop_ids=opened.stop_ids,
                    constraint=Constraint("json_schema", schema))
            for name, schema in SCHEMAS.items() for i in range(samples)]


def timed_run(engine: Engine, requests: list[Request]) -> tuple[list, float]:
    start = time.perf_counter()
    done = engine.run(requests)
    return done, time.perf_counter() - start


def per_token_cost(opened, requests: list[Request], batch: int, repeats: int = 2
                   ) -> tuple[float, float, list]:
    """ms per generated token, constrained and free (free twins generate as many tokens),
    best of `repeats` runs taken in turns; and the constrained answers."""
    engine = Engine(opened.model, opened.tokenizer, max_batch=batch)
    engine.run(requests[:1])  # warm up
    done, constrained = timed_run(engine, requests)
    twins = [Request(r.prompt, len(d.tokens), r.sampling, seed=r.seed)
             for r, d in zip(requests, done)]
    free = timed_run(engine, twins)[1]
    for _ in range(repeats - 1):
        constrained = min(constrained, timed_run(engine, requests)[1])
        free = min(free, timed_run(engine, twins)[1])
    tokens = sum(len(d.tokens) for d in done)
    return 1000 * constrained / tokens, 1000 * free / tokens, done


def through_server(opened, samples: int) -> tuple[int, int]:
    """Valid and total answers from the API, four choices a request."""
    import openai

    from lmforge.serve.app import ServeConfig, create_app
    from tests.test_serve import serving

    app = create_app(opened.model, opened.tokenizer, opened.stop_ids,
                     ServeConfig("smollm2", max_batch=8))
    valid = total = 0
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for name, schema in SCHEMAS.items():
            for seed in range(samples // 4):
                reply = client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": ASK[name]}], n=4,
                    seed=seed, temperature=1.0, max_tokens=256, response_format={
                        "type": "json_schema", "json_schema": {"name": name, "schema": schema}})
                for choice in reply.choices:
                    total += 1
                    try:
                        jsonschema.validate(json.loads(choice.message.content), schema)
                        valid += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError):
                        print(f"invalid from the server: {choice.message.content!r}")
    return valid, total


def replay_llguidance(opened, answers) -> tuple[list[float], bool]:
    import llguidance.torch

    vocab = opened.model.cfg.vocab_size
    times, ok = [], True
    for request, done in answers:
        matcher = Matcher(request.constraint, opened.tokenizer, vocab, request.stop_ids)
        for token in done.tokens:
            start = time.perf_counter()  # the library's call alone, as for xgrammar
            llguidance.torch.fill_next_token_bitmask(matcher.matcher, matcher.words, 0)
            times.append(time.perf_counter() - start)
            ok &= bool(matcher.allowed()[token])
            matcher.accept(token)
    return times, ok


def replay_xgrammar(opened, answers) -> tuple[list[float], bool] | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    vocab = opened.model.cfg.vocab_size
    hf = PreTrainedTokenizerFast(tokenizer_object=opened.tokenizer.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab,
                                              stop_token_ids=list(opened.stop_ids))
    compiler = xgr.GrammarCompiler(info)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    times, ok = [], True
    for request, done in answers:
        grammar = compiler.compile_json_schema(json.dumps(request.constraint.spec),
                                               any_whitespace=False, separators=(",", ":"))
        matcher = xgr.GrammarMatcher(grammar)
        for token in done.tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - start)
            word = int(bitmask[0, token // 32])
            ok &= bool((word >> (token % 32)) & 1)
            matcher.accept_token(token)
    return times, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=100, help="answers per schema")
    parser.add_argument("--cost-samples", type=int, default=8,
                        help="answers per schema for the cost per token")
    parser.add_argument("--server-samples", type=int, default=20,
                        help="answers per schema through the server (multiple of 4)")
    parser.add_argument("--only-server", action="store_true", help="the server part alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    opened = open_model(args.model)
    print(f"{args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.server_samples:
        start = time.perf_counter()
        valid, total = through_server(opened, args.server_samples)
        print(f"\nthrough the server and the openai client: {valid} of {total} answers parse "
              f"and validate ({valid / total:.1%}); {time.perf_counter() - start:.0f} s")
    if args.only_server:
        return

    if args.samples:
        requests = requests_for(opened, args.samples, 1.0)
        done, seconds = timed_run(Engine(opened.model, opened.tokenizer, max_batch=8), requests)
        valid = 0
        for request, answer in zip(requests, done):
            try:
                jsonschema.validate(json.loads(answer.text), request.constraint.spec)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                print(f"invalid: {answer.text!r} ({answer.finish_reason})")
        print(f"\n{valid} of {len(done)} sampled answers parse and validate "
              f"({valid / len(done):.1%}); {seconds:.0f} s")

    cost = requests_for(opened, args.cost_samples, 1.0)
    print("\n| batch | constrained ms/token | free ms/token | overhead |\n|---|---|---|---|")
    for batch in (1, 8):
        constrained, free, done = per_token_cost(opened, cost, batch)
        print(f"| {batch} | {constrained:.1f} | {free:.1f} | {constrained / free - 1:+.1%} |")

    answers = list(zip(cost, done))
    print("\n| library | mean mask ms | worst mask ms | every answer token allowed |"
          "\n|---|---|---|---|")
    for name, replay in (("llguidance", replay_llguidance), ("xgrammar", replay_xgrammar)):
        result = replay(opened, answers)
        if result is None:
            print(f"| {name} | - | - | not installed |")
            continue
        times, ok = result
        print(f"| {name} | {1000 * sum(times) / len(times):.3f} | {1000 * max(times):.2f} | "
              f"{'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
