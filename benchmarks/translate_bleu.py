"""Test-split BLEU, chrF (sacrebleu) and exact match of a seq2seq run, greedy against beam
search.

    python benchmarks/translate_bleu.py runs/en-fr [--beam 4]

The test pairs are the run's own: its recipe.yaml names the data, split fractions and seed,
and the split is made again exactly as training made it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import sacrebleu
import yaml

from lmforge.data.parallel import read_pairs, split_pairs
from lmforge.infer.seq2seq import translate
from lmforge.modeldir import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a seq2seq run directory")
    parser.add_argument("--beam", type=int, default=4)
    args = parser.parse_args()
    recipe = yaml.safe_load((args.run / "recipe.yaml").read_text())
    pairs, _ = read_pairs(recipe["data"], recipe["source_field"], recipe["target_field"],
                          recipe["bad_lines"])
    _, _, test = split_pairs(pairs, recipe["val_fraction"], recipe["test_fraction"],
                             recipe["seed"])
    if not test:
        raise SystemExit(f"{args.run} was trained without a test split (test_fraction=0)")
    model, tokenizer = load_model(args.run)
    sources, references = [s for s, _ in test], [[t for _, t in test]]
    print(f"{len(test)} test pairs from {recipe['data']}")
    print("| decoding | BLEU | chrF | exact match | seconds |")
    print("|---|---:|---:|---:|---:|")
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    for beam in (1, args.beam):
        start = time.perf_counter()
        hypotheses = translate(model, tokenizer, sources, beam=beam)
        seconds = time.perf_counter() - start
        name = "greedy" if beam == 1 else f"beam {beam}"
        exact = sum(h == r for h, r in zip(hypotheses, references[0])) / len(hypotheses)
        print(f"| {name} | {bleu.corpus_score(hypotheses, references).score:.1f} | "
              f"{chrf.corpus_score(hypotheses, references).score:.1f} | {exact:.1%} | "
              f"{seconds:.1f} |")
    print(f"sacrebleu: {bleu.get_signature()}; {chrf.get_signature()}")


if __name__ == "__main__":
    main()
