"""Tests for lmforge.tokenizer: round trips, nanoGPT char vocabulary, transformers compatibility,
save/load."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    last_word_end,
    train_bpe,
    train_char,
)

# Strings that have tripped tokenizers up: leading/trailing/multiple spaces (prefix-space and
# clean-up logic), newlines, punctuation after spaces (transformers' clean_up_tokenization_spaces
# would delete " ."), non-Latin text and emoji (byte fallback), special-token strings.
TRICKY = [
    "",
    "Hello, world!",
    " leading space",
    "  two leading spaces and trailing  ",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "Hello , world . I 'm here ! do n't",
    "tabs\tand\r\nwindows newlines",
    "naïve café — “quotes” ¿qué? 日本語 Ελληνικά",
    "emoji 😀🎉 and a flag 🇫🇷",
    "<|endoftext|>Next document<|pad|><|im_start|>user\nhi<|im_end|>",
    "<0x41> is not a byte token",
    "\x00\x01 control chars",
]


@pytest.fixture(scope="module")
def bpe(shakespeare: str) -> Tokenizer:
    # 200k characters keep training well under a second while still learning real merges.
    return train_bpe([shakespeare], vocab_size=1024)


@pytest.fixture(scope="module")
def char(shakespeare: str) -> Tokenizer:
    return train_char(shakespeare)


ROUND_TRIP = settings(max_examples=300, deadline=None)


@ROUND_TRIP
@given(text=st.text())
def test_bpe_round_trips_any_unicode(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@ROUND_TRIP
@given(text=st.text())
def test_char_with_byte_fallback_round_trips_any_unicode(char: Tokenizer, text: str) -> None:
    assert char.decode(char.encode(text)) == text


def test_bpe_layout(bpe: Tokenizer) -> None:
    assert [bpe.backend.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    assert bpe.vocab_size == 1024
    assert bpe.bos_id == bpe.eos_id == 0
    assert bpe.pad_id == 1
    # Merges were learned: common words are single tokens, so text is shorter than in bytes.
    assert len(bpe.encode("the king and the queen")) < len("the king and the queen") / 2


def test_bpe_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["abc"], vocab_size=100)


def test_char_matches_nanogpt_vocabulary(shakespeare: str) -> None:
    chars = sorted(set(shakespeare))
    tok = train_char(shakespeare, byte_fallback=False)
    assert len(chars) == 62  # 65 in the whole file: '$', '3' and 'X' come after this slice
    assert tok.vocab_size == 62
    assert tok.eos_id is None and tok.bos_id is None and tok.pad_id is None
    # nanoGPT's shakespeare_char: stoi = {ch: i for i, ch in enumerate(chars)}
    sample = shakespeare[:5000]
    assert tok.encode(sample) == [chars.index(c) for c in sample]
    with_fallback = train_char(shakespeare)
    assert with_fallback.vocab_size == 62 + 256
    assert with_fallback.encode(sample) == tok.encode(sample)


def test_char_without_byte_fallback_rejects_unknown_char(shakespeare: str) -> None:
    tok = train_char(shakespeare, byte_fallback=False)
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\).*byte_fallback=True"):
        tok.encode("café")
    with pytest.raises(ValueError, match="byte_fallback"):
        tok.encode_batch(["fine", "not 😀 fine"])


def test_char_rejects_empty_text() -> None:
    with pytest.raises(ValueError, match="empty text"):
        train_char("")


def test_encoding_200k_characters_is_fast_and_exact(
    shakespeare: str, bpe: Tokenizer, char: Tokenizer
) -> None:
    # The bar this test held on the whole 1.1 MB of Tiny Shakespeare (2 s), scaled to the slice:
    # at least 0.55 MB/s. BPE encodes about 2.7 MB/s on 2 cores, char 9 MB/s.
    limit = len(shakespeare) / 550_000
    for tok in (bpe, char):
        start = time.perf_counter()
        ids = tok.encode(shakespeare)
        elapsed = time.perf_counter() - start
        assert elapsed < limit, f"encoding {len(shakespeare):,} characters took {elapsed:.2f}s"
        # Internal cutting into pieces must give the ids of encoding the text in one go.
        assert ids == tok.backend.encode(shakespeare, add_special_tokens=False).ids
        assert tok.decode(ids) == shakespeare


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]


def test_cutting_at_word_ends_never_changes_bpe_ids(bpe: Tokenizer) -> None:
    # Random mixes of the characters that matter to the GPT-2 regex (runs of spaces and
    # newlines, punctuation, contractions) are where a careless cut would change ids.
    rng = random.Random(0)
    alphabet = ["a", "b", "7", " ", "\n", "\t", ".", "'", "'s", "  ", "\n\n", " \n", "é", "😀"]
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(4000))
        pieces, start = [], 0
        while (cut := last_word_end(text, start, start + 200)) != start:
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        assert len(pieces) > 5
        ids = [i for piece in pieces for i in bpe.backend.encode(piece).ids]
        assert ids == bpe.backend.encode(text).ids


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_loads_our_tokenizer_json(
    kind: str, bpe: Tokenizer, char: Tokenizer, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    ours = bpe if kind == "bpe" else char
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ours.save(tmp_path)))
    for text in TRICKY:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text)["input_ids"] == ids, text
        # transformers' default decode must not clean up spaces or drop special tokens.
        assert hf.decode(ids) == ours.decode(ids) == text


def test_save_load_round_trip_keeps_fingerprint(bpe: Tokenizer, tmp_path: Path) -> None:
    path = bpe.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for source in (path, path.parent):
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint() == bpe.fingerprint()
        assert loaded.encode(TRICKY[4]) == bpe.encode(TRICKY[4])
    assert bpe.save(tmp_path / "named.json") == tmp_path / "named.json"


def test_fingerprint_tells_tokenizers_apart(bpe: Tokenizer, char: Tokenizer) -> None:
    assert len(bpe.fingerprint()) == 64
    assert bpe.fingerprint() != char.fingerprint()
    assert train_char("abc").fingerprint() != train_char("abd").fingerprint()


def test_load_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*nope"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json


def test_load_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_decode_accepts_numpy(char: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = char.encode("To be, or not to be")
    assert char.decode(np.array(ids, dtype=np.uint16)) == "To be, or not to be"


def test_special_tokens_and_chat_template_are_saved_beside_the_tokenizer(
    bpe: Tokenizer, tmp_path: Path
) -> None:
    from lmforge.tokenizer import SpecialTokens

    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    chat = Tokenizer(bpe.backend, SpecialTokens(bos_token=None, eos_token="<|im_end|>",
                                                 add_bos_token=False, chat_template=template))
    loaded = Tokenizer.load(chat.save(tmp_path).parent)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (None, 3, 1)
    assert loaded.chat_template == template
    # transformers reads the same file: it knows the end-of-turn token and the template.
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert hf.eos_token_id == 3 and hf.chat_template == template


@pytest.mark.parametrize("tokenizer", [
    train_bpe(["plain ASCII text, twice: plain ASCII text"] * 4, vocab_size=300),
    train_char("plain ASCII text"),
], ids=["byte-level BPE", "char with byte fallback"])
def test_token_bytes_join_into_the_text_s_utf8(tokenizer: Tokenizer) -> None:
    """Pieces of a character decode to U+FFFD one by one, yet keep their own bytes."""
    text = "naïve 😀 日本語 — plain text<|im_end|>"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # there were such pieces
    assert tokenizer.token_bytes(tokenizer.vocab_size + 5) == b""
