"""lmforge's own CPU kernels for decoding steps (`decode_kernels.cpp`).

- int8 and int4 matrix products: PyTorch's int kernels multiply bfloat16 activations by
  weights they widen one by one; these quantize each row of activations to int8 in blocks of
  32 (a scale a block, as llama.cpp does) and multiply on the CPU's integer dot-product
  instructions (AVX-512 VNNI, or AVX2), so a decoding step is bound by the bytes of weights
  it reads. The weights are laid out in tiles of 16 outputs (`int8_operands`,
  `int4_operands`), each part of which is multiplied by up to 8 rows of x once loaded: 8
  sequences decoding together cost little more than one. Each row is quantized alone: a
  sequence's result does not depend on what it is batched with.
- float32 matrix products for the few rows of a decoding step (`float_matmul`): each weight
  read once for up to 8 rows, the next rows' weights prefetched; PyTorch's product slows down
  past two rows (SmolLM2's 1536 x 576 layers: 15 GB/s of weights at 8 rows, against 23 here).
- attention of one new token per sequence over the KV cache (`decode_attention`): each
  sequence reads its own cached positions only (PyTorch's attention reads a batch's longest,
  masked), each key and value once for the query heads that share it, from a float32,
  bfloat16 or float16 cache; for a batch of 8 SmolLM2 sequences a step's attention takes a
  fifth of the time.
- greedy tokens (`greedy_tokens`): each row's first largest logit, several times faster than
  PyTorch's max with indices.
- the tiles' weights dequantized (`dequantized`), for a long prompt's product: the weights as
  stored need not stay in memory beside the tiles.

They are compiled on first use for this CPU (about 15 seconds, with the C++ compiler
PyTorch's extensions use) into lmforge's cache, and loaded from there after. Where they cannot
be built (no compiler, a CPU without AVX2), or with `LMFORGE_INT_KERNELS=0`, decoding uses
PyTorch's kernels, as before: the weights on disk are the same either way.
`LMFORGE_INT_KERNELS=avx2` builds the AVX2 kernels on a CPU that has AVX-512 too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.allocator import page_out
from lmforge.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_kernels.cpp")
BLOCK = 32  # values of x that share a scale: the kernels take in_features in whole blocks
TILE = 16  # outputs of a weight tile


_built: bool | None = None  # whether the kernels are loaded, once known


def available() -> bool:
    """Whether the kernels are built and loaded (building them the first time). A compiled
    step that asks reads the answer known when it was traced (ask before tracing: Dynamo
    cannot trace the build)."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    choice = os.environ.get("LMFORGE_INT_KERNELS", "auto").lower()
    if choice == "0":
        return False
    try:
        _load(force_avx2=choice == "avx2")
    except Exception as error:  # no compiler, no AVX2, a failed build: PyTorch's kernels do
        log.warning("lmforge's CPU decoding kernels are not available (%s); decoding uses "
                    "PyTorch's kernels", str(error).strip().splitlines()[-1][:300])
        return False
    return True


def _load(force_avx2: bool = False) -> None:
    from torch.utils import cpp_extension

    if torch.backends.cpu.get_cpu_capability().lower() not in ("avx2", "avx512"):
        raise RuntimeError("this CPU has neither AVX2 nor AVX-512")
    flags = ["-O3", "-march=native", "-fopenmp"] + (["-mno-avx512f"] if force_avx2 else [])
    # One build per source, flags, PyTorch version and CPU: it is compiled for the CPU it
    # runs on.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()
                         + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / key / "lmforge_kernels.so"
    if library.exists():
        torch.ops.load_library(str(library))
    else:
        log.warning("compiling lmforge's CPU decoding kernels for this CPU (once, about 15 s)")
        library.parent.mkdir(parents=True, exist_ok=True)
        # built in a directory of this process's own, then moved into place whole: a build
        # cut short (Ctrl-C, a killed process) leaves no lock or half-written library behind
        # for the next process to wait on
        with tempfile.TemporaryDirectory(dir=library.parent.parent) as build:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpp_extension.load(name="lmforge_kernels", sources=[str(SOURCE)],
                                   extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                   build_directory=build, is_python_module=False)
            os.replace(Path(build) / "lmforge_kernels.so", library)
    # shapes for torch.compile, which calls the kernels as they are
    for name in ("float_mm", "int8_mm", "int4_mm"):
        torch.library.register_fake(f"lmforge_kernels::{name}")(_out_like)
    torch.library.register_fake("lmforge_kernels::decode_attention")(_attention_out)
    torch.library.register_fake("lmforge_kernels::greedy")(_tokens_out)
    torch.library.register_fake("lmforge_kernels::dequantize")(_dequantized_out)


def _out_like(x: torch.Tensor, w: torch.Tensor, *_scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _attention_out(q: torch.Tensor, *_args) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _dequantized_out(w: torch.Tensor, _scales: torch.Tensor, zeros: torch.Tensor
                     ) -> torch.Tensor:
    return w.new_empty(w.shape[0], w.shape[1] * (1 if zeros.numel() == 0 else 2),
                       dtype=torch.float32)


def _tokens_out(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.long)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def supports(in_features: int, group_size: int | None) -> bool:
    """Whether a layer's shape suits the kernels (and they are available)."""
    return (in_features % BLOCK == 0 and (group_size is None or group_size % BLOCK == 0)
            and available())


def _tiles(values: torch.Tensor) -> torch.Tensor:
    """(N, K) bytes in tiles of 16 outputs by 32 values (see `decode_kernels.cpp`): (tiles,
    blocks, 8 groups of 4 values, 16 outputs, 4 values), the outputs padded with zeros to
    whole tiles."""
    N, K = values.shape
    if N % TILE:
        values = F.pad(values, (0, 0, 0, -N % TILE))
    return values.view(-1, TILE, K // BLOCK, BLOCK // 4, 4).permute(0, 2, 3, 1, 4)


def int8_operands(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From lmforge's int8 layout: weight int8 (N, K), scales (N,)."""
    N, K = weight.shape

    def fill(rows: torch.Tensor, part: torch.Tensor) -> None:
        # w + 128 for VNNI's unsigned operand: the top bit of each byte flipped
        tiles = _tiles(rows.view(torch.uint8))
        torch.bitwise_xor(tiles, 0x80, out=part.view(tiles.shape))

    return _tiled(weight, K, fill), F.pad(scales.float(), (0, -N % TILE)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Values 0..15, uint8 (N, K), from lmforge's int4 layout: two a byte (N, K/2), column
    2j in the low nibble."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)


ROWS_AT_A_TIME = 4096  # rows of a weight put in tiles at a time (whole tiles)


def _tiled(values: torch.Tensor, columns: int,
           fill: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """One uint8 tensor (the outputs padded to whole tiles, `columns`), `fill(rows, part)`
    writing each ROWS_AT_A_TIME rows of `values` into theirs. Rows read are paged out where
    they are a file's (see `page_out`), so a large weight is never held twice whole: Gemma 3's
    output projection is 168 MB at int8. Unpacked whole, its int4 nibbles took 240 MB more."""
    N = values.shape[0]
    out = torch.empty(-(-N // TILE) * TILE, columns, dtype=torch.uint8, device=values.device)
    for first in range(0, N, ROWS_AT_A_TIME):
        rows = values[first:first + ROWS_AT_A_TIME]
        fill(rows, out[first:first + -(-rows.shape[0] // TILE) * TILE])
        if N > ROWS_AT_A_TIME:  # a weight of one chunk goes with the layer's other tensors
            page_out([rows])
    return out


def int4_operands(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> tuple[torch.Tensor, ...]:
    """From lmforge's int4 layout: nibbles uint8 (N, K/2), scales and zeros (N, groups),
    W = (q - 8) * scale + zero: the same numbers in tiles, each part's second half of values
    in the high nibbles of its first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    blocks = K // BLOCK

    def fill(rows: torch.Tensor, part: torch.Tensor) -> None:
        tiles = _tiles(unpack_int4(rows))
        torch.bitwise_or(tiles[:, :, :4], tiles[:, :, 4:] << 4,
                         out=part.view(tiles.shape[0], blocks, 4, TILE, 4))

    group = torch.arange(blocks, device=packed.device) * BLOCK // group_size

    def per_tile(t: torch.Tensor) -> torch.Tensor:  # (N, groups) -> (tiles, blocks, 16)
        t = F.pad(t[:, group].to(torch.bfloat16), (0, 0, 0, -N % TILE))
        return t.view(-1, TILE, blocks).transpose(1, 2).reshape(-1, blocks).contiguous()

    return _tiled(packed, K // 2, fill), per_tile(scales), per_tile(zeros)


NOTHING = torch.empty(0, dtype=torch.long)  # no lengths (every position), no block table


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     lengths: torch.Tensor = NOTHING, table: torch.Tensor = NOTHING,
                     end: int | None = None, scale: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    """Attention (B, H, 1, D) of one query per sequence, q (B, H, 1, D), over cached keys and
    values: sequence b's first lengths[b] positions (`end` for every row when `lengths` is
    empty; by default all L), the last `window` of them with a sliding window. k, v: (B, Hkv, L, D), a row's positions
    in its own row; or, with a block `table` (B, blocks), (NB, Hkv, BS, D) blocks of BS
    positions, row b's j-th block k[table[b, j]] (a paged cache). float32, on the CPU, with
    the kernels `available`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    end = (k.shape[2] * max(table.shape[-1], 1)) if end is None else end
    return torch.ops.lmforge_kernels.decode_attention(q, k, v, lengths, table, end, scale,
                                                      window or 0)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its largest value (B,), from float32 logits (B, V) on the
    CPU, with the kernels `available`."""
    return torch.ops.lmforge_kernels.greedy(logits.contiguous())


MAX_ROWS = 8  # rows of x the kernels do together: the float product's limit


def float_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d (M, K) times weight (N, K) transposed, float32 on the CPU: (M, N)."""
    return torch.ops.lmforge_kernels.float_mm(x2d.contiguous(), weight)


def matmul(x2d: torch.Tensor, operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x2d (M, K) times the weight of `operands` (made by `int8_operands` or
    `int4_operands`): float32 (M, N)."""
    x2d = x2d.float().contiguous()
    if len(operands) == 2:
        return torch.ops.lmforge_kernels.int8_mm(x2d, *operands)
    return torch.ops.lmforge_kernels.int4_mm(x2d, *operands)



def dequantized(operands: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """float32 (N padded to whole tiles, K): the weight of `operands` (made by `int8_operands`
    or `int4_operands`), value for value what `dequantize_int8` and `dequantize_int4` make of
    lmforge's layout, for a long prompt's product: the weights as stored need not stay in
    memory beside the tiles."""
    zeros = operands[2] if len(operands) == 3 else NOTHING
    return torch.ops.lmforge_kernels.dequantize(operands[0], operands[1], zeros)
