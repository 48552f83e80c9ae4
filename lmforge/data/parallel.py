"""Parallel corpora for sequence-to-sequence tasks: (source, target) pairs from TSV or JSONL.

TSV: one pair per line, source and target in the first two tab-separated columns (later
columns, such as attributions, are ignored). JSONL: one object per line with the source and
target in configurable fields. A line without a tab, or with an empty side, is named with its
line number: it stops the run (`bad_lines="fail"`) or is skipped and counted ("skip").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import ConfigError


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target",
               bad_lines: str = "fail") -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs of a TSV or JSONL file, and a message for each skipped line."""
    if bad_lines not in ("fail", "skip"):
        raise ConfigError(f"bad_lines={bad_lines!r} is not one of fail, skip")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}; set data=PATH (each recipe in "
                                "configs/ says at its top where to get its data)")
    pairs, skipped = [], []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            pair, problem = (_json_pair(line, source_field, target_field) if jsonl
                             else _tsv_pair(line))
            if problem is None:
                pairs.append(pair)
                continue
            message = f"{path}:{number}: {problem}"
            if bad_lines == "fail":
                raise ConfigError(message + " (bad_lines=skip skips such lines)")
            skipped.append(message)
    if not pairs:
        raise ConfigError(f"{path} holds no (source, target) pairs")
    return pairs, skipped


def _tsv_pair(line: str) -> tuple[tuple[str, str] | None, str | None]:
    columns = line.rstrip("\n\r").split("\t")
    if len(columns) < 2:
        return None, "no tab between source and target"
    source, target = columns[0].strip(), columns[1].strip()
    if not source or not target:
        return None, f"empty {'source' if not source else 'target'}"
    return (source, target), None


def _json_pair(line: str, source_field: str, target_field: str):
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg})"
    if not isinstance(value, dict):
        return None, "expected a JSON object"
    for field in (source_field, target_field):
        if not isinstance(value.get(field), str) or not value[field].strip():
            return None, f"no text in field {field!r}"
    return (value[source_field].strip(), value[target_field].strip()), None


def split_pairs(pairs: list, val_fraction: float, test_fraction: float, seed: int
                ) -> tuple[list, list, list]:
    """Train / validation / test pairs: a seeded shuffle, validation and test sizes rounded.

    Pairs that share a source sentence stay together in one split (corpora such as Tatoeba
    hold several translations of one sentence): otherwise the test set would score sources
    the model was trained on. With distinct sources this is a plain shuffle and cut.
    """
    groups: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(pairs):
        groups.setdefault(source, []).append(i)
    members = list(groups.values())
    n_val, n_test = round(len(pairs) * val_fraction), round(len(pairs) * test_fraction)
    train, val, test = [], [], []
    for g in np.random.default_rng(seed).permutation(len(members)):
        group = [pairs[i] for i in members[g]]
        if len(val) + len(group) <= n_val:
            val += group
        elif len(test) + len(group) <= n_test:
            test += group
        else:
            train += group
    return train, val, test
