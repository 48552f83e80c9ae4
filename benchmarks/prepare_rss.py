"""Benchmark ``lmforge.data.prepare`` on a large synthetic corpus: wall time, throughput, peak RSS.

The corpus (default 512 MB) is built once from Tiny Shakespeare and cached: half of it as plain
text files (one document each, read in blocks), half as JSONL files (one short document per
line). Every 64 KB slice starts at a random offset and gets a random case transform and a
numbered header, so the text is not a literal repetition. A BPE tokenizer is trained on Tiny
Shakespeare first (quick), then ``prepare`` runs in a fresh subprocess, so its peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is measured alone. Peak RSS should stay far below
the corpus size: that is what shows the pipeline streams.

    python benchmarks/prepare_rss.py [--size-mb 512] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from corpora import tiny_shakespeare

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("~/.cache/lmforge/bench").expanduser()
FILE_MB = 16  # size of each generated file
SLICE_CHARS = 64 * 1024
DOC_CHARS = (200, 4000)  # JSONL document lengths
TRANSFORMS = (str, str.upper, str.lower, str.swapcase, str.title)
CORPUS_VERSION = 1  # bump when the generator changes, so old caches are not reused


def main() -> None:
    args = parse_args()
    if args.run_prepare:
        run_prepare(args.run_prepare, progress=not args.quiet)
        return
    source = Path(args.data) if args.data else tiny_shakespeare()
    if not source.is_file():
        sys.exit(f"{source} not found: pass --data PATH to tinyshakespeare.txt")
    cache = Path(args.cache_dir).expanduser()
    corpus = ensure_corpus(cache, source, args.size_mb)
    tokenizer = ensure_tokenizer(cache, source, args.vocab_size)
    out = cache / "prepared"
    shutil.rmtree(out, ignore_errors=True)  # measure a full run, not the "already prepared" path
    config = {
        "inputs": [str(corpus)],
        "out_dir": str(out),
        "tokenizer": str(tokenizer),
        "workers": args.workers,
    }
    wall, cpu, peak_rss = measure_child(config, progress=not args.quiet)
    meta = json.loads((out / "meta.json").read_text())
    print_table(corpus, meta, wall, cpu, peak_rss, args.workers)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512, help="corpus size (default 512)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="corpus + output cache")
    parser.add_argument("--data", help="tinyshakespeare.txt (default: data/, see corpora.py)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--workers", type=int, default=0, help="PrepareConfig.workers")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--run-prepare", metavar="JSON", help=argparse.SUPPRESS)  # child mode
    return parser.parse_args()


def ensure_corpus(cache: Path, source: Path, size_mb: int) -> Path:
    """Build the synthetic corpus unless a complete one of this size is cached."""
    corpus = cache / f"corpus-v{CORPUS_VERSION}-{size_mb}mb"
    done = corpus / ".complete"  # hidden: prepare skips it
    if done.exists():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    text = source.read_text(encoding="utf-8")
    rng = random.Random(0)
    n_files = max(2, size_mb // FILE_MB)
    file_bytes = size_mb * 2**20 // n_files
    print(f"generating {n_files} files of {file_bytes / 2**20:.0f} MB in {corpus} ...", flush=True)
    for i in range(n_files):
        if i % 2 == 0:
            (corpus / f"part{i:04d}.txt").write_text(
                "".join(text_blocks(text, rng, file_bytes)), encoding="utf-8"
            )
        else:
            write_jsonl(corpus / f"part{i:04d}.jsonl", text, rng, file_bytes)
    done.touch()
    return corpus


def text_blocks(text: str, rng: random.Random, total: int):
    """Varied slices of ``text`` adding up to about ``total`` characters (ASCII: = bytes)."""
    written = 0
    while written < total:
        start = rng.randrange(len(text) - SLICE_CHARS)
        block = rng.choice(TRANSFORMS)(text[start : start + SLICE_CHARS])
        block = f"== Scene {rng.randrange(10**6)} ==\n{block}\n"
        written += len(block)
        yield block


def write_jsonl(path: Path, text: str, rng: random.Random, total: int) -> None:
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < total:
            length = rng.randint(*DOC_CHARS)
            start = rng.randrange(len(text) - length)
            doc = rng.choice(TRANSFORMS)(text[start : start + length])
            line = json.dumps({"id": written, "text": doc}) + "\n"
            f.write(line)
            written += len(line)


def ensure_tokenizer(cache: Path, source: Path, vocab_size: int) -> Path:
    """Train (once) a BPE tokenizer on Tiny Shakespeare, in this process (not measured)."""
    path = cache / f"tokenizer-bpe-{vocab_size}" / "tokenizer.json"
    if not path.exists():
        sys.path.insert(0, str(REPO))
        from lmforge.tokenizer import train_bpe

        text = source.read_text(encoding="utf-8")
        train_bpe([text], vocab_size=vocab_size).save(path)
    return path


def measure_child(config: dict, progress: bool) -> tuple[float, float, int]:
    """Run prepare in a subprocess; return wall seconds, CPU seconds and peak RSS in bytes."""
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    command = [sys.executable, __file__, "--run-prepare", json.dumps(config)]
    if not progress:
        command.append("--quiet")
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is in kilobytes on Linux but in bytes on macOS.
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return wall, usage.ru_utime + usage.ru_stime, peak


def run_prepare(config_json: str, progress: bool) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(**json.loads(config_json)), progress=progress)


def print_table(corpus: Path, meta: dict, wall: float, cpu: float, peak: int, workers: int) -> None:
    files = [p for p in corpus.iterdir() if not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    splits = meta["splits"]
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    docs = splits["train"]["documents"] + splits["val"]["documents"]
    mb = 2**20
    rows = [
        ("corpus", f"{size / mb:,.0f} MB in {len(files)} files ({docs:,} documents)"),
        ("tokenizer", f"BPE, vocab {meta['vocab_size']:,} ({meta['dtype']})"),
        ("cores / workers", f"{os.cpu_count()} / {workers}"),
        ("wall time", f"{wall:,.1f} s"),
        ("child CPU time", f"{cpu:,.1f} s"),
        ("throughput", f"{size / mb / wall:,.2f} MB/s, {tokens / wall / 1e6:,.2f} M tokens/s"),
        ("tokens", f"{tokens:,} (train {splits['train']['tokens']:,}, "
                   f"val {splits['val']['tokens']:,})"),
        ("peak RSS", f"{peak / mb:,.0f} MB ({peak / size:.1%} of the corpus)"),
    ]
    print("\n| metric | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
