"""GGUF (llama.cpp's single-file format) to and from lmforge model directories.

- `read_gguf` turns a ``llama``- or ``gemma3``-architecture GGUF into a `ModelConfig`, an fp32
  state dict under our parameter names, a `Tokenizer` built from the file's metadata, and
  generation settings.
- `import_gguf` writes that as an lmforge model directory (plus ``generation_config.json``).
- `export_gguf` writes a llama-shaped lmforge model directory as a GGUF in f32, f16 or q8_0;
  a quantized one (`lmforge quantize`) keeps its integers and scales, in llama.cpp's blocks.

Two things differ between the layouts beyond names:
- llama.cpp's converter reorders the rows of the query and key projections so that each head's
  rotary pairs sit next to each other (its rope rotates interleaved pairs); we rotate the two
  halves of a head, as Hugging Face Llama does, so the rows are reordered on the way in and out.
- a GGUF has no ``tokenizer.json``: the byte-level BPE vocabulary, merges and special tokens are
  metadata, and the pre-tokenizer is only named (``tokenizer.ggml.pre``), so we rebuild the
  ``tokenizers`` pipeline that name stands for in llama.cpp. Gemma's sentencepiece vocabulary
  comes without merges; they are rebuilt from the order of its tokens, as transformers does.

Gemma 3 files leave three things to the reader, which llama.cpp fixes for the architecture:
every sixth layer attends over the whole context and the others over the sliding window, the
windowed layers' rotary base is 10,000, and the stored norm weights are already 1 + w. Its
q/k rows are in the half-split order (llama.cpp's NEOX rotary), so they are not reordered.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import tokenizers
import torch
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from lmforge.compress.quant import QuantLinear, quantization_of, unpack_int4
from lmforge.config import ModelConfig
from lmforge.errors import GGUFFileError, UnsupportedModel
from lmforge.modeldir import (
    GENERATION_CONFIG,
    read_model,
    read_tokenizer,
    resolve_model_dir,
    save_model,
)
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import SpecialTokens, Tokenizer

ARCHITECTURE = "llama"
GEMMA3 = "gemma3"
_MAGIC = b"GGUF"

# GGUF tensor name -> ours. Per-block names follow "blk.{i}." / "blocks.{i}.".
_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "post_attention_norm.weight": "attn_post_norm.weight",
    "post_ffw_norm.weight": "mlp_post_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_F32, _F16, _BF16 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                     gguf.GGMLQuantizationType.BF16)
_Q8_0, _Q4_0, _Q4_1 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
                       gguf.GGMLQuantizationType.Q4_1)
# A float model's 2-D weights per export dtype. 1-D tensors (norms) stay F32.
_EXPORT_TYPES = {"f32": _F32, "f16": _F16, "q8_0": _Q8_0}
# The file type names what most weights are (llama.cpp only reports it).
_FILE_TYPES = {
    _F32: gguf.LlamaFileType.ALL_F32, _F16: gguf.LlamaFileType.MOSTLY_F16,
    _BF16: gguf.LlamaFileType.MOSTLY_BF16, _Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    _Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, _Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}
# Columns per block of Q8_0, Q4_0 and Q4_1: a block holds one float16 scale (and, in Q4_1, a
# float16 minimum) for 32 consecutive weights of a row.
_BLOCK = gguf.GGML_QUANT_SIZES[_Q8_0][0]
# The float 2-D weights of a quantized model (its embedding) are written in the first of these
# types that gives back their values exactly, else F32: the rest of the model was rounded once
# and is written as it is, and these must not be rounded either. SmolLM2's embedding, read
# from a GGUF that stored it as Q8_0, is exactly Q8_0 again: 30 MB where F32 takes 113 MB.
_EXACT_TYPES = (_Q8_0, _BF16, _F16)

# llama.cpp's pre-tokenizer names whose splitting we can rebuild, as ``tokenizers`` steps.
# "gpt-2" is GPT-2's regex; the starcoder family (SmolLM2 says "smollm") first isolates every
# digit, then applies GPT-2's regex (llama.cpp: regex "\p{N}" then the GPT-2 one).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_TOKENIZER_NAMES = ("gpt-2", *_DIGITS_THEN_GPT2)
# Earlier lmforge exports named GPT-2's regex "gpt2" (the tokenizer model's name), which
# llama.cpp refuses to load; lmforge still reads them.
_OLD_GPT2_NAME = "gpt2"

# Gemma's turns: "user" and "model" only, a system message opening the first user turn.
GEMMA_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if m['role'] != 'assistant' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# llama.cpp's fixed Gemma 3 settings (see the module docstring).
_GEMMA3_PERIOD = 6
_GEMMA3_LOCAL_BASE = 10000.0

# The longest context a GGUF may declare: rotary tables are sized by it (2^20 positions of a
# 128-wide head are 1 GB), and it is far above what llama-shaped models are trained for.
MAX_CONTEXT = 1 << 20
# Arrays of arrays: llama.cpp reads none; a few levels leave room without letting a file
# nest deep enough to exhaust the stack.
_MAX_ARRAY_NESTING = 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_BYTES = {kind: np.dtype(t).itemsize
                 for kind, t in gguf.GGUFReader.gguf_scalar_to_np.items()}
# The fewest bytes a value of these kinds takes: a string's length, an array's type and count.
_MIN_VALUE_BYTES = {**_SCALAR_BYTES, gguf.GGUFValueType.STRING: 8,
                    gguf.GGUFValueType.ARRAY: 4 + 8}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, data offset


# --------------------------------------------------------------------------- reading


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """Config, fp32 state dict (our names; no ``lm_head.weight`` when tied), tokenizer and
    generation settings (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) of a GGUF file."""
    path = Path(path)
    reader = _open_reader(path)
    try:
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from err
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config_from_metadata(meta, tensors, path)
    tokenizer = _tokenizer_from_metadata(meta, path)  # before the slow part: it may refuse
    state = _state_dict(tensors, cfg, path, pairs=meta["general.architecture"] == ARCHITECTURE)
    generation = _generation_config(meta)
    if meta["general.architecture"] == GEMMA3:
        _gemma_turns(tokenizer, generation)
    return cfg, state, tokenizer, generation


def _gemma_turns(tokenizer: Tokenizer, generation: dict[str, Any]) -> None:
    """A Gemma file without a chat template (a base model) gets Gemma's turn format, whose
    tokens its vocabulary has, rather than ChatML's, which it lacks; the end of a turn stops
    generation."""
    end = tokenizer.token_id("<end_of_turn>")
    if tokenizer.special.chat_template is not None or end is None:
        return
    tokenizer.special.chat_template = GEMMA_TEMPLATE
    eos = generation.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    generation["eos_token_id"] = list(dict.fromkeys([*eos, end]))


def import_gguf(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF file into an lmforge model directory (with ``generation_config.json``)."""
    cfg, state, tokenizer, generation = read_gguf(path)
    model = Decoder(cfg)
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state)
    out_dir = save_model(out_dir, model, tokenizer)
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise GGUFFileError(
            f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF file starts with "
            f"{_MAGIC!r}. Pass a .gguf file (llama.cpp's convert_hf_to_gguf.py makes one from a "
            "Hugging Face checkpoint)"
        )
    _check_header(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise _unreadable(path, err) from err


def _check_header(path: Path) -> None:
    """Walk the header, refusing any count or length the rest of the file cannot hold.

    GGUFReader trusts them: it loops once per declared item even past the end of the file
    and recurses into nested arrays, so a 133-byte file declaring a 2^40-item array would
    run until memory ran out.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        header = _Header(data, path)
        version = header.read("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            header.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise GGUFFileError(
                f"{path} is GGUF version {version}; the installed gguf package reads versions "
                f"{', '.join(map(str, READER_SUPPORTED_VERSIONS))} (pip install -U gguf)"
            )
        n_tensors, n_kv = header.read("Q"), header.read("Q")
        header.need(n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES,
                    f"{n_kv:,} metadata keys and {n_tensors:,} tensors")
        for _ in range(n_kv):
            key = header.text("a metadata key")
            header.value(header.read("I"), f"metadata {key!r}")
        for _ in range(n_tensors):
            name = header.text("a tensor name")
            n_dims = header.read("I")
            if n_dims > _MAX_DIMS:
                raise GGUFFileError(f"{path} is damaged: tensor {name!r} has {n_dims:,} "
                                    f"dimensions; GGUF tensors have at most {_MAX_DIMS}")
            header.skip(n_dims, 8, f"the shape of tensor {name!r}")
            header.skip(1, 4 + 8, f"tensor {name!r}")  # its type and data offset


class _Header:
    """A read position in a GGUF header that never moves past the end of the file."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos, self.order = data, path, len(_MAGIC), "<"

    def need(self, n_bytes: int, what: str) -> None:
        left = len(self.data) - self.pos
        if n_bytes > left:
            raise GGUFFileError(
                f"{self.path} is damaged or truncated: at byte {self.pos:,} it declares {what}, "
                f"at least {n_bytes:,} bytes, and the file has {left:,} left; download or "
                "export it again"
            )

    def read(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, "a number")
        self.pos += size
        return struct.unpack_from(self.order + fmt, self.data, self.pos - size)[0]

    def skip(self, count: int, item_bytes: int, what: str) -> None:
        self.need(count * item_bytes, what)
        self.pos += count * item_bytes

    def text(self, what: str) -> str:
        size = self.read("Q")
        self.need(size, f"{what} of {size:,} bytes")
        self.pos += size
        return bytes(self.data[self.pos - size:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _SCALAR_BYTES:
            self.skip(1, _SCALAR_BYTES[kind], what)
        elif kind == gguf.GGUFValueType.STRING:
            self.skip(self.read("Q"), 1, f"a string in {what}")
        elif kind == gguf.GGUFValueType.ARRAY:
            item_kind, count = self.read("I"), self.read("Q")
            if item_kind == gguf.GGUFValueType.ARRAY and depth >= _MAX_ARRAY_NESTING:
                raise GGUFFileError(f"{self.path} is damaged: {what} nests arrays more than "
                                    f"{_MAX_ARRAY_NESTING} deep")
            if item_kind not in _MIN_VALUE_BYTES:
                raise GGUFFileError(f"{self.path} is damaged: {what} holds values of unknown "
                                    f"type {item_kind}")
            self.need(count * _MIN_VALUE_BYTES[item_kind], f"{what}, an array of {count:,} items")
            if item_kind in _SCALAR_BYTES:
                self.pos += count * _SCALAR_BYTES[item_kind]
            else:
                for _ in range(count):
                    self.value(item_kind, what, depth + 1)
        else:
            raise GGUFFileError(f"{self.path} is damaged: {what} has unknown type {kind}")


def _unreadable(path: Path, err: Exception) -> GGUFFileError:
    # The reader fails with numpy's errors when a count or an offset points past the end.
    return GGUFFileError(
        f"{path} ({path.stat().st_size} bytes) could not be read as a GGUF file ({err}); it is "
        "probably truncated (download or export it again), or newer than the installed gguf "
        "package reads (pip install -U gguf)"
    )


def _config_from_metadata(meta: dict[str, Any], tensors: dict, path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in (ARCHITECTURE, GEMMA3):
        raise UnsupportedModel(
            f"{path} holds a {arch!r} model; lmforge reads {ARCHITECTURE!r} GGUF files (Llama, "
            f"SmolLM, TinyLlama, ... shaped models) and {GEMMA3!r} ones"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModel(f"{path} lacks the metadata key {arch}.{key}")
        if isinstance(value, list):
            raise UnsupportedModel(
                f"{path} sets {arch}.{key} per layer ({value[:4]}...); lmforge models use one "
                "value for all layers"
            )
        return value

    def positive(key: str, default: Any = None, kind: type = int) -> Any:
        # Every size below shapes an allocation or a division: refuse nonsense before either.
        value = get(key, default)
        numeric = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or not 0 < value < math.inf:
            raise GGUFFileError(f"{path} is damaged: {arch}.{key} is {value!r}, where a positive "
                                f"{'whole ' if kind is int else ''}number belongs")
        return value

    d_model, n_head = positive("embedding_length"), positive("attention.head_count")
    n_kv_head = positive("attention.head_count_kv", n_head)
    if n_head % n_kv_head or (arch == ARCHITECTURE and d_model % n_head):
        raise GGUFFileError(
            f"{path} is damaged: embedding_length {d_model} is not a multiple of head_count "
            f"{n_head}, or head_count is not a multiple of head_count_kv {n_kv_head}"
        )
    head_dim = positive("attention.key_length", d_model // n_head)
    if positive("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModel(f"{path} has keys of {head_dim} and values of "
                               f"{get('attention.value_length')} dimensions; lmforge's are equal")
    if head_dim % 2:
        raise UnsupportedModel(f"{path} has heads of odd width {head_dim}, which rotary "
                               "positions cannot rotate in pairs")
    context_length = positive("context_length")
    if context_length > MAX_CONTEXT:
        raise UnsupportedModel(
            f"{path} declares context_length={context_length:,}; lmforge reads models of up to "
            f"{MAX_CONTEXT:,} positions (its rotary tables are sized by the context)"
        )
    if get("expert_count", 0):
        raise UnsupportedModel(f"{path} is a mixture-of-experts model, which lmforge lacks")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModel(
            f"{path} rotates {get('rope.dimension_count')} of {head_dim} dimensions per head; "
            "lmforge's rotary positions rotate them all"
        )
    if get("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        raise UnsupportedModel(
            f"{path} uses rope scaling (Llama 3.1 style or {arch}.rope.scaling.type), which "
            "lmforge's rotary positions lack"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModel(f"{path} has no tokenizer.ggml.tokens: the vocabulary is unknown")
    n_layer = positive("block_count")
    family: dict[str, Any] = dict(mlp="swiglu")
    if arch == GEMMA3:
        window = positive("attention.sliding_window")
        family = dict(
            mlp="geglu", qk_norm=True, post_norms=True, embed_scale=True, head_dim=head_dim,
            sliding_window=window, rope_local_base=_GEMMA3_LOCAL_BASE,
            layer_types=["full_attention" if (i + 1) % _GEMMA3_PERIOD == 0 else
                         "sliding_attention" for i in range(n_layer)],
            # llama.cpp scales Gemma 3 27B's scores by its width per head, not by head_dim
            attn_scale=(d_model / n_head) ** -0.5 if n_layer == 62 else None)
    return ModelConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d_model,
        d_mlp=positive("feed_forward_length"),
        vocab_size=len(tokens),
        context_length=context_length,
        positions="rope",
        rope_base=_float32_value(positive("rope.freq_base", 10000.0, float)),
        norm="rmsnorm",
        norm_eps=_float32_value(positive("attention.layer_norm_rms_epsilon", kind=float)),
        tie_embeddings="output.weight" not in tensors,
        bias=False,
        **family,
    )


def _float32_value(value: float) -> float:
    """The shortest decimal that is the same float32: GGUF stores 1e-5 as 9.99999974e-06."""
    return float(str(np.float32(value)))


def _our_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _BLOCK_NAMES:
        return f"blocks.{layer}.{_BLOCK_NAMES[suffix]}"
    return None


def _gguf_name(ours: str) -> str:
    for theirs, name in _GLOBAL_NAMES.items():
        if name == ours:
            return theirs
    _, layer, suffix = ours.split(".", 2)
    theirs = next(k for k, v in _BLOCK_NAMES.items() if v == suffix)
    return f"blk.{layer}.{theirs}"


def _state_dict(tensors: dict, cfg: ModelConfig, path: Path, pairs: bool
                ) -> dict[str, torch.Tensor]:
    """Our fp32 tensors; `pairs`: the q/k rows are in llama.cpp's interleaved order."""
    unknown = [name for name in tensors if _our_name(name) is None]
    if unknown:
        raise UnsupportedModel(
            f"{path} has tensors lmforge's decoder has no place for: {', '.join(unknown[:5])}"
        )
    state = {}
    heads = {"q_proj.weight": cfg.n_head, "k_proj.weight": cfg.n_kv_head}
    for name, tensor in tensors.items():
        ours = _our_name(name)
        weights = _dequantize(tensor, path)
        kind = ours.rsplit(".", 2)[-2] + ".weight"
        if kind in heads and pairs:
            weights = _pairs_to_halves(weights, heads[kind])
        state[ours] = torch.tensor(weights, dtype=torch.float32)
    _check_shapes(state, cfg, path)
    return state


def _dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise UnsupportedModel(
            f"tensor {tensor.name} in {path} is of type {tensor.tensor_type.name}, which the "
            "gguf package cannot turn into floats; convert the file to F16, Q8_0 or a K-quant "
            "with llama.cpp's llama-quantize"
        ) from err


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for a config: what `Decoder` builds from it (on the meta device,
    so nothing is allocated); a tied output projection is the embedding."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    # Counted from the tensors first: the expected shapes are listed per declared block.
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if len(blocks) != cfg.n_layer or blocks != list(range(len(blocks))):
        raise UnsupportedModel(f"{path} does not match its own metadata: block_count is "
                               f"{cfg.n_layer:,}, and it holds tensors of {len(blocks)} blocks")
    expected = _expected_shapes(cfg)
    problems = [f"missing {_gguf_name(k)}" for k in expected if k not in state]
    problems += [f"unexpected {_gguf_name(k)}" for k in state if k not in expected]
    problems += [
        f"{_gguf_name(k)} is {tuple(v.shape)}, the metadata implies {expected[k]}"
        for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]
    ]
    if problems:
        raise UnsupportedModel(f"{path} does not match its own metadata: {'; '.join(problems[:5])}")


def _pairs_to_halves(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from llama.cpp's order (each head: x0, y0, x1, y1, ...) to the
    half-split order (each head: x0, x1, ..., y0, y1, ...)."""
    rows = weights.shape[0]
    per_head = weights.reshape(n_heads, rows // n_heads // 2, 2, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)


def _halves_to_pairs(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `_pairs_to_halves`: what llama.cpp's converter does to q/k rows."""
    rows = weights.shape[0]
    per_head = weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    # Chat models end a turn with an end-of-turn token that can differ from end of text.
    eos = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    generation = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {k: v for k, v in generation.items() if v is not None}


# --------------------------------------------------------------------------- tokenizer


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others are
    moved to code points 256 and up, so every token is a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return gpt2


def _tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    if model == "llama" and meta.get("general.architecture") == GEMMA3:
        backend = _gemma_backend(tokens, types)
    elif model == "gpt2":
        backend = _byte_level_backend(meta, tokens, types, path)
    else:
        raise UnsupportedModel(
            f"{path} has a {model!r} tokenizer; lmforge builds byte-level BPE ('gpt2') "
            "tokenizers from GGUF metadata, and Gemma's sentencepiece ('llama') vocabulary"
        )

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    special = SpecialTokens(
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    return Tokenizer(backend, special)


def _add_marked_tokens(backend: tokenizers.Tokenizer, marked: list[tuple[str, int]]) -> None:
    """Control tokens (<|im_end|>) and user-defined ones (<think>) are matched whole in the
    text, as llama.cpp does: the first as special tokens, the others as plain added ones."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in marked if kind == gguf.TokenType.CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in marked if kind == gguf.TokenType.USER_DEFINED])


def _gemma_backend(tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """Gemma's sentencepiece vocabulary as a BPE with byte fallback: spaces written as "▁",
    merges rebuilt from the vocabulary (the file has none) in the order of its tokens, which
    is Gemma's merge order (its scores are not), as transformers rebuilds them. Tokens of
    spaces alone are stored with real spaces and looked up as "▁"s."""
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=_merges_by_order(spelled, vocab), unk_token="<unk>", fuse_unk=True,
        byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    _add_marked_tokens(backend, [(t, kind) for t, kind in zip(tokens, types)
                                 if kind == gguf.TokenType.CONTROL or
                                 (kind == gguf.TokenType.USER_DEFINED and t in vocab)])
    return backend


def _merges_by_order(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every way of writing each token as two tokens of the vocabulary, the tokens in their
    order and each token's splits longest left part first: what a BPE applies first wins."""
    merges = []
    for token in dict.fromkeys(tokens):
        merges += [(token[:cut], token[cut:]) for cut in range(len(token) - 1, 0, -1)
                   if token[:cut] in vocab and token[cut:] in vocab]
    return merges


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], types: list[int], path: Path
                        ) -> tokenizers.Tokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in (*_PRE_TOKENIZER_NAMES, _OLD_GPT2_NAME):
        raise UnsupportedModel(
            f"{path} names the pre-tokenizer {pre!r} (tokenizer.ggml.pre), whose splitting rules "
            f"lmforge does not know; known: {', '.join(_PRE_TOKENIZER_NAMES)}"
        )
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (some converters write added
    # tokens as raw text) is spelled out byte by byte, as transformers does.
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        for t in tokens
    ]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)},
                                              merges=merges))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # A respelled control token could only be added as a new id, so it is left out.
    _add_marked_tokens(backend, [(t, kind) for t, s, kind in zip(tokens, spelled, types) if t == s])
    return backend


# --------------------------------------------------------------------------- writing


def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "f32") -> Path:
    """Write the model in ``model_dir`` as a ``llama`` GGUF file with its tokenizer and chat
    template; ``dtype`` is "f32", "f16" or "q8_0" for the 2-D weights (norms stay F32).

    A quantized model (`lmforge quantize`) is written as it is, with the default ``dtype``:
    int8 layers as Q8_0, int4 and int3 ones as Q4_0 when every zero is 0 (a symmetric grid),
    else Q4_1 (see `_quantized_blocks`); its float embedding in the smallest exact type."""
    if dtype not in _EXPORT_TYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_EXPORT_TYPES)}")
    model_dir = resolve_model_dir(model_dir)
    model, tokenizer = read_model(model_dir), read_tokenizer(model_dir)
    spec = quantization_of(model)
    if spec is not None and dtype != "f32":
        raise UnsupportedModel(
            f"{model_dir} holds {spec.describe()} weights, which a GGUF export writes as they "
            f"are (Q8_0, Q4_0 or Q4_1 blocks); dtype={dtype!r} would round them a second time. "
            "Leave the dtype at its default, or export the float model they were quantized from"
        )
    _check_llama_shaped(model.cfg, model_dir)
    if tokenizer is None:
        raise UnsupportedModel(
            f"{model_dir} has no tokenizer.json; a GGUF file must carry its tokenizer"
        )
    tensors = _encode_tensors(model, _EXPORT_TYPES[dtype])  # before any file: it may refuse
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a failed export leaves no half-written file.
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCHITECTURE)
    try:
        _write_metadata(writer, model.cfg, Path(model_dir).resolve().name, _file_type(tensors))
        _write_tokenizer(writer, tokenizer, model.cfg.vocab_size, model_dir)
        for tensor in tensors:
            # Blocks come as uint8 (rows, bytes): the writer derives the shape in weights
            # from raw_dtype (a raw_shape would be read as bytes too).
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_path)
    finally:
        writer.close()  # a no-op once closed
        partial.unlink(missing_ok=True)
    return out_path


def _check_llama_shaped(cfg: ModelConfig, model_dir: str | Path) -> None:
    wanted = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
              "qkv_bias": False, "qk_norm": False, "sliding_window": None, "post_norms": False,
              "embed_scale": False, "attn_scale": None, "rope_local_base": None,
              "head_dim": cfg.d_model // cfg.n_head}
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if wrong:
        raise UnsupportedModel(
            f"{model_dir} cannot be written as a llama GGUF: it has {', '.join(wrong)}, and a "
            "llama model needs "
            + ", ".join(f"{k}={v!r}" for k, v in wanted.items())
        )


def _write_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, name: str,
                    file_type: gguf.LlamaFileType) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_mlp)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    if file_type != gguf.LlamaFileType.ALL_F32:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_signature(spec: dict | None) -> list[tuple]:
    """What a pre-tokenizer (tokenizer.json form) does, leaving out options that only change
    offsets, so equivalent pipelines compare equal."""
    if spec is None:
        return []
    if spec["type"] == "Sequence":
        return [step for part in spec["pretokenizers"] for step in _pre_tokenizer_signature(part)]
    if spec["type"] == "ByteLevel":
        return [("ByteLevel", spec.get("add_prefix_space"), spec.get("use_regex", True))]
    if spec["type"] == "Digits":
        return [("Digits", spec.get("individual_digits"))]
    return [(spec["type"], json.dumps(spec, sort_keys=True))]


def _pre_tokenizer_name(spec: dict | None, model_dir: str | Path) -> str:
    signature = _pre_tokenizer_signature(spec)
    for name in _PRE_TOKENIZER_NAMES:
        # A pre-tokenizer's pickled state is its tokenizer.json form.
        known = json.loads(_pre_tokenizer(name).__getstate__())
        if _pre_tokenizer_signature(known) == signature:
            return name
    raise UnsupportedModel(
        f"the tokenizer in {model_dir} splits text with {spec}, which no llama.cpp "
        "pre-tokenizer name describes; GGUF export supports GPT-2's byte-level regex, alone or "
        "after isolating digits"
    )


def _merge_strings(merges: Sequence) -> list[str]:
    # tokenizers >= 0.20 writes merges as pairs, older versions as "a b" strings.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int,
                     model_dir: str | Path) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise UnsupportedModel(
            f"the tokenizer in {model_dir} is not byte-level BPE (model {model.get('type')}, "
            f"normalizer {spec.get('normalizer')}); GGUF export supports byte-level BPE only"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), model_dir)
    by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise UnsupportedModel(
            f"the tokenizer in {model_dir} has {len(by_id)} tokens with ids that do not run "
            f"0..{len(by_id) - 1} within the model's vocab_size={vocab_size}"
        )
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [
        (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        if i in added else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    # Embedding rows past the tokenizer (vocab padded for speed) get placeholder tokens, as
    # llama.cpp's converter does, because the file's vocabulary must cover every row.
    padding = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [gguf.TokenType.UNUSED] * len(padding)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merge_strings(model.get("merges", [])))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id),
                          (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.special.add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


class _Tensor(NamedTuple):
    """A tensor as it goes into the file: GGUF name, data (floats, or uint8 blocks), type,
    and how many weights it holds."""

    name: str
    data: np.ndarray
    kind: gguf.GGMLQuantizationType
    size: int


def _encode_tensors(model: Decoder, weight_type: gguf.GGMLQuantizationType) -> list[_Tensor]:
    """The model's tensors in GGUF types: a float model's 2-D weights in ``weight_type``, a
    quantized model's layers in blocks of their own integers."""
    cfg = model.cfg
    layers = {f"{name}.weight": m for name, m in model.named_modules()
              if isinstance(m, QuantLinear)}
    state = model.state_dict()
    # llama.cpp reuses token_embd when output is absent. A quantized model's tied embedding
    # is its output projection's rows (`TiedEmbedding`): that layer is token_embd.
    renamed = {}
    if cfg.tie_embeddings and "embed.weight" in state:
        state.pop("lm_head.weight")
    elif cfg.tie_embeddings:
        renamed = {"lm_head.weight": "embed.weight"}
    tensors = []
    for ours, tensor in state.items():
        if not ours.endswith(".weight"):
            continue  # a quantized layer's scales and zeros: they go into its weight's blocks
        size = tensor.numel()
        if ours in layers:
            layer = layers[ours]
            data, kind = _quantized_blocks(layer, ours)
            size = layer.out_features * layer.in_features
        else:
            weights = tensor.detach().float().cpu().numpy()
            if weights.ndim == 1:
                data, kind = weights, _F32
            elif layers:
                data, kind = _exact_encoding(weights)
            else:
                data, kind = _float_encoding(weights, weight_type)
        # Rows are permuted after encoding: blocks run along rows, so they move whole.
        if ours.endswith("q_proj.weight"):
            data = _halves_to_pairs(data, cfg.n_head)
        elif ours.endswith("k_proj.weight"):
            data = _halves_to_pairs(data, cfg.n_kv_head)
        tensors.append(_Tensor(_gguf_name(renamed.get(ours, ours)), data, kind, size))
    return tensors


def _file_type(tensors: list[_Tensor]) -> gguf.LlamaFileType:
    """The type of most of the 2-D weights (norms are F32 in every file type)."""
    counts: Counter[gguf.GGMLQuantizationType] = Counter()
    for tensor in tensors:
        if tensor.data.ndim == 2:
            counts[tensor.kind] += tensor.size
    return _FILE_TYPES[counts.most_common(1)[0][0]]


def _float_encoding(weights: np.ndarray, kind: gguf.GGMLQuantizationType
                    ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if kind == _Q8_0 and weights.shape[-1] % _BLOCK:
        # Q8_0 packs rows in blocks of 32; llama.cpp's quantizer also falls back to F16.
        kind = _F16
    return gguf.quants.quantize(np.ascontiguousarray(weights), kind), kind


def _exact_encoding(weights: np.ndarray) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``weights`` in the first of `_EXACT_TYPES` that reads back as the same values, else F32."""
    for kind in _EXACT_TYPES:
        if weights.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
            data = gguf.quants.quantize(weights, kind)
            if np.array_equal(gguf.quants.dequantize(data, kind), weights):
                return data, kind
    return weights, _F32


def _quantized_blocks(layer: QuantLinear, name: str
                      ) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``layer``'s integers and scales as GGUF blocks, uint8 (N, bytes per row), with no float
    round trip. int8 is Q8_0 (W = q * d), each block's d its row's scale. int4, and int3
    (levels 4..11 of the same 16), is Q4_0 (W = (q - 8) * d) when every zero is 0, else Q4_1
    (W = q * d + m); d is the scale of the block's group, m = zero - 8 * scale.

    GGUF stores d and m in float16. lmforge's scales are bfloat16, whose 8 significant bits
    float16 holds exactly from 2^-14 to 65504 (and below 2^-14 when the low bits are 0), so
    Q8_0 and Q4_0 give back lmforge's weights exactly; a layer where they would not is
    written as F32 (exact, bigger), with a warning. m, a difference, is rounded to float16:
    Q4_1 weights are within 2^-11 |m| of lmforge's (measured: 0.44% of a step on random
    weights; none at all on SmolLM2 at int4 g32, whose every m float16 holds).
    """
    rows, columns = layer.out_features, layer.in_features
    if columns % _BLOCK:
        raise UnsupportedModel(
            f"{name} ({_gguf_name(name)}) has {columns} input features, not a multiple of "
            f"{_BLOCK}, the width of the blocks GGUF stores quantized weights in; export the "
            "float model it was quantized from instead"
        )
    blocks = columns // _BLOCK
    if layer.bits == 8:
        kind, values = _Q8_0, layer.weight
        levels = values.to(torch.int16)
        scales, minimums = layer.scales.float()[:, None].expand(rows, blocks), None
    else:
        group = torch.arange(blocks) * _BLOCK // layer.group_size  # each block's group
        scales, zeros = layer.scales.float()[:, group], layer.zeros.float()[:, group]
        values = unpack_int4(layer.weight)
        if (zeros == 0).all():
            kind, levels, minimums = _Q4_0, values.to(torch.int16) - 8, None
        else:
            kind, levels, minimums = _Q4_1, values.to(torch.int16), zeros - 8 * scales
    levels = levels.reshape(rows, blocks, _BLOCK)
    d = scales.to(torch.float16)
    # A weight changes only where float16 changed the scale that multiplies a level other than 0.
    changed = (levels * d.float()[..., None] != levels * scales[..., None]).any(-1)
    m = None if minimums is None else minimums.to(torch.float16)
    if m is not None:
        changed |= ~m.isfinite()
    if changed.any():
        magnitudes = scales[changed].abs()
        growth = 4 * _BLOCK / gguf.GGML_QUANT_SIZES[kind][1]
        warnings.warn(
            f"{name} ({_gguf_name(name)}) is written as F32, {growth:.1f}x the bytes of "
            f"{kind.name}: float16, in which {kind.name} blocks keep their scales, does not hold "
            f"those of {int(changed.sum()):,} of its {changed.numel():,} blocks exactly "
            f"(magnitudes {magnitudes.min():.3g} to {magnitudes.max():.3g}; it holds bfloat16 "
            "scales from 6.1e-05 to 65504)",
            stacklevel=4,  # the line that called export_gguf
        )
        return layer.dequantized_weight().numpy(), _F32
    parts = [_bytes(d)]
    if m is not None:
        parts.append(_bytes(m))
    values = values.reshape(rows, blocks, _BLOCK).numpy()
    if kind == _Q8_0:
        parts.append(values.view(np.uint8))
    else:  # byte j of a block holds weight j in its low nibble and weight j + 16 in its high
        half = _BLOCK // 2
        parts.append(values[..., :half] | values[..., half:] << 4)
    return np.concatenate(parts, axis=-1).reshape(rows, -1), kind


def _bytes(values: torch.Tensor) -> np.ndarray:
    """float16 (N, blocks) as its bytes, (N, blocks, 2)."""
    return values.contiguous().numpy().view(np.uint8).reshape(*values.shape, 2)
