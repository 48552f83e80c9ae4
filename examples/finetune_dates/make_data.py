"""Generate a date-normalisation task: rewrite a date written any common way as YYYY-MM-DD.

Each example is one user turn (an instruction that states the exact output format, then a
date in one of many written forms) and the assistant's answer, the ISO date alone. Every
input is unambiguous: numeric forms say which field is the day and which the month, and
two-digit years say their century. Test dates never occur in training, in any form, so a
fine-tuned model has to have learned the conversion, not memorised answers.

    python examples/finetune_dates/make_data.py --out data/dates [--train 4000] [--test 300] [--seed 0]

writes train.jsonl and test.jsonl ({"messages": [user, assistant]} per line) and
test_eval.jsonl ({"prompt", "answer"} per line) for a generation evaluator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from collections.abc import Callable
from pathlib import Path

FIRST = datetime.date(1950, 1, 1)
LAST = datetime.date(2049, 12, 31)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAY_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
             "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
             "sixteenth", "seventeenth", "eighteenth", "nineteenth", "twentieth",
             "twenty-first", "twenty-second", "twenty-third", "twenty-fourth", "twenty-fifth",
             "twenty-sixth", "twenty-seventh", "twenty-eighth", "twenty-ninth", "thirtieth",
             "thirty-first"]


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def short_month(d: datetime.date) -> str:
    # "Sept" is common in prose but "Sep" is what strftime and most software write
    return MONTHS[d.month - 1][:3]


def two_digit_year(d: datetime.date) -> str:
    """'19 plus its century, since '19 alone could be 1919 or 2019."""
    return f"'{d.year % 100:02d} (a year in the {d.year // 100}00s)"


# Each form writes one date as people do; the lambdas only rearrange the same fields.
FORMS: list[Callable[[datetime.date], str]] = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"the {DAY_WORDS[d.day - 1]} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{short_month(d)} {d.day}, {d.year}",
    lambda d: f"{d.day} {short_month(d)} {d.year}",
    lambda d: f"{d.day}-{short_month(d)}-{d.year}",
    lambda d: f"{DAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]}, {d.day} {short_month(d)} {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]}, {short_month(d)} {d.day} {two_digit_year(d)}",
    lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d: f"{d.day}/{d.month}/{d.year} (DD/MM/YYYY)",
    lambda d: f"{d.month}/{d.day}/{d.year} (MM/DD/YYYY)",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (DD.MM.YYYY)",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d} (year/month/day)",
    lambda d: f"{d.year}{d.month:02d}{d.day:02d} (YYYYMMDD)",
]

# Every instruction names the exact output format so the base model is judged fairly.
INSTRUCTIONS = [
    "Convert this date to ISO format (YYYY-MM-DD): {date}",
    "Convert this date to ISO format (YYYY-MM-DD). Reply with the date only.\n{date}",
    "Rewrite the date as YYYY-MM-DD: {date}",
    "What is {date} in YYYY-MM-DD format? Answer with the date only.",
    "Write {date} in ISO 8601 form (YYYY-MM-DD).",
    "Date: {date}\nGive it as YYYY-MM-DD, nothing else.",
    "Normalize this date to YYYY-MM-DD: {date}",
    "Please reformat the following date as YYYY-MM-DD (four-digit year, two-digit month, "
    "two-digit day): {date}",
]


def random_date(rng: random.Random) -> datetime.date:
    return FIRST + datetime.timedelta(days=rng.randrange((LAST - FIRST).days + 1))


def example(d: datetime.date, rng: random.Random) -> tuple[str, str]:
    """(user prompt, answer) for one date written in a random form and instruction."""
    text = rng.choice(FORMS)(d)
    prompt = rng.choice(INSTRUCTIONS).format(date=text)
    return prompt, d.isoformat()


def split_examples(n_train: int, n_test: int, seed: int
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train and test examples whose dates do not overlap (so neither do their prompts)."""
    rng = random.Random(seed)
    test_dates: set[datetime.date] = set()
    while len(test_dates) < n_test:
        test_dates.add(random_date(rng))
    # sorted so the test set's order does not depend on set iteration order
    test = [example(d, rng) for d in sorted(test_dates)]
    rng.shuffle(test)
    train = []
    while len(train) < n_train:
        d = random_date(rng)
        if d not in test_dates:
            train.append(example(d, rng))
    return train, test


def messages(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.test <= ((LAST - FIRST).days + 1) // 2:
        parser.error(f"--test must be between 1 and {((LAST - FIRST).days + 1) // 2}")

    train, test = split_examples(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", [messages(p, a) for p, a in train])
    write_jsonl(args.out / "test.jsonl", [messages(p, a) for p, a in test])
    write_jsonl(args.out / "test_eval.jsonl", [{"prompt": p, "answer": a} for p, a in test])
    print(f"wrote {len(train)} train and {len(test)} test examples to {args.out}")


if __name__ == "__main__":
    main()
