"""Reading evaluation data: a text file, or JSONL examples checked line by line.

Every problem is reported with the file and line it is on, and what to change, so a
half-written data set fails in the first second instead of after an hour of scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError


class EvalDataError(LmforgeError, ValueError):
    """An evaluation file that cannot be read as the task expects."""


@dataclass
class ChoiceExample:
    """A multiple-choice question: the model should find `choices[answer]` most likely."""

    context: str
    choices: list[str]
    answer: int
    line: int = 0  # where it came from, for messages and sample logs


@dataclass
class GenerationExample:
    """A prompt and the answer its generated text is compared with."""

    prompt: str
    answer: str
    line: int = 0
    images: tuple[Path, ...] = ()  # for a vision-language model, before the prompt


def read_text(path: str | Path, max_chars: int | None = None) -> str:
    """A UTF-8 text file, or its first `max_chars` characters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalDataError(f"{path} is not UTF-8 text (byte {err.start}): convert it, e.g. "
                            "with iconv -t UTF-8") from err
    text = text[:max_chars] if max_chars is not None else text
    if not text:
        raise EvalDataError(f"{path} is empty: there is no text to score")
    return text


def read_jsonl(path: str | Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, at most `limit`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({err.msg}, column "
                                    f"{err.colno}); each line must be one JSON object") from err
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object "
                                    f"{{...}}, got {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise EvalDataError(f"{path} has no examples: expected one JSON object per line")
    return records


def read_choice_examples(path: str | Path, context_field: str = "context",
                         choices_field: str = "choices", answer_field: str = "answer",
                         limit: int | None = None) -> list[ChoiceExample]:
    """Multiple-choice examples from JSONL. The answer is an index into the choices, or (as
    in lm-evaluation-harness) the text of the right choice."""
    examples = []
    for number, record in read_jsonl(path, limit):
        where = f"{path}:{number}"
        context = _field(record, context_field, str, where, "--context-field")
        choices = _field(record, choices_field, list, where, "--choices-field")
        if not choices or not all(isinstance(c, str) for c in choices):
            raise EvalDataError(f"{where}: '{choices_field}' must be a non-empty list of "
                                f"strings, got {choices!r}")
        answer = _field(record, answer_field, (int, str), where, "--answer-field")
        examples.append(ChoiceExample(context, choices, _answer_index(answer, choices, where),
                                      number))
    return examples


def read_generation_examples(path: str | Path, prompt_field: str = "prompt",
                             answer_field: str = "answer", limit: int | None = None
                             ) -> list[GenerationExample]:
    """Generation examples from JSONL; a numeric answer is compared as its text."""
    examples = []
    for number, record in read_jsonl(path, limit):
        where = f"{path}:{number}"
        prompt = _field(record, prompt_field, str, where, "--prompt-field")
        answer = _field(record, answer_field, (str, int, float), where, "--answer-field")
        images = _images(record, Path(path).parent, where)
        examples.append(GenerationExample(prompt, str(answer), number, images))
    return examples


def _images(record: dict, folder: Path, where: str) -> tuple[Path, ...]:
    """A record's optional "images": paths relative to its file, which must exist."""
    paths = record.get("images", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise EvalDataError(f"{where}: 'images' must be a list of image file paths")
    files = tuple(folder / p for p in paths)
    for file in files:
        if not file.is_file():
            raise EvalDataError(f"{where}: image {file} not found")
    return files


def _field(record: dict, name: str, kind, where: str, flag: str):
    if name not in record:
        present = ", ".join(record) or "no fields"
        raise EvalDataError(f"{where}: no '{name}' field (the line has {present}); name the "
                            f"field with {flag}")
    value = record[name]
    # bool is an int to Python, but `true` is never a valid index or text.
    if isinstance(value, bool) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        expected = " or ".join(_JSON_NAMES[k] for k in kinds)
        raise EvalDataError(f"{where}: '{name}' must be {expected}, got {value!r}")
    return value


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}


def _answer_index(answer: int | str, choices: list[str], where: str) -> int:
    if isinstance(answer, str):
        if answer not in choices:
            raise EvalDataError(f"{where}: the answer {answer!r} is not one of the choices "
                                f"{choices!r}; give the right choice's text or its index")
        return choices.index(answer)
    if not 0 <= answer < len(choices):
        raise EvalDataError(f"{where}: answer {answer} is out of range for {len(choices)} "
                            f"choices (0..{len(choices) - 1}); answers are 0-based indices")
    return answer
