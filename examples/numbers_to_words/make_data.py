"""A synthetic seq2seq task: numbers written in digits -> the same numbers in English words.

    python examples/numbers_to_words/make_data.py --out data/numbers.tsv [--pairs 50000] [--seed 0]

Writes TSV lines `4071<TAB>four thousand seventy-one` for distinct random numbers from 0 to
999,999 (seeded). Train with `lmforge train configs/numbers-to-words.yaml` and score exact
match on the test split with `python benchmarks/translate_bleu.py runs/numbers`.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{ONES[n // 100]} hundred")
        n %= 100
        if n == 0:
            return words[0]
    if n < 20:
        words.append(ONES[n])
    else:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    return " ".join(words)


def in_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000, without "and" (American style)."""
    if n < 1000:
        return below_thousand(n)
    thousands, rest = divmod(n, 1000)
    return f"{below_thousand(thousands)} thousand" + (f" {below_thousand(rest)}" if rest else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    numbers = random.Random(args.seed).sample(range(1_000_000), args.pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(f"{n}\t{in_words(n)}\n" for n in numbers), encoding="utf-8")
    print(f"wrote {args.pairs} pairs to {args.out}")


if __name__ == "__main__":
    main()
