"""Tokenizers for lmforge: byte-level BPE and nanoGPT-style characters, one class for both.

Both kinds are plain Hugging Face ``tokenizers`` pipelines saved as a single ``tokenizer.json``,
so the same file loads here, in ``tokenizers`` and in ``transformers.PreTrainedTokenizerFast``.

- BPE: byte-level (GPT-2 style regex pre-tokenizer, full 256-byte alphabet, so any text
  round-trips), with :data:`SPECIAL_TOKENS` at ids 0..3.
- char: the sorted set of characters of a corpus at ids 0..n-1 (exactly nanoGPT's
  ``shakespeare_char`` vocabulary), optionally followed by 256 byte tokens ``<0x00>..<0xFF>``
  so that characters outside the corpus still round-trip. It is a BPE model with no merges and
  no pre-tokenizer, which ``tokenizers`` and ``transformers`` understand natively.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import ConfigError, CorruptFile, DataError
from lmforge.files import read_json_object

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = SPECIAL_TOKENS[0]
PAD_TOKEN = SPECIAL_TOKENS[1]
TOKENIZER_FILE = "tokenizer.json"
# Which tokens start and end a text, and the chat template: kept beside tokenizer.json under
# the names transformers uses, so an exported directory needs no translation.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass
class SpecialTokens:
    """The model's use of its special tokens (what `tokenizer.json` alone does not say)."""

    bos_token: str | None = EOS_TOKEN
    eos_token: str | None = EOS_TOKEN
    pad_token: str | None = PAD_TOKEN
    add_bos_token: bool = False  # prepend bos_token when encoding a prompt
    chat_template: str | None = None  # Jinja, as in transformers' tokenizer_config.json

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, values: dict) -> SpecialTokens:
        def token(value):  # transformers may store {"content": "<s>", ...}
            return value.get("content") if isinstance(value, dict) else value

        return cls(bos_token=token(values.get("bos_token")),
                   eos_token=token(values.get("eos_token")),
                   pad_token=token(values.get("pad_token")),
                   add_bos_token=bool(values.get("add_bos_token", False)),
                   chat_template=_template_text(values.get("chat_template")))


def _template_text(template) -> str | None:
    """transformers allows a list of named templates; the one named "default" is the one."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template

# Long texts are cut into pieces of about this many characters (at word ends, see
# `last_word_end`) and encoded as a batch: tokenizers then spreads them over all cores, and the
# char tokenizer avoids handling the whole text as one giant "word" (6x slower on 1 MB).
_ENCODE_PIECE_CHARS = 16_384
# Pieces are handed to tokenizers in groups of about this many characters: each token costs
# ~100 bytes inside tokenizers' Encoding objects (strings, offsets, masks), so this bounds the
# memory of encoding a huge text to ~50 MB instead of ~25x the text's size.
_ENCODE_GROUP_CHARS = 1 << 20
_N_BYTES = 256


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character that stands for
    each byte in a byte-level vocabulary (printable bytes are themselves, the others are
    shifted past 255 in order) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(_N_BYTES) if b not in printable]
    return {**{chr(b): b for b in printable},
            **{chr(_N_BYTES + i): b for i, b in enumerate(shifted)}}


_BYTE_OF_CHAR = _byte_of_char()


def _not_space(char: str) -> bool:
    return not char.isspace()


# (separator, test on the character before it), most portable first: a newline after a letter or
# digit is a token boundary for the GPT-2 and the GPT-4/Llama-3 regexes alike; a newline after
# punctuation is one only for GPT-2's (GPT-4's glues "。\n" together) but keeps text without
# spaces, like Chinese, cuttable.
_CUT_RULES = (("\n", str.isalnum), (" ", _not_space), ("\n", _not_space))


def last_word_end(text: str, start: int = 0, stop: int | None = None) -> int:
    """Return the largest cut ``i`` in ``(start, stop]`` that leaves token ids unchanged, or
    ``start`` if there is none.

    Cuts fall between a non-space character and a following space or newline. The byte-level
    (GPT-2) pre-tokenizer regex always ends a token there and starts a fresh match at the
    whitespace, so encoding ``text[:i]`` and ``text[i:]`` separately gives exactly the ids of
    ``text``. Cutting *after* whitespace would not be safe: a whitespace run at the very end of
    a string is split differently (``\\s+(?!\\S)``). Newlines are preferred, so pieces are whole
    lines.
    """
    stop = len(text) if stop is None else stop
    for sep, accepts in _CUT_RULES:
        i = text.rfind(sep, start + 1, stop + 1)
        while i > start:
            if accepts(text[i - 1]):
                return i
            i = text.rfind(sep, start + 1, i)
    return start


def _pieces(text: str, size: int) -> Iterator[str]:
    """Cut ``text`` at word ends into pieces of at most ``size`` characters where possible."""
    start = 0
    while len(text) - start > size:
        cut = last_word_end(text, start, start + size)
        if cut == start:
            # No safe cut in this window (e.g. a long run without spaces): keep the rest whole,
            # because a wrong cut would silently change the ids.
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _groups(items: Iterable[tuple[int, str]], max_chars: int) -> Iterator[list[tuple[int, str]]]:
    group: list[tuple[int, str]] = []
    chars = 0
    for item in items:
        group.append(item)
        chars += len(item[1])
        if chars >= max_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _check_alphabet(text: str, alphabet: frozenset[str]) -> None:
    unknown = set(text) - alphabet
    if unknown:
        char = min(unknown)
        raise DataError(
            f"character {char!r} (U+{ord(char):04X}) is not in the char tokenizer's "
            f"vocabulary ({len(unknown)} unknown characters in total); build it with "
            "train_char(..., byte_fallback=True) so any text can be encoded, or train it "
            "on text that contains these characters"
        )


class Tokenizer:
    """Wraps a ``tokenizers.Tokenizer``; the same class for BPE and char (both are saved as
    ``tokenizer.json``).

    ``encode`` adds no special tokens, but special-token strings that appear in the text (such
    as ``"<|endoftext|>"``) are recognised, exactly as ``transformers`` does.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special: SpecialTokens | None = None
                 ) -> None:
        self._tok = backend
        self.special = special or SpecialTokens()
        # What the pipeline is, asked of its parts: its whole JSON, parsed, was 290 MB of
        # Python objects for a 262,144-token vocabulary (Gemma 3's), made and dropped at load.
        pre, bare = backend.pre_tokenizer, backend.normalizer is None
        is_char = isinstance(backend.model, models.BPE) and pre is None and bare and not (
            json.loads(backend.to_str())["model"]["merges"])  # (a char model is small)
        # A char model without byte fallback silently drops unknown characters inside
        # tokenizers; we keep its alphabet to raise instead.
        self._alphabet: frozenset[str] | None = (
            frozenset(t for t in backend.get_vocab(with_added_tokens=False) if len(t) == 1)
            if is_char and not backend.model.byte_fallback
            else None
        )
        byte_level = isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and bare
        added = backend.get_added_tokens_decoder()
        no_space_in_added = all(not any(c.isspace() for c in t.content) for t in added.values())
        # How a token's raw bytes are spelled in the vocabulary (see `token_bytes`).
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._added = set(added)
        # Only pipelines whose pre-tokenization we know respect `last_word_end` are cut into
        # pieces; any other loaded tokenizer encodes each text whole.
        self._piece_chars = (
            _ENCODE_PIECE_CHARS if (is_char or byte_level) and no_space_in_added else None
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for token strings, offsets, ...)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def token_id(self, token: str) -> int | None:
        """The id of a whole token such as ``<|im_end|>``, None if the vocabulary lacks it."""
        return self._id(token)

    @property
    def bos_id(self) -> int | None:
        """``<|endoftext|>`` for our BPE (also the document separator); ``None`` for char;
        an imported model's own BOS token."""
        return self._id(self.special.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Same token as ``bos_id`` for our BPE; ``None`` for char (nanoGPT-compatible)."""
        return self._id(self.special.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.special.pad_token)

    @property
    def chat_template(self) -> str | None:
        return self.special.chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self.encode_batch([text])[0]

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text that starts a sequence: with the BOS token first when this
        tokenizer asks for one (`add_bos_token`: Llama 2, Gemma) and the text does not
        already start with it."""
        ids = self.encode(text)
        bos_text = self.special.bos_token
        if self.special.add_bos_token and self.bos_id is not None and not (
                bos_text and text.startswith(bos_text)):
            return [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by tokenizers' thread pool."""
        if self._alphabet is not None:
            for text in texts:
                _check_alphabet(text, self._alphabet)
        out: list[list[int]] = [[] for _ in texts]
        for group in _groups(self._owned_pieces(texts), _ENCODE_GROUP_CHARS):
            for (i, _), encoding in zip(group, self._encode_pieces([p for _, p in group])):
                out[i].extend(encoding.ids)
        return out

    def _owned_pieces(self, texts: list[str]) -> Iterator[tuple[int, str]]:
        """(index of the text, piece of it) for every piece of every text, in order."""
        for i, text in enumerate(texts):
            pieces = _pieces(text, self._piece_chars) if self._piece_chars else (text,)
            for piece in pieces:
                yield i, piece

    def _encode_pieces(self, pieces: list[str]) -> list[tokenizers.Encoding]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets we never use.
        fast = getattr(self._tok, "encode_batch_fast", None)
        if fast is not None:
            return fast(pieces, add_special_tokens=False)
        return self._tok.encode_batch(pieces, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are kept and nothing is stripped or cleaned up, so
        ``decode(encode(s)) == s``. Accepts lists, numpy arrays and tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, also when they are only part of a character
        (which ``decode`` shows as U+FFFD): the bytes of a text's tokens, joined, are the
        text's UTF-8. Byte-level vocabularies spell bytes as GPT-2's printable characters,
        byte fallback as ``<0xNN>``; any other token's bytes are its decoded text's."""
        piece = self._tok.id_to_token(token)
        if piece is None:
            return b""
        if token in self._added:
            return piece.encode()
        if self._byte_level:
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self.decode([token]).encode()

    def save(self, directory_or_file: str | Path) -> Path:
        """Write ``tokenizer.json`` (into the directory, unless given a ``.json`` file path)
        and return its path."""
        path = Path(directory_or_file)
        if path.is_dir() or path.suffix != ".json":
            path = path / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path), pretty=True)
        config = path.parent / TOKENIZER_CONFIG_FILE
        config.write_text(json.dumps(self.special.to_json(), indent=2, ensure_ascii=False) + "\n")
        return path

    def fingerprint(self) -> str:
        """sha256 hex of the canonical tokenizer JSON (sorted keys, no whitespace), used to
        detect data and checkpoints made with different tokenizers."""
        canonical = json.dumps(
            json.loads(self._tok.to_str()),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load ``path``: a ``tokenizer.json`` or a directory containing one."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {file}: expected a tokenizer.json file or a directory "
                "containing one (make one with train_bpe/train_char and Tokenizer.save, or "
                "with lmforge prepare)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise CorruptFile(f"{file} is not a valid tokenizer.json ({err}): it is damaged or "
                              "was cut short; save or download it again") from err
        config = file.parent / TOKENIZER_CONFIG_FILE
        special = SpecialTokens.from_json(read_json_object(config)) if config.is_file() else None
        return cls(backend, special)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (streamed: any iterable of strings).

    The vocabulary is ``SPECIAL_TOKENS`` (ids 0..3), the 256 byte symbols, then merges up to
    ``vocab_size`` (fewer if the corpus runs out of pairs seen ``min_frequency`` times).
    """
    minimum = len(SPECIAL_TOKENS) + _N_BYTES
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
            f"{minimum} ({len(SPECIAL_TOKENS)} special tokens + {_N_BYTES} bytes)"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would make decode(encode(s)) != s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Every byte must be in the vocabulary, or bytes unseen in training could not round-trip.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def train_char(text: str, byte_fallback: bool = True) -> Tokenizer:
    """Build a character tokenizer: ids 0..n-1 are ``sorted(set(text))`` (nanoGPT's
    ``shakespeare_char`` vocabulary), then, with ``byte_fallback``, ``<0x00>..<0xFF>`` so any
    other character is encoded as its UTF-8 bytes. Without it, encoding an unknown character
    raises ``ValueError``.
    """
    chars = sorted(set(text))
    if not chars:
        raise DataError("cannot build a char tokenizer from empty text: pass the corpus text")
    vocab = {c: i for i, c in enumerate(chars)}
    if byte_fallback:
        for b in range(_N_BYTES):
            vocab[f"<0x{b:02X}>"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=byte_fallback))
    # ByteFallback turns runs of <0xNN> tokens back into UTF-8 text; Fuse joins the tokens
    # without the spaces tokenizers would otherwise put between them.
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend)
