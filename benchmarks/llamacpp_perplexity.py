"""llama.cpp's perplexity of a GGUF file over given token ids, windowed and scored as
`lmforge.eval.perplexity.perplexity` does by default, so the two numbers compare: disjoint
windows of 512 tokens, each scoring every token but its first (which has nothing before it in
the window), the negative log-likelihoods summed in float64.

It needs llama-cpp-python, which lmforge does not depend on, and numpy, nothing of lmforge:
run it with the Python that has llama-cpp-python, on ids lmforge's tokenizer wrote.

    python -c "import json; from lmforge.open import open_model; \
        print(json.dumps(open_model('models/q4').tokenizer.encode(open('text.txt').read())))" \
        > ids.json
    lmforge export models/q4 --format gguf --out q4.gguf
    /path/to/llama-venv/bin/python benchmarks/llamacpp_perplexity.py q4.gguf ids.json

Prints the perplexity, the number of tokens scored and the time taken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def read_ids(path: Path, vocab_size: int) -> list[int]:
    ids = json.loads(path.read_text())
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        sys.exit(f"{path} must hold one JSON list of token ids (integers)")
    if len(ids) < 2:
        sys.exit(f"{path} holds {len(ids)} token ids; perplexity needs at least 2")
    wrong = [i for i in ids if not 0 <= i < vocab_size]
    if wrong:
        sys.exit(f"{path} holds ids outside the model's vocabulary of {vocab_size} "
                 f"(e.g. {wrong[0]}): were they written by this model's tokenizer?")
    return ids


def window_nll(llm, window: list[int]) -> float:
    """Summed negative log-likelihood (nats) of window[1:], each token given those before it."""
    llm.reset()  # a fresh context: no window sees another's tokens
    llm.eval(window)
    logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)
    top = logits.max(axis=1)
    log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float((log_norm - logits[np.arange(len(window) - 1), window[1:]]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the GGUF model file")
    parser.add_argument("ids", type=Path, help="a JSON file holding one list of token ids")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from llama_cpp import Llama  # here, so --help works without it

    llm = Llama(model_path=str(args.gguf), n_ctx=args.window, n_batch=args.window,
                n_threads=args.threads, logits_all=True, verbose=False)
    ids = read_ids(args.ids, llm.n_vocab())
    start = time.perf_counter()
    nll, count = 0.0, 0
    # Windows as lmforge.eval.perplexity.windows(len(ids), window, stride=window) makes them.
    for begin in range(0, len(ids) - 1, args.window):
        window = ids[begin:begin + args.window]
        nll += window_nll(llm, window)
        count += len(window) - 1
    seconds = time.perf_counter() - start
    print(f"llama.cpp perplexity {math.exp(nll / count):.4f} over {count:,} tokens "
          f"({args.gguf.name}, windows of {args.window}, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
