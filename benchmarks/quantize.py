"""SmolLM2-135M-Instruct quantized: size on disk, perplexity and greedy decoding speed.

    python benchmarks/quantize.py

Each variant is written with `quantize_dir` (what `lmforge quantize` runs) and loaded back
from disk. Perplexity: the first 20,000 characters of Tiny Shakespeare in 512-token
windows. Decode: greedy tokens/s for 128 new tokens after "The capital of France is", one
sequence, best of --repeats rounds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lmforge.compress.quant import QuantSpec, quantize_dir
from lmforge.eval import perplexity
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.hub import resolve_model
from lmforge.modeldir import directory_bytes
from lmforge.open import open_model

NAME = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
NEW_TOKENS = 128
# The first 20,000 characters of Tiny Shakespeare are those of the slice the tests use.
SHAKESPEARE = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-head.txt"
VARIANTS = [None, QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 32, head_bits=4)]


def decode_seconds(model, prompt: list[int]) -> float:
    start = time.perf_counter()
    generate(model, prompt, NEW_TOKENS, SamplingConfig(temperature=0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = resolve_model(NAME)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(VARIANTS):
            directory = source if spec is None else quantize_dir(source, Path(tmp) / str(i), spec)
            opened = open_model(directory)
            model, tokenizer = opened.model, opened.tokenizer
            ids = tokenizer.encode(SHAKESPEARE.read_text()[:20_000])
            rows.append({"name": "fp32" if spec is None else spec.describe(), "model": model,
                         "bytes": directory_bytes(directory), "ppl": perplexity(model, ids)[0]})
            print(f"{rows[-1]['name']}: perplexity {rows[-1]['ppl']:.3f}", flush=True)
        prompt = tokenizer.encode(PROMPT)
        for row in rows:
            decode_seconds(row["model"], prompt)  # warm-up: the int4 weights are packed here
        # Rounds go through every variant, so a burst of load elsewhere slows one round of
        # each rather than every repeat of one.
        for _ in range(args.repeats):
            for row in rows:
                row["seconds"] = min(row.get("seconds", float("inf")),
                                     decode_seconds(row["model"], prompt))

    base = rows[0]
    print("\n| variant | size on disk | perplexity | greedy decode | speed vs fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['bytes'] / 1e6:.0f} MB ({r['bytes'] / base['bytes']:.2f}x) "
              f"| {r['ppl']:.2f} ({r['ppl'] / base['ppl'] - 1:+.1%}) "
              f"| {NEW_TOKENS / r['seconds']:.1f} tok/s | {base['seconds'] / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
