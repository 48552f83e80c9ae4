"""Weight-only quantization: round to nearest, int8 per output channel or int4 per group.

`quantize(model, spec)` swaps every `nn.Linear` of a `Decoder` (the blocks' projections and
the output projection) for a `QuantLinear`; norms stay float. An untied embedding stays float
too; a tied one stays tied: a token's vector is its row of the quantized output projection
(`TiedEmbedding`), so no float copy of the table is kept. Decoding one token reads every
weight once, so its speed is bound by the bytes of weights read.

Of a vision-language model only the decoder is quantized. The vision encoder and projector
stay float: they run once per image, not per generated token, so they are no part of what
bounds decoding speed; they are small beside the decoder (1.5 M parameters against SmolLM2's
135 M in `configs/vision-smollm2-stage2.yaml`; SmolVLM-256M's encoder, 86 M, is the
exception); and every image token's input passes through them, so a rounding error there
shifts all of an image's features at once, which a decoder trained on exact features never
saw.

Weights are kept, and saved, in a plain layout any reader can decode (W is (out, in) = (N, K);
scales and zeros are bfloat16):
- int8: `weight` int8 (N, K) and `scales` (N,): W = weight * scale;
- int4: `weight` uint8 (N, K/2), two values 0..15 per byte (column 2j in the low nibble,
  2j+1 in the high), and `scales`, `zeros` (N, ceil(K/G)) for groups of G columns:
  W = (q - 8) * scale + zero, the convention of PyTorch's int4 kernels. When G does not
  divide K the last group is shorter (SmolLM2's width, 576, is 4.5 groups of 128). A
  symmetric grid has every zero 0 (W = (q - 8) * scale, GGUF's Q4_0).
On the CPU, decoding steps (up to KERNEL_MAX_ROWS rows) run in lmforge's own int kernels
where the CPU has AVX2 or AVX-512 and the layer's width is a multiple of 32
(`lmforge.compress.kernels`: activations rounded to int8 in blocks of 32, integer dot
products), else in PyTorch's, with activations cast to bfloat16 (their fast path) and back.
Either wants the weight in its own layout: made at first use, never saved. lmforge's kernels
then hold the only copy in memory: the weights as stored, a mapped file's pages, are handed
back to the system (`kernel_operands`), and read from the file again if touched. Long prompts,
and other devices, multiply by the dequantized weight (on a CPU, dequantized from lmforge's
kernels' tiles where they are made); on a CPU that multiplies bfloat16 in hardware (AVX-512
BF16, AMX), in bfloat16 when no gradient is asked for (`bf16_products`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.allocator import page_out
from lmforge.compress import kernels
from lmforge.compress.kernels import unpack_int4
from lmforge.config import from_dict
from lmforge.errors import LmforgeError, UnsupportedModel
from lmforge.files import read_json_object
from lmforge.layers import frozen, linear
from lmforge.modeldir import (
    QUANTIZATION,
    DirectoryHook,
    register_hook,
)
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM

GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# The CPU kernels are vectorised for bfloat16 activations only (with float32 ones they are
# 10-20x slower than a float32 matmul) and want scales of the activations' dtype, so scales
# are made, stored and used in bfloat16, and the integers are rounded against those.
SCALE_DTYPE = torch.bfloat16
_SMALLEST = torch.finfo(SCALE_DTYPE).tiny  # the scale of an all-zero row or group
# Up to this many rows of activations (decoding steps, short prompts) the int kernels win;
# past it the matmul is bound by compute and a float matmul by the dequantized weight is
# faster (1.5x for a 512-token prompt).
KERNEL_MAX_ROWS = 64
# The int4 kernel packs blocks of 16 output rows.
INT4_ROWS = 16


class QuantizationError(LmforgeError, ValueError):
    """A model that cannot be quantized as asked."""


@dataclass(frozen=True)
class QuantSpec:
    """How a model's weights are quantized: saved as quantization.json beside config.json.

    head_bits: bits of the output projection. It is the layer most sensitive to rounding:
    at int4 it alone costs SmolLM2-135M 5% perplexity, at int8 0.05%, so int4 models keep it
    at int8 by default (llama.cpp likewise keeps it at 6 bits in its 4-bit types).
    """

    bits: int
    group_size: int | None = None  # int4 / int3: columns sharing one scale and zero
    head_bits: int = 8
    method: str = "rtn"  # rtn (round to nearest), gptq, awq, awq+gptq: how values were chosen
    symmetric: bool = False  # int4 / int3: zeros all 0, the grid centred on 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown quantization method {self.method!r}: use one of "
                                    f"{', '.join(METHODS)}")
        if self.bits not in (3, 4, 8):
            raise QuantizationError(f"{self.bits}-bit weights are not supported: use 8, 4 or 3")
        if self.bits == 8 and self.group_size is not None:
            raise QuantizationError("int8 has one scale per output channel: a group size "
                                    "goes with 4 or 3 bits only")
        if self.bits != 8 and self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"int{self.bits} group size {self.group_size} is not one of "
                                    f"{', '.join(map(str, GROUP_SIZES))}")
        if self.symmetric and self.bits == 8:
            raise QuantizationError("int8 is always symmetric: `symmetric` goes with 4 or 3 bits")
        if self.head_bits not in (self.bits, 8):
            raise QuantizationError(f"head_bits={self.head_bits}: the output projection takes "
                                    f"{self.bits} or 8 bits")

    def layer(self, name: str) -> tuple[int, int | None]:
        """Bits and group size of the Linear layer `name`."""
        if name == "lm_head" and self.head_bits == 8:
            return 8, None
        return self.bits, self.group_size

    def describe(self) -> str:
        name = "int8" if self.bits == 8 else f"int{self.bits} g{self.group_size}"
        if self.symmetric:
            name += " sym"
        if self.head_bits != 8:
            name += f" (int{self.head_bits} head)"
        return name + (f" {self.method.upper()}" if self.method != "rtn" else "")

    def save(self, directory: str | Path) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
        (Path(directory) / QUANTIZATION).write_text(text)

    @classmethod
    def load(cls, directory: str | Path) -> QuantSpec | None:
        """The spec saved in a model directory; None for a float model."""
        path = Path(directory) / QUANTIZATION
        if not path.is_file():
            return None
        return from_dict(cls, read_json_object(path), where=str(path))


# ------------------------------------------------------------------- plain layouts


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per output row: scales (N,) that map each row's largest magnitude to 127."""
    return (w.float().abs().amax(dim=1) / 127).to(SCALE_DTYPE).clamp(min=_SMALLEST)


def round_int8(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in -127..127: `w` rounded on the grid of `scales` (N,)."""
    return torch.round(w.float() / scales[:, None].float()).clamp(-127, 127).to(torch.int8)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row: int8 (N, K) in -127..127 and scales (N,)."""
    scales = int8_scales(w)
    return round_int8(w, scales), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (N, K)."""
    return q.float() * scales[:, None].float()


def int4_levels(bits: int = 4) -> tuple[int, int]:
    """The smallest and largest stored value of a `bits`-bit weight (3 or 4) in the int4
    layout: 3-bit weights use the 8 middle values of the 16, so they run in the same
    kernels, and cost the same bytes."""
    half = 1 << (bits - 1)
    return 8 - half, 7 + half


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row: the last one may be shorter than `group_size`."""
    return -(-in_features // group_size)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` (N, K) as (N, groups, group_size) float32, a short last group filled up with
    copies of the row's last value (which leave its minimum and maximum as they are)."""
    pad = -w.shape[1] % group_size
    w = w.float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, group_size)


def int4_grid(w: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of columns: scales and zeros (N, groups). Asymmetric: each group's range
    [min, max] is split into 2^bits - 1 steps, so the lowest and highest levels land on its
    extremes. Symmetric (zeros 0): the value of largest magnitude lands on the lowest level
    exactly, with a scale of its sign, so one extreme costs no rounding at all (Q4_0's rule)."""
    groups = _groups(w, group_size)
    lowest, highest = int4_levels(bits)
    if symmetric:
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))[..., 0]
        scales = (extreme / (lowest - 8)).to(SCALE_DTYPE)
        scales = torch.where(scales.abs() < _SMALLEST, _SMALLEST, scales)
        return scales, torch.zeros_like(scales)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / (highest - lowest)).to(SCALE_DTYPE).clamp(min=_SMALLEST)
    zeros = (low + (8 - lowest) * scales.float()).to(SCALE_DTYPE)
    return scales, zeros


def round_int4(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               bits: int = 4) -> torch.Tensor:
    """Values uint8 (N, K) in the `bits`-bit levels: `w` rounded on the grid of `scales` and
    `zeros` (N, groups), where W = (q - 8) * scale + zero."""
    N, K = w.shape
    groups = _groups(w, group_size)
    q = torch.round((groups - zeros[..., None].float()) / scales[..., None].float()) + 8
    return q.clamp(*int4_levels(bits)).to(torch.uint8).reshape(N, -1)[:, :K]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two values 0..15 per byte: uint8 (N, K/2) from (N, K), column 2j in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of columns: nibbles uint8 (N, K/2), scales and zeros (N, groups)."""
    scales, zeros = int4_grid(w, group_size, bits, symmetric)
    return pack_int4(round_int4(w, scales, zeros, group_size, bits)), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """float32 (N, K). Worked in place in the one tensor it returns: written as one expression
    it made five, and a long prompt's pass through an int4 model dequantizes every layer
    (SmolLM2's 1536 x 576 layers: 0.34 ms each, against 2.1 ms)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    w = torch.empty(N, scales.shape[1] * group_size, dtype=torch.float32, device=packed.device)
    w[:, K:] = 0  # a short last group's padding, dropped below
    pairs = w[:, :K].unflatten(1, (K // 2, 2))
    pairs[..., 0], pairs[..., 1] = packed & 15, packed >> 4
    groups = w.view(N, -1, group_size)
    groups.sub_(8).mul_(scales[..., None].float()).add_(zeros[..., None].float())
    return w[:, :K]


@dataclass(frozen=True)
class Rounded:
    """A weight on lmforge's grid, however its values were chosen: `values` int8 (N, K) for 8
    bits, packed nibbles uint8 (N, K/2) otherwise; `scales` (N,) or (N, groups) and `zeros`
    (N, groups) or None."""

    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None = None

    def dequantized(self) -> torch.Tensor:
        """float32 (N, K)."""
        if self.zeros is None:
            return dequantize_int8(self.values, self.scales)
        return dequantize_int4(self.values, self.scales, self.zeros, self.group_size)


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int | None = None,
                     symmetric: bool = False) -> Rounded:
    """`w` (N, K) rounded to nearest on its own grid: int8 per row, int4 / int3 per group."""
    if bits == 8:
        return Rounded(*quantize_int8(w), None)
    return Rounded(*quantize_int4(w, group_size, bits, symmetric), group_size)


# ------------------------------------------------------------------------- the layer


class QuantLinear(nn.Module):
    """nn.Linear's forward with an int8 or int4 weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int,
                 group_size: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, in_features,
                                                       dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE))
        else:
            groups = n_groups(in_features, group_size)
            self.register_buffer("weight", torch.empty(out_features, in_features // 2,
                                                       dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        # The CPU kernels' operands, made on first use. Not buffers: `.to()` leaves them
        # behind, and they are remade on another device or after new weights are loaded.
        self._kernel_operands: Operands | None = None
        self.version = 0  # counts the weights loaded into it, for the operands made from them
        self.register_load_state_dict_post_hook(QuantLinear._forget_kernel_operands)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    symmetric: bool = False) -> QuantLinear:
        """`linear` rounded to nearest."""
        rounded = round_to_nearest(linear.weight.detach(), bits, group_size, symmetric)
        return cls.from_values(linear, bits, group_size, rounded)

    @classmethod
    def from_values(cls, linear: nn.Linear, bits: int, group_size: int | None,
                    rounded: Rounded) -> QuantLinear:
        """The layer of `linear` with weights already on the grid (chosen by any method)."""
        with torch.device("meta"):  # the buffers are replaced just below
            layer = cls(linear.in_features, linear.out_features, bits, group_size,
                        bias=linear.bias is not None)
        layer.weight, layer.scales = rounded.values, rounded.scales
        if bits != 8:
            layer.zeros = rounded.zeros
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out_features, in_features)."""
        return self._dequantized(slice(None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        x2d = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or x2d.shape[0] > KERNEL_MAX_ROWS:
            y = dequantized_product(x, self._product_weight())
            return y if bias is None else y + bias
        y = kernel_matmul(x2d, self._operands(), self.bits, self.group_size, self.out_features)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _product_weight(self) -> torch.Tensor:
        """The float weight a long prompt is multiplied by: made from lmforge's kernels'
        tiles on the CPU, so that the weights as stored stay paged out (see `kernel_operands`)."""
        if self.weight.device.type == "cpu" and not torch.compiler.is_compiling():
            operands = self._operands()
            if operands.ours:
                return dequantized(operands, self.out_features)
        return self.dequantized_weight()

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 rows `idx` of the weight, shaped (*idx.shape, in_features)."""
        return self._dequantized(idx.reshape(-1)).view(*idx.shape, self.in_features)

    def _dequantized(self, rows: slice | torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(self.weight[rows], self.scales[rows])
        return dequantize_int4(self.weight[rows], self.scales[rows], self.zeros[rows],
                               self.group_size)

    def _operands(self) -> Operands:
        if self._kernel_operands is None:
            self._kernel_operands = kernel_operands([self])
        return self._kernel_operands

    def _forget_kernel_operands(self, _incompatible_keys=None) -> None:
        self._kernel_operands = None
        self.version += 1

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> QuantLinear:
        # Module.to(dtype) casts every float buffer: opening an int4 model in float32 made its
        # bfloat16 scales and zeros float32 (25 MB more for SmolLM2-135M), and float16 would
        # round them again. They go where the weight goes, as they are: seen as integers of
        # their width, which no cast to a float type touches.
        scales = {name: t for name, t in self._buffers.items()
                  if name in ("scales", "zeros") and t is not None}
        self._buffers.update(dict.fromkeys(scales))  # Module._apply passes over None
        super()._apply(fn, recurse)
        for name, t in scales.items():
            as_ints = {2: torch.int16, 4: torch.int32}[t.element_size()]
            self._buffers[name] = fn(t.view(as_ints)).view(t.dtype)
        self._forget_kernel_operands()  # made for the weight as it was
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits != 8 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{group}, bias={self.bias is not None}")


def dequantized_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x times a dequantized weight (out, in): in bfloat16 on a CPU that multiplies it in
    hardware (see `bf16_products`), outside of training."""
    dtype = (torch.bfloat16 if x.device.type == "cpu" and x.dtype == torch.float32
             and not torch.is_grad_enabled() and bf16_products() else x.dtype)
    return linear(x.to(dtype), weight.to(dtype)).to(x.dtype)


def dequantized(operands: Operands, out_features: int) -> torch.Tensor:
    """float32 (out_features, in_features): the weight lmforge's kernel operands hold, the
    same numbers as `QuantLinear.dequantized_weight`'s."""
    return kernels.dequantized(operands.tensors)[:out_features]


@functools.cache
def bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16, or AMX), where
    the products of a long prompt through a quantized model run in bfloat16: their weights
    are rounded already, and the activations are no coarser than the int8 ones of a decoding
    step's kernels. SmolLM2 int4 on a CPU with AMX: a 512-token prefill 1.7x faster,
    perplexity 42.002 against 42.013 in float32."""
    try:
        return torch.cpu._is_avx512_bf16_supported()
    except (AttributeError, RuntimeError):  # a PyTorch without the query
        return False


def make_kernel_operands(model: nn.Module) -> None:
    """Make the CPU kernel operands of each quantized layer or group of layers now, for a
    compiled step: made while tracing, they would be made again at every step."""
    grouped = set()
    for module in model.modules():
        group = getattr(module, "fused", None)
        if isinstance(group, KernelGroup) and group.layers[0].weight.device.type == "cpu":
            if group.operands().ours:  # the compiled step calls lmforge's kernels grouped
                grouped.update(map(id, group.layers))
    for module in model.modules():
        if (isinstance(module, QuantLinear) and module.weight.device.type == "cpu"
                and id(module) not in grouped):
            module._operands()


class TiedEmbedding(nn.Module):
    """The input embedding of a model whose output projection is the embedding, once that
    projection is quantized: a token's vector is its row of the projection, dequantized.
    Decoding reads one row per token, and the float table it replaces was as large as the
    whole rest of an int4 model (113 MB of SmolLM2-135M's 208; Gemma 3 270M's, 671 MB)."""

    def __init__(self, head: QuantLinear) -> None:
        super().__init__()
        # In a tuple, not a submodule: the projection's tensors are saved once, as lm_head's.
        self.head = (head,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(idx)

    def extra_repr(self) -> str:
        return "rows of lm_head"


class KernelGroup:
    """Layers that read the same input (q, k and v; gate and up) run as one int kernel call:
    their weights side by side, packed for the kernel once. Like a layer's own kernel
    operands it is a cache: the layers, and what is saved, stay as they are, and what is not
    a small step on a CPU (a long prompt, another device, a layer since replaced by another,
    a compiled step on PyTorch's kernels) goes layer by layer. One call instead of three and two
    saves their casts to bfloat16 and back: SmolLM2 decodes 11% faster at int4, 5-9% at int8."""

    def __init__(self, layers: list[QuantLinear]) -> None:
        self.layers = tuple(layers)
        self.sizes = [layer.out_features for layer in layers]
        self._operands: Operands | None = None
        self._made_from: list[int] = []

    @classmethod
    def of(cls, layers: list[nn.Module]) -> KernelGroup | None:
        """A group of `layers`, if they are quantized alike (None otherwise)."""
        if not all(type(layer) is QuantLinear for layer in layers):
            return None
        if len({(layer.bits, layer.group_size, layer.in_features) for layer in layers}) > 1:
            return None
        return cls(layers)

    def __call__(self, x: torch.Tensor, layers: tuple[nn.Module, ...]
                 ) -> tuple[torch.Tensor, ...] | None:
        """Each layer's output for `x`, or None where the layers must run one by one."""
        first = self.layers[0]
        if x.device.type != "cpu" or any(a is not b for a, b in zip(layers, self.layers)):
            return None
        long = x.numel() > KERNEL_MAX_ROWS * first.in_features
        if torch.compiler.is_compiling():
            # a compiled step calls lmforge's kernels on operands made before (see
            # `make_kernel_operands`); PyTorch's kernels are left to the compiler layer by
            # layer, and so are long prompts
            if long or self._operands is None or not self._operands.ours:
                return None
            operands = self._operands
        else:
            operands = self.operands()
            if long and not operands.ours:
                return None
        x2d, size = x.reshape(-1, first.in_features), sum(self.sizes)
        if long:  # one product by the layers' weights side by side, made from the tiles
            weight = dequantized(operands, size)
            y = dequantized_product(x2d, weight).to(x.dtype)
        else:
            y = kernel_matmul(x2d, operands, first.bits, first.group_size, size).to(x.dtype)
        y = y.view(*x.shape[:-1], y.shape[-1]).split(self.sizes, dim=-1)
        return tuple(out if layer.bias is None else out + layer.bias.to(x.dtype)
                     for out, layer in zip(y, self.layers))

    def operands(self) -> Operands:
        """The group's kernel operands, remade when a layer's weights have changed."""
        made_from = [layer.version for layer in self.layers]
        if self._operands is None or made_from != self._made_from:
            self._operands, self._made_from = kernel_operands(list(self.layers)), made_from
        return self._operands


class Operands(NamedTuple):
    """Layers' weights as a CPU kernel takes them: lmforge's kernels (`ours`, see
    `lmforge.compress.kernels`) or PyTorch's."""

    ours: bool
    tensors: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, ours: bool, tensors: tuple[torch.Tensor, ...]) -> Operands:
        """The tensors held as frozen Parameters (see `lmforge.layers.frozen`)."""
        return cls(ours, tuple(map(frozen, tensors)))


def kernel_operands(layers: list[QuantLinear]) -> Operands:
    """The CPU kernel's weight and scales for `layers` (quantized alike) side by side: the
    output features of the first, then the second's, and so on. lmforge's kernels read only
    their copy, so the layers' own tensors are paged out where they are a file's (see
    `lmforge.allocator.page_out`): int4 SmolLM2-135M's peak RSS decoding went from 475 to 376 MB."""
    def joined(name: str) -> torch.Tensor:
        tensors = [getattr(layer, name) for layer in layers]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    first = layers[0]
    ours = first.weight.device.type == "cpu" and kernels.supports(first.in_features,
                                                                   first.group_size)
    if not ours:
        if first.bits == 8:
            return Operands.of(False, (_aligned(joined("weight")),
                                       _aligned(joined("scales").to(SCALE_DTYPE))))
        return Operands.of(False, _int4_kernel_operands(joined("weight"), joined("scales"),
                                                        joined("zeros"), first.group_size))
    if first.bits == 8:
        operands = kernels.int8_operands(joined("weight"), joined("scales"))
    else:
        operands = kernels.int4_operands(joined("weight"), joined("scales"), joined("zeros"),
                                         first.group_size)
    page_out(t for layer in layers for t in layer.buffers())
    return Operands.of(True, operands)


def kernel_matmul(x2d: torch.Tensor, operands: Operands, bits: int, group_size: int | None,
                  out_features: int) -> torch.Tensor:
    """x2d (M, K) times the weight the operands hold (M, out_features): by lmforge's kernels
    in float32, or by PyTorch's in bfloat16."""
    if operands.ours:
        y = kernels.matmul(x2d, operands.tensors)
        return y if y.shape[1] == out_features else y[:, :out_features]  # the tiles' padded outputs
    weight, scales = operands.tensors
    # a fresh copy: PyTorch's kernels need 64-byte aligned operands (see `_aligned`), and
    # new tensors are; a compiled step cannot check an address
    x2d = x2d.to(SCALE_DTYPE, copy=True)
    if bits == 8:
        return torch._weight_int8pack_mm(x2d, weight, scales)
    # The kernel wants whole groups: a short last group is padded with zero inputs. (Skipping
    # this and the slice below when they do nothing: int4 SmolLM2 decodes 10% faster.)
    if x2d.shape[1] % group_size:
        x2d = F.pad(x2d, (0, -x2d.shape[1] % group_size))
    y = torch._weight_int4pack_mm_for_cpu(x2d, weight, group_size, scales)
    return y if y.shape[1] == out_features else y[:, :out_features]  # rows padded for the kernel


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it that starts on a 64-byte boundary. The int8 kernel crashes on
    operands that do not (a tensor read from a safetensors file, a row of a bigger tensor);
    PyTorch allocates on such boundaries."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _int4_kernel_operands(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU kernel's packed weight and (groups, N, 2) scales-and-zeros, with the rows padded
    to a multiple of 16 (the extra outputs are zeros, dropped after the matmul) and the columns
    to whole groups (they meet zero inputs)."""
    pad = -packed.shape[0] % INT4_ROWS
    q = unpack_int4(packed)
    q = F.pad(q, (0, -q.shape[1] % group_size, 0, pad)).to(torch.int32)
    scales_and_zeros = torch.stack([F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))],
                                   dim=-1)
    # The CPU kernel ignores inner_k_tiles (a tiling parameter of the CUDA layout).
    return (torch._convert_weight_to_int4pack_for_cpu(q, 2),
            scales_and_zeros.transpose(0, 1).contiguous().to(SCALE_DTYPE))


# ------------------------------------------------------------------------- the model


def require_float(model: Decoder | VLM, where: str, action: str) -> None:
    """Refuse a quantized model for work that needs float weights (e.g. export)."""
    spec = quantization_of(model)
    if spec is not None:
        raise UnsupportedModel(f"{where} has {spec.describe()} weights; {action} needs the "
                               "float model it was quantized from")


def quantization_of(model: Decoder | VLM) -> QuantSpec | None:
    """How `model` is quantized; None for a float model."""
    return getattr(decoder_of(model), "quantization", None)


def quantize(model: Decoder | VLM, spec: QuantSpec) -> Decoder | VLM:
    """Quantize every Linear layer of `model`'s decoder in place (and return `model`)."""
    return replace_linears(model, spec, lambda linear, bits, group_size:
                            QuantLinear.from_linear(linear, bits, group_size, spec.symmetric))


def prepare_quantized(model: Decoder | VLM, spec: QuantSpec) -> Decoder | VLM:
    """Swap in empty QuantLinear layers (e.g. on the meta device) for a saved quantized
    model's weights to be loaded into."""
    return replace_linears(model, spec, lambda linear, bits, group_size: QuantLinear(
        linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None))


def decoder_of(model: Decoder | VLM) -> Decoder:
    """The part of `model` that is quantized: a vision-language model's decoder (see the
    module docstring), or the model."""
    return model.text if isinstance(model, VLM) else model


def replace_linears(model: Decoder | VLM, spec: QuantSpec, make) -> Decoder | VLM:
    if isinstance(model, VLM):
        replace_linears(model.text, spec, make)
        model.cfg = dataclasses.replace(model.cfg, text=model.text.cfg)
        return model
    check_quantizable(model, spec)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, layer in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(layer, *spec.layer(name)))
    if model.cfg.tie_embeddings:
        model.embed = TiedEmbedding(model.lm_head)
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.fused = KernelGroup.of([attn.q_proj, attn.k_proj, attn.v_proj])
        if mlp.gate_proj is not None:
            mlp.fused = KernelGroup.of([mlp.gate_proj, mlp.up_proj])
    model.quantization = spec
    return model


def check_quantizable(model: Decoder | VLM, spec: QuantSpec) -> None:
    """Refuse, before any work, a model that is already quantized or has a layer of odd
    width (two int4 values share a byte)."""
    model = decoder_of(model)
    if quantization_of(model) is not None:
        raise QuantizationError("this model is already quantized: quantize its float "
                                "original instead")
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            if spec.layer(name)[0] != 8 and layer.in_features % 2:
                raise QuantizationError(f"{name} has {layer.in_features} input features, an "
                                        "odd number, which the int4 layout cannot pack: use "
                                        "8 bits")


def _shape_for_saved(model: nn.Module, directory: Path) -> None:
    prepare_quantized(model, QuantSpec.load(directory))


def _save_spec(model: nn.Module, directory: Path) -> None:
    spec = quantization_of(model) if isinstance(model, Decoder | VLM) else None
    if spec is not None:
        spec.save(directory)
    else:  # a float model saved over a quantized one must not be read as quantized
        (directory / QUANTIZATION).unlink(missing_ok=True)


register_hook(DirectoryHook(QUANTIZATION, before_weights=_shape_for_saved, on_save=_save_spec))
