"""Test-split BLEU, chrF (sacrebleu) and exact match of a seq2seq run, greedy against beam
search.

    python benchmarks/translate_bleu.py runs/en-fr [--beam 4] [--reference smollm2-135m-instruct]

The test pairs are the run's own: its recipe.yaml names the data, split fractions and seed,
and the split is made again exactly as training made it. `--reference MODEL` adds a row for
a chat model asked to translate the same sources (greedy, its chat template, the first line
of its answer), a point of comparison for a small model trained from nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import sacrebleu
import yaml

from lmforge.chat import chat_prompt_ids
from lmforge.data.parallel import read_pairs, split_pairs
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import translate
from lmforge.interop.hub import resolve_model
from lmforge.modeldir import stop_token_ids
from lmforge.open import open_model

PROMPT = ("Translate this {source} sentence into {target}. Answer with the translation "
          "only.\n\n{text}")


def prompted(spec: str, sources: list[str], source: str, target: str) -> list[str]:
    """A chat model's greedy translations of `sources`: the first line of each answer."""
    directory = resolve_model(spec)
    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    stops = stop_token_ids(directory, tokenizer)
    requests = [Request(chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT.format(
        source=source, target=target, text=text)}]), 96, SamplingConfig(temperature=0.0),
        stop_ids=stops) for text in sources]
    done = Engine(model, tokenizer, max_batch=8).run(requests)
    return [c.text.strip().split("\n")[0].strip().strip('"') for c in done]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a seq2seq run directory")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--reference", help="a chat model to prompt for the same translations")
    parser.add_argument("--languages", default="English,French",
                        help="source,target language names for the reference prompt")
    args = parser.parse_args()
    recipe = yaml.safe_load((args.run / "recipe.yaml").read_text())
    pairs, _ = read_pairs(recipe["data"], recipe["source_field"], recipe["target_field"],
                          recipe["bad_lines"])
    _, _, test = split_pairs(pairs, recipe["val_fraction"], recipe["test_fraction"],
                             recipe["seed"])
    if not test:
        raise SystemExit(f"{args.run} was trained without a test split (test_fraction=0)")
    opened = open_model(args.run)
    model, tokenizer = opened.model, opened.tokenizer
    sources, references = [s for s, _ in test], [[t for _, t in test]]
    print(f"{len(test)} test pairs from {recipe['data']}")
    print("| model, decoding | BLEU | chrF | exact match | seconds |")
    print("|---|---:|---:|---:|---:|")
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()

    def row(name: str, hypotheses: list[str], seconds: float) -> None:
        exact = sum(h == r for h, r in zip(hypotheses, references[0])) / len(hypotheses)
        print(f"| {name} | {bleu.corpus_score(hypotheses, references).score:.1f} | "
              f"{chrf.corpus_score(hypotheses, references).score:.1f} | {exact:.1%} | "
              f"{seconds:.1f} |", flush=True)

    for beam in (1, args.beam):
        start = time.perf_counter()
        hypotheses = translate(model, tokenizer, sources, beam=beam)
        row(f"{args.run.name}, " + ("greedy" if beam == 1 else f"beam {beam}"), hypotheses,
            time.perf_counter() - start)
    if args.reference:
        start = time.perf_counter()
        hypotheses = prompted(args.reference, sources, *args.languages.split(","))
        row(f"{args.reference}, prompted, greedy", hypotheses, time.perf_counter() - start)
    print(f"sacrebleu: {bleu.get_signature()}; {chrf.get_signature()}")


if __name__ == "__main__":
    main()
