"""Tests for lmforge.data.prepare: corpora written to tmp_path are prepared and read back."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import prepare as prepare_module
from lmforge.data.prepare import (
    PrepareConfig,
    load_meta,
    prepare,
    token_dtype,
    validation_documents,
)
from lmforge.tokenizer import Tokenizer, train_bpe

from .cli_errors import one_line_error
from .conftest import SHAKESPEARE

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n",
    "  Leading spaces, trailing newlines\n\n\n",
    "Unicode: naïve café, 日本語, emoji 😀 and <0x41>.",
    "Short.",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?",
]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE tokenizer saved to disk, so most tests skip training."""
    tok = train_bpe(DOCS * 20, vocab_size=300)
    return tok.save(tmp_path_factory.mktemp("tok"))


def read_split(out: Path, split: str) -> np.ndarray:
    meta = load_meta(out)
    return np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")


def read_docs(out: Path, split: str) -> list[str]:
    """Decode a split of a BPE-prepared folder back into its documents."""
    ids = read_split(out, split)
    eos = load_meta(out)["eos_id"]
    tok = Tokenizer.load(out)
    ends = np.flatnonzero(ids == eos)
    assert len(ends) == 0 or ends[-1] == len(ids) - 1, "every document ends with the separator"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, ends)]


def config(inputs: list, out: Path, **kwargs) -> PrepareConfig:
    return PrepareConfig(inputs=[str(i) for i in inputs], out_dir=str(out), **kwargs)


def write_text_folder(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (folder / ("sub" if i % 2 else ".") / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (folder / "notes.csv").write_text("not,a,document\n")  # unknown suffix: skipped
    (folder / ".hidden.txt").write_text("hidden files are skipped\n")


def test_text_folder_round_trip_and_meta(tmp_path: Path) -> None:
    write_text_folder(tmp_path / "corpus")
    out = prepare(config([tmp_path / "corpus"], tmp_path / "out", vocab_size=300,
                         val_fraction=0.3), progress=False)
    meta = load_meta(out)
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert sorted(train + val) == sorted(DOCS)
    assert len(val) == round(len(DOCS) * 0.3) == 2
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["tokenizer_fingerprint"] == Tokenizer.load(out).fingerprint()
    for split, docs in (("train", train), ("val", val)):
        stats = meta["splits"][split]
        assert stats["tokens"] == len(read_split(out, split))
        assert stats["documents"] == len(docs)
        assert stats["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert (out / "train.bin").stat().st_size == 2 * meta["splits"]["train"]["tokens"]
    assert not list(tmp_path.glob(".*partial*")), "no staging folder left behind"


def test_jsonl_and_parquet_documents_in_order(tmp_path: Path, bpe_file: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = tmp_path / "a.jsonl"
    rows = [json.dumps({"id": i, "content": d}) for i, d in enumerate(DOCS[:3])]
    jsonl.write_text("\n".join(rows[:2]) + "\n\n" + rows[2] + "\n", encoding="utf-8")  # blank line
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [3, 4, 5], "content": DOCS[3:]}), parquet)
    out = prepare(config([jsonl, parquet], tmp_path / "out", tokenizer=str(bpe_file),
                         text_field="content", val_fraction=0.0), progress=False)
    assert read_docs(out, "train") == DOCS
    # np.memmap refuses empty files, so loaders must check the size of an empty split.
    assert (out / "val.bin").stat().st_size == 0
    assert load_meta(out)["splits"]["train"]["documents"] == len(DOCS)
    assert load_meta(out)["tokenizer_fingerprint"] == Tokenizer.load(bpe_file).fingerprint()


def test_large_text_file_read_in_blocks_gives_same_ids(
    tmp_path: Path, shakespeare: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small blocks force ~100 cuts at word ends; ids must equal encoding the text in one go.
    monkeypatch.setattr(prepare_module, "_READ_CHARS", 2000)
    text = shakespeare
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    tok = train_bpe([text], vocab_size=1000)
    tok_file = tok.save(tmp_path / "tok")
    out = prepare(config([tmp_path / "play.txt"], tmp_path / "out", tokenizer=str(tok_file)),
                  progress=False)
    cut = int(len(text) * 0.9)
    whole = tok.backend.encode(text[:cut], add_special_tokens=False).ids
    assert read_split(out, "train").tolist() == whole
    assert read_split(out, "val").tolist() == tok.encode(text[cut:]) + [tok.eos_id]


def test_single_file_char_split_equals_nanogpt(tmp_path: Path, shakespeare: str) -> None:
    # nanoGPT data/shakespeare_char/prepare.py, verbatim in spirit:
    chars = sorted(set(shakespeare))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(shakespeare)
    train_ids = np.array([stoi[c] for c in shakespeare[: int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in shakespeare[int(n * 0.9) :]], dtype=np.uint16)
    for byte_fallback, vocab_size in ((False, len(chars)), (True, len(chars) + 256)):
        out = prepare(config([SHAKESPEARE], tmp_path / f"char-{byte_fallback}", tokenizer="char",
                             byte_fallback=byte_fallback), progress=False)
        meta = load_meta(out)
        assert meta["vocab_size"] == vocab_size and meta["eos_id"] is None
        assert np.array_equal(read_split(out, "train"), train_ids)
        assert np.array_equal(read_split(out, "val"), val_ids)
        assert meta["splits"]["val"]["bytes"] == len(shakespeare[int(n * 0.9) :].encode())


def test_dtype_choice() -> None:
    assert token_dtype(65) == np.uint16
    assert token_dtype(50_257) == np.uint16
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_validation_documents_exact_and_deterministic() -> None:
    picks = list(validation_documents(1000, 0.1, seed=1337))
    assert sum(picks) == 100
    assert picks == list(validation_documents(1000, 0.1, seed=1337))
    assert picks != list(validation_documents(1000, 0.1, seed=1))
    assert sum(validation_documents(3, 0.1, seed=0)) == 1  # at least one val document
    assert sum(validation_documents(2, 0.9, seed=0)) == 1  # never all of them
    assert not any(validation_documents(10, 0.0, seed=0))


def test_split_by_documents_is_deterministic(tmp_path: Path, bpe_file: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}: {d}"}) + "\n"
                              for i, d in enumerate(DOCS * 5)), encoding="utf-8")
    outs = [
        prepare(config([corpus], tmp_path / name, tokenizer=str(bpe_file), seed=seed),
                progress=False)
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    val = [read_docs(out, "val") for out in outs]
    assert len(val[0]) == 3
    assert val[0] == val[1] != val[2]
    assert (outs[0] / "train.bin").read_bytes() == (outs[1] / "train.bin").read_bytes()


def test_rerun_is_a_noop_and_changes_reprepare(
    tmp_path: Path, bpe_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_text_folder(tmp_path / "corpus")
    cfg = config([tmp_path / "corpus"], tmp_path / "out", tokenizer=str(bpe_file))
    meta_file = prepare(cfg, progress=False) / "meta.json"
    first = load_meta(tmp_path / "out")
    os.utime(meta_file, (0, 0))  # so a rewrite would show even within the clock's resolution
    capsys.readouterr()
    prepare(cfg, progress=False)
    assert "already prepared" in capsys.readouterr().out
    assert meta_file.stat().st_mtime == 0

    (tmp_path / "corpus" / "doc0.txt").write_text("Changed text.\n", encoding="utf-8")
    prepare(cfg, progress=False)
    changed = load_meta(tmp_path / "out")
    assert changed["source_hash"] != first["source_hash"]
    assert "Changed text.\n" in read_docs(tmp_path / "out", "train") + read_docs(
        tmp_path / "out", "val")

    cfg.val_fraction = 0.5  # settings are part of the hash too
    prepare(cfg, progress=False)
    assert load_meta(tmp_path / "out")["source_hash"] != changed["source_hash"]


def test_failed_run_leaves_previous_output_intact(tmp_path: Path, bpe_file: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "good"}\n{"text": "also good"}\n', encoding="utf-8")
    out = prepare(config([corpus], tmp_path / "out", tokenizer=str(bpe_file)), progress=False)
    before = load_meta(out)
    corpus.write_text('{"text": "good"}\n{"text": "fine"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError):
        prepare(config([corpus], out, tokenizer=str(bpe_file)), progress=False)
    assert load_meta(out) == before
    with pytest.raises(ValueError):
        prepare(config([corpus], tmp_path / "new", tokenizer=str(bpe_file)), progress=False)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_out_dir_may_hold_other_files(tmp_path: Path, bpe_file: Path) -> None:
    # nanoGPT layout: the prepared files land next to the corpus, which must survive.
    corpus = tmp_path / "data" / "input.txt"
    corpus.parent.mkdir()
    corpus.write_text(DOCS[0] * 50, encoding="utf-8")
    cfg = config([corpus], corpus.parent, tokenizer=str(bpe_file))
    prepare(cfg, progress=False)
    corpus.write_text(DOCS[1] * 50, encoding="utf-8")
    prepare(cfg, progress=False)
    assert corpus.read_text(encoding="utf-8") == DOCS[1] * 50
    assert sorted(p.name for p in corpus.parent.iterdir()) == [
        "input.txt", "meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        prepare(config([tmp_path / "no_such_file.txt"], tmp_path / "out"), progress=False)


def test_missing_tokenizer_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(FileNotFoundError, match="neither 'bpe' nor 'char'"):
        prepare(config([tmp_path / "a.txt"], tmp_path / "out", tokenizer="gpt2-ish"),
                progress=False)


def test_missing_jsonl_field_names_file_line_and_fields(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "ok"}\n\n{"body": "x", "id": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.jsonl:3: no 'text' field.*'body', 'id'.*text_field"):
        prepare(config([corpus], tmp_path / "out"), progress=False)


def test_missing_parquet_column_names_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"no 'text' column.*'body'.*text_field"):
        prepare(config([tmp_path / "c.parquet"], tmp_path / "out"), progress=False)


def test_no_documents_and_empty_corpus_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="no documents found"):
        prepare(config([tmp_path / "empty_folder"], tmp_path / "out"), progress=False)
    (tmp_path / "nothing.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents found"):
        prepare(config([tmp_path / "nothing.jsonl"], tmp_path / "out"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    for tokenizer in ("bpe", "char"):
        with pytest.raises(ValueError, match="corpus is empty"):
            prepare(config([tmp_path / "empty.txt"], tmp_path / "out", tokenizer=tokenizer),
                    progress=False)


def test_bad_val_fraction(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        prepare(config([tmp_path / "a.txt"], tmp_path / "out", val_fraction=1.0), progress=False)


def test_interrupted_publish_never_looks_prepared(
    tmp_path: Path, bpe_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "input.txt"
    corpus.write_text(DOCS[0] * 20, encoding="utf-8")
    cfg = config([corpus], tmp_path / "out", tokenizer=str(bpe_file))
    prepare(cfg, progress=False)
    corpus.write_text(DOCS[1] * 20, encoding="utf-8")
    real_replace, calls = os.replace, []

    def ctrl_c_after_first_file(src: os.PathLike, dst: os.PathLike) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(prepare_module.os, "replace", ctrl_c_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_meta(tmp_path / "out")  # new tokenizer.json, old train.bin: must not look complete
    prepare(cfg, progress=False)
    assert read_split(tmp_path / "out", "train").size > 0
    assert not list(tmp_path.glob(".*partial*"))


def test_output_folder_gets_normal_permissions(tmp_path: Path, bpe_file: Path) -> None:
    (tmp_path / "a.txt").write_text(DOCS[0] * 20, encoding="utf-8")
    out = prepare(config([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(bpe_file)),
                  progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


# What goes wrong in a prepare run, the files that make it go wrong, the arguments (relative to
# those files) and what the one-line error says.
PREPARE_ERRORS = {
    "not UTF-8": ({"a.txt": b"caf\xe9\n"}, ["a.txt"], r"a.txt is not UTF-8 text"),
    "bad JSON line": ({"a.jsonl": b'{"text": "ok"}\n{"text": \n'}, ["a.jsonl"],
                      r"a.jsonl:2: not a JSON line"),
    "damaged parquet": ({"a.parquet": b"PAR1 not really"}, ["a.parquet"],
                        r"a.parquet is not a readable parquet file"),
    "empty corpus": ({"a.txt": b""}, ["a.txt"], r"the corpus is empty"),
    "damaged tokenizer": ({"a.txt": b"text\n", "tok.json": b'{"model": '},
                          ["a.txt", "--tokenizer", "tok.json"],
                          r"tok.json is not a valid tokenizer.json"),
    "vocab too small": ({"a.txt": b"text\n"}, ["a.txt", "--vocab-size", "10"],
                        r"vocab_size=10 is too small"),
    "bad val fraction": ({"a.txt": b"text\n"}, ["a.txt", "--val-fraction", "1.5"],
                         r"--val-fraction: must be in \[0, 1\), got 1.5"),
    "out is a file": ({"a.txt": b"text\n", "out": b""}, ["a.txt"], r"out_dir out is a file"),
}


@pytest.mark.parametrize("case", list(PREPARE_ERRORS))
def test_prepare_errors_are_one_line_messages(tmp_path: Path, capsys, monkeypatch, case) -> None:
    files, args, message = PREPARE_ERRORS[case]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    assert re.search(message, one_line_error(capsys, "prepare", *args, "--out", "out"))


def test_an_unreadable_input_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "secret.txt").write_text("text\n")
    real_open = open

    def no_permission(path, *args, **kwargs):  # as for a file this user may not read (root
        if str(path).endswith("secret.txt"):  # reads every file, so chmod cannot show it)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "open", no_permission, raising=False)
    message = one_line_error(capsys, "prepare", str(tmp_path / "secret.txt"), "--out",
                             str(tmp_path / "out"))
    assert f"cannot read input {tmp_path / 'secret.txt'}: Permission denied" in message


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_folder(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.txt").write_text(DOCS[0] * 20, encoding="utf-8")

    def full_disk(self, piece, ids) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare_module._SplitWriter, "write", full_disk)
    message = one_line_error(capsys, "prepare", str(tmp_path / "a.txt"), "--out",
                             str(tmp_path / "out"), "--tokenizer", "char")
    assert (f"no space left on device while writing prepared data for out in {tmp_path}: "
            "free some space") in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_folders_left_by_killed_runs_are_removed(tmp_path: Path, bpe_file: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    for pid in (dead.pid, os.getpid()):  # a killed run's folder, and a running one's
        stage = tmp_path / f".out.partial-{pid}-0123abcd"
        stage.mkdir()
        (stage / "train.bin").write_bytes(bytes(1000))
    (tmp_path / "a.txt").write_text(DOCS[0] * 20, encoding="utf-8")
    prepare(config([tmp_path / "a.txt"], tmp_path / "out", tokenizer=str(bpe_file)),
            progress=False)
    assert [p.name for p in tmp_path.glob(".out.partial-*")] == [
        f".out.partial-{os.getpid()}-0123abcd"]
