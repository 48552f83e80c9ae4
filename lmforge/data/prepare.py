"""Turn a text corpus into token shards for pretraining.

``prepare`` writes into ``out_dir``:

- ``tokenizer.json``: the tokenizer the ids belong to;
- ``train.bin``, ``val.bin``: flat arrays of token ids, read them with
  ``np.memmap(path, dtype=meta["dtype"], mode="r")``;
- ``meta.json``: dtype, vocab size, tokenizer fingerprint, per-split token/document/byte counts
  (bytes = UTF-8 bytes of the split's text, for bits-per-byte), ``eos_id`` and ``source_hash``.

Documents: a text file is one document; each JSONL line and each parquet row is one document.
With a BPE tokenizer every document is followed by ``<|endoftext|>``; the char tokenizer has no
special tokens, so documents are simply concatenated, exactly like nanoGPT.

Validation documents are drawn deterministically from ``seed``. A corpus of a single document is
split by characters instead: the first ``1 - val_fraction`` is train, the tail is validation, as
nanoGPT does for Tiny Shakespeare (``data[:int(n * 0.9)]``). A trained BPE tokenizer only sees the
train split; a char vocabulary covers all text so that validation text is always encodable.

Everything streams: documents are read in pieces (large text files in blocks cut at word ends,
where cutting cannot change the ids), encoded in batches by tokenizers' thread pool on a
background thread while the next batch is read, and appended to the ``.bin`` files. Results go to
a temporary folder first, and ``meta.json`` lands last, so an interrupted run never leaves a
folder that looks prepared; the next run into the same folder removes a killed run's temporary
folder. A re-run with the same inputs and settings returns immediately.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from lmforge.errors import ConfigError, DataError
from lmforge.files import disk_full_reported, read_json_object
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer, last_word_end, train_bpe, train_char

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TRAINED_TOKENIZERS = ("bpe", "char")

_FOLDER_SUFFIXES = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_READ_CHARS = 1 << 20  # text-file block; a block is cut at its last word end
# Text per encode_batch call: 64 pieces of 16K characters keep many cores busy, while the
# ~100 bytes per token that tokenizers holds during encoding stay around 50 MB.
_BATCH_CHARS = 1 << 20
_HASH_BLOCK = 8 << 20
_WRITE_BUFFER = 8 << 20
_PARQUET_BATCH_ROWS = 1024


@dataclass
class PrepareConfig:
    """What to prepare. ``inputs`` are files and/or folders (searched recursively for .txt, .md,
    .jsonl and .parquet; a file named explicitly with another suffix is read as text)."""

    inputs: list[str]
    out_dir: str
    # "bpe" (train one), "char" (train one), or a path to a tokenizer.json / a folder with one.
    tokenizer: str = "bpe"
    vocab_size: int = 8192  # for training BPE
    text_field: str = "text"  # JSONL field / parquet column holding the text
    val_fraction: float = 0.1  # by documents; a single document is split at its tail
    seed: int = 1337  # which documents go to validation
    # Threads for tokenizers: 0 = all cores, 1 = none. Other counts size tokenizers' thread
    # pool, which is only possible before it first runs in this process (true for the CLI).
    workers: int = 0
    byte_fallback: bool = True  # for char


@dataclass(frozen=True)
class Source:
    """One input file and how to read it: "text", "jsonl" or "parquet"."""

    path: Path
    kind: str


@dataclass(frozen=True)
class _Piece:
    """Consecutive text of one document."""

    text: str
    doc_end: bool  # last piece of its document: the separator follows it
    raw_bytes: int  # input-file bytes it stands for, for the progress bar


@dataclass
class _SplitWriter:
    """Appends token ids to one split's .bin file and counts what went in."""

    file: BinaryIO
    dtype: np.dtype
    eos_id: int | None
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    _at_doc_start: bool = True

    def write(self, piece: _Piece, ids: np.ndarray) -> None:
        self.file.write(ids.tobytes())
        self.tokens += len(ids)
        if piece.doc_end and self.eos_id is not None:
            self.file.write(np.array([self.eos_id], dtype=self.dtype).tobytes())
            self.tokens += 1
        self.bytes += _utf8_len(piece.text)
        self.documents += self._at_doc_start
        self._at_doc_start = piece.doc_end

    def stats(self) -> dict[str, int]:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def prepare(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Tokenize ``cfg.inputs`` into ``cfg.out_dir`` (see the module docstring) and return it.

    Idempotent: if ``out_dir`` already holds data prepared from the same file contents and
    settings, nothing is done.
    """
    _check_config(cfg)
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; choose a folder for the prepared data")
    _remove_dead_stages(out)
    sources = find_sources(cfg.inputs)
    given = None if cfg.tokenizer in TRAINED_TOKENIZERS else _load_given_tokenizer(cfg.tokenizer)
    settings = _settings(cfg, given)
    digest = source_hash(sources, settings, progress)
    if _already_prepared(out, digest):
        print(f"already prepared: {out}")
        return out
    advice = "free some space, or choose an out_dir (--out) on another disk, then run it again"
    with (
        _tokenizer_threads(cfg.workers),
        _staging_dir(out) as stage,
        disk_full_reported(out.parent, f"prepared data for {out.name}", advice),
    ):
        _prepare_into(stage, cfg, sources, given, settings, digest, progress)
        _publish(stage, out)
    return out


def load_meta(out_dir: str | Path) -> dict:
    """Read ``meta.json`` of a prepared folder."""
    path = Path(out_dir).expanduser() / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out_dir} is not prepared data; run prepare() "
            "(lmforge prepare) on your corpus first"
        )
    meta = read_json_object(path)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {meta['format_version']}, newer than this lmforge "
            f"understands ({FORMAT_VERSION}); upgrade lmforge or prepare the data again"
        )
    return meta


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype for the token ids: uint16 when vocab_size <= 65535, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def find_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """Expand files and folders into the input files, in order (folders sorted by path)."""
    if not inputs:
        raise ConfigError("no inputs given: pass text, JSONL or parquet files, or folders of them")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            sources += [Source(p, _FOLDER_SUFFIXES[p.suffix.lower()]) for p in _folder_files(path)]
        elif path.is_file():
            sources.append(Source(path, _FOLDER_SUFFIXES.get(path.suffix.lower(), "text")))
        else:
            raise FileNotFoundError(f"input {str(item)!r} does not exist (expected a file or folder)")
    if not sources:
        raise DataError(
            f"no documents found in {[str(i) for i in inputs]}: folders are searched for "
            f"{', '.join(_FOLDER_SUFFIXES)} files"
        )
    for source in sources:
        _check_readable(source.path)
    return sources


def source_hash(sources: Sequence[Source], settings: dict, progress: bool = False) -> str:
    """sha256 over the settings and the bytes of every input file, in order."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    with _bar("hashing", _total_bytes(sources), progress) as bar:
        for source in sources:
            digest.update(f"\0{source.kind}\0{source.path.stat().st_size}\0".encode())
            with open(source.path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def count_documents(source: Source) -> int:
    """Documents in one input file (non-blank lines of a JSONL file)."""
    if source.kind == "text":
        return 1
    if source.kind == "parquet":
        return _parquet_file(source.path).metadata.num_rows
    with open(source.path, "rb") as f:
        return sum(1 for line in f if line.strip())


def validation_documents(n_docs: int, val_fraction: float, seed: int) -> Iterator[bool]:
    """For each of ``n_docs`` documents in order, whether it goes to validation.

    Exactly ``round(n_docs * val_fraction)`` are chosen (at least one, and never all, when
    ``val_fraction > 0``), uniformly at random from ``seed``, in one pass without storing the
    choice (selection sampling), so it scales to any number of documents.
    """
    n_val = 0 if val_fraction == 0 else min(max(round(n_docs * val_fraction), 1), n_docs - 1)
    rng = random.Random(seed)
    for i in range(n_docs):
        chosen = rng.random() * (n_docs - i) < n_val
        n_val -= chosen
        yield bool(chosen)


def _check_config(cfg: PrepareConfig) -> None:
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction={cfg.val_fraction} must be in [0, 1), e.g. 0.1")
    if cfg.workers < 0:
        raise ConfigError(f"workers={cfg.workers} must be >= 0 (0 = all cores)")


def _check_readable(path: Path) -> None:
    """Name an input this user may not read now, before minutes of hashing and tokenizing."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"cannot read input {path}: {err.strerror}; check its permissions, or "
                        "leave it out") from err


def _load_given_tokenizer(spec: str) -> Tokenizer:
    if not Path(spec).expanduser().exists():
        raise FileNotFoundError(
            f"tokenizer={spec!r} is neither 'bpe' nor 'char' (train one) nor an existing "
            "tokenizer.json or folder containing one"
        )
    return Tokenizer.load(spec)


def _settings(cfg: PrepareConfig, given: Tokenizer | None) -> dict:
    """The configuration that determines the output (also hashed into source_hash)."""
    settings: dict = {
        "format_version": FORMAT_VERSION,
        "tokenizer": cfg.tokenizer if given is None else given.fingerprint(),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    if cfg.tokenizer == "bpe":
        settings["vocab_size"] = cfg.vocab_size
    if cfg.tokenizer == "char":
        settings["byte_fallback"] = cfg.byte_fallback
    return settings


def _already_prepared(out: Path, digest: str) -> bool:
    try:
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files_there = all((out / name).is_file() for name in (TOKENIZER_FILE, "train.bin", "val.bin"))
    return meta.get("source_hash") == digest and files_there


def _prepare_into(
    stage: Path,
    cfg: PrepareConfig,
    sources: list[Source],
    given: Tokenizer | None,
    settings: dict,
    digest: str,
    progress: bool,
) -> None:
    items = _split_plan(cfg, sources)
    total = _total_bytes(sources)
    tok = given or _train_tokenizer(cfg, items, total, progress)
    tok.save(stage)
    dtype = token_dtype(tok.vocab_size)
    splits = _write_splits(stage, items(), tok, dtype, _bar("tokenizing", total, progress))
    if splits["train"]["bytes"] == 0:
        raise DataError(_no_text_message(cfg, splits["val"]["bytes"]))
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": tok.fingerprint(),
        "source_hash": digest,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "splits": splits,
        "inputs": [str(s.path) for s in sources],
        "settings": settings,
    }
    (stage / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _split_plan(
    cfg: PrepareConfig, sources: list[Source]
) -> Callable[[], Iterator[tuple[str, _Piece]]]:
    """A function that streams the corpus as (split, piece), the same way every call (the
    tokenizer is trained on one pass, the ids come from another)."""
    n_docs = sum(count_documents(s) for s in sources)
    if n_docs == 0:
        raise DataError(f"no documents found in {cfg.inputs}: the JSONL/parquet files are empty")
    if n_docs == 1:
        n_chars = sum(len(p.text) for p in _read_all(sources, cfg.text_field))
        cut = int(n_chars * (1 - cfg.val_fraction))
        return lambda: _split_tail(_read_all(sources, cfg.text_field), cut)
    return lambda: _split_documents(
        _read_all(sources, cfg.text_field),
        validation_documents(n_docs, cfg.val_fraction, cfg.seed),
    )


def _write_splits(
    stage: Path,
    items: Iterable[tuple[str, _Piece]],
    tok: Tokenizer,
    dtype: np.dtype,
    bar: tqdm,
) -> dict[str, dict[str, int]]:
    """Encode the items into ``train.bin`` and ``val.bin``; return each split's counts."""
    with (
        open(stage / "train.bin", "wb", buffering=_WRITE_BUFFER) as train_file,
        open(stage / "val.bin", "wb", buffering=_WRITE_BUFFER) as val_file,
        bar,
    ):
        writers = {
            "train": _SplitWriter(train_file, dtype, tok.eos_id),
            "val": _SplitWriter(val_file, dtype, tok.eos_id),
        }
        for split, piece, ids in _encode_all(items, tok, dtype):
            writers[split].write(piece, ids)
            bar.update(piece.raw_bytes)
    return {name: writer.stats() for name, writer in writers.items()}


def _no_text_message(cfg: PrepareConfig, val_bytes: int) -> str:
    if val_bytes == 0:
        return f"the corpus is empty: the documents in {cfg.inputs} contain no text"
    return (
        f"no training text: val_fraction={cfg.val_fraction} leaves nothing for training; "
        "lower it or add text"
    )


def _train_tokenizer(
    cfg: PrepareConfig,
    items: Callable[[], Iterator[tuple[str, _Piece]]],
    total: int,
    progress: bool,
) -> Tokenizer:
    with _bar(f"training {cfg.tokenizer} tokenizer", total, progress) as bar:

        def texts(split: str | None) -> Iterator[str]:
            for piece_split, piece in items():
                bar.update(piece.raw_bytes)
                if split is None or piece_split == split:
                    yield piece.text

        if cfg.tokenizer == "bpe":
            return train_bpe(texts("train"), vocab_size=cfg.vocab_size)
        alphabet: set[str] = set()
        for text in texts(None):
            alphabet.update(text)
    if not alphabet:
        raise DataError(_no_text_message(cfg, 0))
    return train_char("".join(sorted(alphabet)), byte_fallback=cfg.byte_fallback)


def _read_all(sources: Iterable[Source], text_field: str) -> Iterator[_Piece]:
    for source in sources:
        if source.kind == "text":
            yield from _read_text(source.path)
        elif source.kind == "jsonl":
            yield from _read_jsonl(source.path, text_field)
        else:
            yield from _read_parquet(source.path, text_field)


def _read_text(path: Path) -> Iterator[_Piece]:
    """The file as one document, in blocks of about ``_READ_CHARS`` cut at word ends."""
    carry = ""
    # newline="": keep "\r\n" as is, so the text (and its byte count) is exactly the file's.
    with open(path, encoding="utf-8", newline="") as f:
        try:
            while block := f.read(_READ_CHARS):
                text = carry + block
                # Text with no word end at all stays in `carry` until one comes.
                cut = last_word_end(text)
                if cut > 0:
                    head, carry = text[:cut], text[cut:]
                    yield _Piece(head, False, _utf8_len(head))
                else:
                    carry = text
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path} is not UTF-8 text ({err.reason}); convert it first, e.g. "
                f"`iconv -f latin1 -t utf-8 {path.name}`"
            ) from err
    yield _Piece(carry, True, _utf8_len(carry))


def _read_jsonl(path: Path, text_field: str) -> Iterator[_Piece]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{where}: not a JSON line ({err}); fix or remove it") from err
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise DataError(
                    f"{where}: no {text_field!r} field; available fields: "
                    f"{', '.join(map(repr, record)) or 'none'}. Set text_field=... "
                    "(--text-field) to the field that holds the text"
                )
            yield _Piece(_as_text(record[text_field], where, text_field), True, len(line))


def _read_parquet(path: Path, text_field: str) -> Iterator[_Piece]:
    parquet = _parquet_file(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no {text_field!r} column; available columns: "
            f"{', '.join(map(repr, columns))}. Set text_field=... (--text-field) to the column "
            "that holds the text"
        )
    size, n_rows, row = path.stat().st_size, parquet.metadata.num_rows, 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            # The progress bar counts file bytes; spread them evenly over the rows.
            raw = size * (row + 1) // n_rows - size * row // n_rows
            yield _Piece(_as_text(value, f"{path}: row {row}", text_field), True, raw)
            row += 1


def _parquet_file(path: Path):
    import pyarrow as pa  # only needed for parquet input
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise DataError(f"{path} is not a readable parquet file ({err}); export it again, or "
                        "pass text or JSONL instead") from err


def _as_text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {text_field!r} is {type(value).__name__}, expected a string; set "
            "text_field=... to a text field or drop such records"
        )
    return value


def _split_documents(
    pieces: Iterable[_Piece], is_val: Iterator[bool]
) -> Iterator[tuple[str, _Piece]]:
    """Send each document, with all its pieces, to the split ``is_val`` picks for it."""
    split = None
    for piece in pieces:
        if split is None:
            split = "val" if next(is_val) else "train"
        yield split, piece
        if piece.doc_end:
            split = None


def _split_tail(pieces: Iterable[_Piece], cut: int) -> Iterator[tuple[str, _Piece]]:
    """Characters before ``cut`` go to train, the rest to val (a single-document corpus)."""
    pos = 0
    for piece in pieces:
        end = pos + len(piece.text)
        if end <= cut:
            yield "train", piece
        elif pos >= cut:
            yield "val", piece
        else:
            head, tail = piece.text[: cut - pos], piece.text[cut - pos :]
            head_bytes = _utf8_len(head)
            yield "train", _Piece(head, False, head_bytes)
            yield "val", _Piece(tail, piece.doc_end, piece.raw_bytes - head_bytes)
        pos = end


def _encode_all(
    items: Iterable[tuple[str, _Piece]], tok: Tokenizer, dtype: np.dtype
) -> Iterator[tuple[str, _Piece, np.ndarray]]:
    """Encode items in batches on a background thread, one batch ahead of the caller, so that
    reading and writing overlap with tokenizing (which releases the GIL). At most three batches
    are alive: one being written, one being encoded, one being read."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[list[tuple[str, _Piece]], Future] | None = None
        for batch in _batches(items, _BATCH_CHARS):
            future = pool.submit(_encode_to_arrays, tok, [piece.text for _, piece in batch], dtype)
            if pending is not None:
                yield from _with_ids(*pending)
            pending = (batch, future)
        if pending is not None:
            yield from _with_ids(*pending)


def _encode_to_arrays(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    # Converting on the worker thread means waiting results take 2-4 bytes per token rather than
    # the ~40 of a Python list of ints.
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)]


def _with_ids(
    batch: list[tuple[str, _Piece]], future: Future
) -> Iterator[tuple[str, _Piece, np.ndarray]]:
    for (split, piece), ids in zip(batch, future.result()):
        yield split, piece, ids


def _batches(
    items: Iterable[tuple[str, _Piece]], max_chars: int
) -> Iterator[list[tuple[str, _Piece]]]:
    batch: list[tuple[str, _Piece]] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item[1].text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@contextmanager
def _tokenizer_threads(workers: int) -> Iterator[None]:
    """Apply ``workers`` to tokenizers for the duration. TOKENIZERS_PARALLELISM is read on every
    call; RAYON_NUM_THREADS only when tokenizers first starts its thread pool."""
    changes = {}
    if workers == 1:
        changes["TOKENIZERS_PARALLELISM"] = "false"
    elif workers > 1:
        changes["RAYON_NUM_THREADS"] = str(workers)
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out`` (same file system, so renames are atomic), removed on
    exit whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to `out` after the rename; mkdir honours
    # the umask like any other folder.
    stage = out.parent / f"{_stage_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _stage_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _remove_dead_stages(out: Path) -> None:
    """Remove the staging folders of runs into ``out`` that were killed (their process is
    gone), which nothing else would ever clean up."""
    for stage in out.parent.glob(f"{_stage_prefix(out)}*"):
        pid = stage.name.removeprefix(_stage_prefix(out)).split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            print(f"removing {stage}, left by an interrupted run")
            shutil.rmtree(stage, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to someone else
    return True


def _publish(stage: Path, out: Path) -> None:
    """Move the finished files into ``out``; ``meta.json`` is what marks it complete."""
    if not out.exists():
        stage.rename(out)
        return
    # An existing folder may hold other files (e.g. the corpus itself), so replace only ours,
    # old meta.json first: until the new one lands the folder does not look prepared.
    (out / META_FILE).unlink(missing_ok=True)
    for name in (TOKENIZER_FILE, "train.bin", "val.bin", META_FILE):
        os.replace(stage / name, out / name)


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in _FOLDER_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _total_bytes(sources: Iterable[Source]) -> int:
    return sum(s.path.stat().st_size for s in sources)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _bar(desc: str, total: int, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    )
