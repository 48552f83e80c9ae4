"""How long a long prompt stalls the answers already streaming, by the engine's prefill chunk.

    python benchmarks/prefill_stall.py [MODEL] [--prompt 2048] [--chunks 0,256,512]

One greedy sequence decodes (a short prompt); after 8 of its tokens a request with a long
prompt (--prompt tokens of Tiny Shakespeare, or of repeated text without ../shared/data)
arrives. For each prefill chunk (0: the prompt read whole, as before chunked prefill):
the longest gap between two tokens of the running sequence, its median gap, the long
request's time to first token, and the whole run's time. Default model
smollm2-135m-instruct (fp32; pulled if absent).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.open import open_model

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
GREEDY = SamplingConfig(temperature=0)


def long_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text()[:40_000]
    return "The quick brown fox jumps over the lazy dog. " * 1000


def run(engine: Engine, short: list[int], long: list[int], answer: int) -> dict:
    """Gaps between the running sequence's tokens, and the long request's first token."""
    running = engine.submit(Request(short, answer, GREEDY))
    times, arrived, first = [], None, None
    start = time.perf_counter()
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        times += [now for e in events if e.request_id == running and e.token is not None]
        if arrived is None and len(times) == 8:
            waiting, arrived = engine.submit(Request(long, 4, GREEDY)), now
        if arrived is not None and first is None and any(e.request_id == waiting for e in events):
            first = now - arrived
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"max_gap": max(gaps), "median_gap": statistics.median(gaps), "ttft": first,
            "total": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", type=int, default=2048, help="tokens of the long prompt")
    parser.add_argument("--chunks", default="0,256,512", help="prefill chunks to compare")
    parser.add_argument("--answer", type=int, default=64, help="tokens the running one makes")
    args = parser.parse_args()
    opened = open_model(args.model)
    tokenizer = opened.tokenizer
    long = tokenizer.encode(long_text())[:args.prompt]
    short = tokenizer.encode("Once upon a time")
    print(f"{args.model}, long prompt {len(long)} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| prefill chunk | longest gap (s) | median gap (s) | long prompt's first token (s) "
          "| run (s) |")
    print("|---|---|---|---|---|")
    for chunk in map(int, args.chunks.split(",")):
        engine = Engine(opened.model, tokenizer, max_batch=2, prefill_chunk=chunk)
        run(engine, short, long[:64], 16)  # warm up
        r = run(engine, short, long, args.answer)
        print(f"| {chunk or 'whole'} | {r['max_gap']:.3f} | {r['median_gap']:.3f} | "
              f"{r['ttft']:.2f} | {r['total']:.2f} |")


if __name__ == "__main__":
    main()
