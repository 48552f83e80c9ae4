"""Score a model's answers on the vision tasks, per task.

    from score import score
    score(predictions, records)  # records: the JSONL lines, predictions: the model's replies

Every task is scored by exact match after trimming: surrounding white space and a final full
stop are dropped and case is ignored, so "Red." counts for "red" but "a red one" does not. A
reply that reasons first ("first blue, second red: second") answers with what follows its
last colon; no answer of these tasks holds one.
The ocr task also reports its character error rate ("ocr_cer"): the edit distance between
the answer and the gold string, summed over examples, over the gold strings' total length.
"""

from __future__ import annotations

from collections import defaultdict


def normalise(text: str) -> str:
    return text.rpartition(":")[2].strip().removesuffix(".").strip().casefold()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def score(predictions: list[str], records: list[dict]) -> dict[str, float]:
    """Accuracy per task (in the order the tasks first appear), and "ocr_cer" if there is ocr."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records: "
                         "give one prediction per record, in the same order")
    right: dict[str, list[bool]] = defaultdict(list)
    edits = chars = 0
    for prediction, record in zip(predictions, records):
        guess, gold = normalise(prediction), normalise(record["answer"])
        right[record["task"]].append(guess == gold)
        if record["task"] == "ocr":
            edits += edit_distance(guess, gold)
            chars += len(gold)
    result = {task: sum(hits) / len(hits) for task, hits in right.items()}
    if "ocr" in right:
        result["ocr_cer"] = edits / chars
    return result
