"""SmolLM2-135M-Instruct compressed: size on disk, perplexity on two texts, greedy decoding
speed and the time each method takes.

    python benchmarks/compress.py [--methods rtn,gptq,awq,prune] [--only NAMES] [--repeats 3]
                                  [--llamacpp /path/to/llama-venv/bin/python]

Each variant is written with `quantize_dir` or `prune_dir` (what `lmforge quantize` and
`lmforge prune` run) and loaded back from disk. Perplexity, in 512-token windows: the first
20,000 characters of Tiny Shakespeare, and the English side of the last 500 pairs of the Tatoeba file (one sentence a
line), text of another kind. Calibration: 128 windows of 512 tokens from Tiny Shakespeare
after its first 20,000 characters (disjoint from the scored text). Both need the full files
in ../shared/data (Tiny Shakespeare is karpathy/char-rnn's data/tinyshakespeare/input.txt;
Tatoeba's English-French pairs come from tatoeba.org's exports). Decode: greedy tokens/s for
128 new tokens after "The capital of France is", one sequence, best of --repeats rounds.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.compress.calib import Calibration
from lmforge.compress.prune import PruneSpec
from lmforge.compress.quant import QuantSpec
from lmforge.compress.run import prune_dir, quantize_dir
from lmforge.eval import perplexity
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.gguf import export_gguf
from lmforge.interop.hub import resolve_model
from lmforge.modeldir import directory_bytes
from lmforge.open import open_model

NAME = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
NEW_TOKENS = 128
SCORED_CHARS = 20_000
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE, TATOEBA = DATA / "tinyshakespeare.txt", DATA / "tatoeba-eng-fra-5k.tsv"
VARIANTS = {
    "rtn": [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(3, 128)],
    "gptq": [QuantSpec(4, 32, method="gptq"), QuantSpec(4, 128, method="gptq"),
             QuantSpec(3, 128, method="gptq")],
    "awq": [QuantSpec(4, 128, method="awq"), QuantSpec(4, 128, method="awq+gptq")],
    "prune": [PruneSpec(m, 0.5) for m in ("magnitude", "wanda", "sparsegpt")]
    + [PruneSpec(m, pattern=(2, 4)) for m in ("magnitude", "wanda", "sparsegpt")],
}


def compress(source: Path, out: Path, spec: QuantSpec | PruneSpec,
             calibration: Calibration) -> Path:
    """`source` compressed by `spec` into `out`, as `lmforge quantize` / `lmforge prune` do."""
    if isinstance(spec, PruneSpec):
        prune_dir(source, out, spec, calibration)
    else:
        quantize_dir(source, out, spec, calibration if spec.method != "rtn" else None)
    return out


def texts() -> dict[str, str]:
    for path in (SHAKESPEARE, TATOEBA):
        if not path.is_file():
            sys.exit(f"no {path}: this benchmark reads the full files in ../shared/data "
                     "(see the docstring for where they come from)")
    tatoeba = [line.split("\t")[0] for line in TATOEBA.read_text().splitlines()[-500:]]
    return {"shakespeare": SHAKESPEARE.read_text()[:SCORED_CHARS], "tatoeba": "\n".join(tatoeba)}


def decode_seconds(model, prompt: list[int]) -> float:
    start = time.perf_counter()
    generate(model, prompt, NEW_TOKENS, SamplingConfig(temperature=0))
    return time.perf_counter() - start


def llamacpp_perplexity(python: str, directory: Path, ids: list[int]) -> float:
    """llama.cpp's perplexity of `ids` under `directory` exported to GGUF, in the same
    windows as ours (run by `python`, which has llama-cpp-python)."""
    gguf_file, ids_file = directory / "model.gguf", directory / "ids.json"
    export_gguf(directory, gguf_file)
    ids_file.write_text(json.dumps(ids))
    script = Path(__file__).with_name("llamacpp_perplexity.py")
    out = subprocess.run([python, str(script), str(gguf_file), str(ids_file)], check=True,
                         capture_output=True, text=True).stdout
    return float(re.search(r"perplexity ([0-9.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(VARIANTS),
                        help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--only", default="", help="comma-separated variant names to keep, "
                        "e.g. 'int4 g32,int4 g128 GPTQ' (fp32 always runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llamacpp", metavar="PYTHON", default=None,
                        help="a Python with llama-cpp-python: each quantized variant is also "
                        "exported to GGUF and scored on the Shakespeare text by llama.cpp "
                        "(benchmarks/llamacpp_perplexity.py)")
    args = parser.parse_args()
    scored = texts()
    source = resolve_model(NAME)
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.txt"
        calib_file.write_text(SHAKESPEARE.read_text()[SCORED_CHARS:])
        calibration = Calibration(calib_file, n=128, length=512, seed=0)
        specs = [s for m in args.methods.split(",") for s in VARIANTS[m]]
        if args.only:
            specs = [s for s in specs if s.describe() in args.only.split(",")]
        specs = [None] + specs
        rows = []
        for i, spec in enumerate(specs):
            start = time.perf_counter()
            directory = source if spec is None else compress(source, Path(tmp) / str(i), spec,
                                                             calibration)
            seconds = time.perf_counter() - start
            opened = open_model(directory)
            model, tokenizer = opened.model, opened.tokenizer
            row = {"name": "fp32" if spec is None else spec.describe(), "model": model,
                   "bytes": directory_bytes(directory), "compress": seconds}
            for name, text in scored.items():
                row[name] = perplexity(model, tokenizer.encode(text))[0]
            if args.llamacpp and isinstance(spec, QuantSpec):
                row["llama.cpp"] = llamacpp_perplexity(args.llamacpp, directory,
                                                       tokenizer.encode(scored["shakespeare"]))
            rows.append(row)
            print(f"{row['name']}: {seconds:.0f} s, perplexity "
                  + ", ".join(f"{n} {row[n]:.3f}" for n in scored)
                  + (f", llama.cpp {row['llama.cpp']:.3f}" if "llama.cpp" in row else ""),
                  flush=True)
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
    llama = " llama.cpp Shakespeare ppl (vs ours) |" if args.llamacpp else ""
    print("\n| variant | size on disk | Shakespeare ppl | Tatoeba ppl | greedy decode | "
          f"compress time |{llama}")
    print("| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if llama else ""))
    for r in rows:
        ppl = " | ".join(f"{r[n]:.2f} ({r[n] / base[n] - 1:+.1%})" for n in scored)
        ours = (f" {r['llama.cpp']:.2f} ({r['llama.cpp'] / r['shakespeare'] - 1:+.2%}) |"
                if "llama.cpp" in r else " |" if llama else "")
        print(f"| {r['name']} | {r['bytes'] / 1e6:.0f} MB ({r['bytes'] / base['bytes']:.2f}x) "
              f"| {ppl} | {NEW_TOKENS / r['seconds']:.1f} tok/s "
              f"({base['seconds'] / r['seconds']:.2f}x) | {r['compress']:.0f} s |{ours}")


if __name__ == "__main__":
    main()
