"""GPTQ: weights rounded one column at a time, each column's rounding error spread over the
columns not yet rounded, in proportion to how the layer's inputs correlate (Frantar et al.
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For a linear layer y = W x with calibration inputs X, rounding W to Q costs
||(W - Q) X||^2 = tr((W - Q) H (W - Q)^T) with H = X X^T. Rounding column j and updating the
columns after it by -err_j * Hinv[j, j+1:] / Hinv[j, j] (Hinv the upper Cholesky factor of
H^-1) minimises that cost one column at a time. The updates are applied lazily, a block of
columns at a time, so most of the work is one matrix product per block.

The grid is lmforge's own (`lmforge.compress.quant`): int8 per output row, or int4 (and int3
in the int4 layout) per group of columns, so a GPTQ model is an ordinary quantized model
directory. A group's scale and zero come from its columns as they are when the first of them
is reached (after the updates from the columns before); with `act_order` the columns are
taken in order of decreasing H[j, j] and the grids come from the original weights, since a
group is then no longer rounded in one stretch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.compress.calib import through_blocks
from lmforge.compress.quant import (
    SCALE_DTYPE,
    QuantLinear,
    QuantSpec,
    check_quantizable,
    decoder_of,
    dequantize_int4,
    dequantize_int8,
    int4_grid,
    int4_levels,
    int8_scales,
    n_groups,
    pack_int4,
    replace_linears,
)
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM

BLOCK = 128  # columns updated together: a multiple of every group size


@dataclass(frozen=True)
class Rounded:
    """A weight on lmforge's grid: `values` int8 (N, K) for 8 bits, packed nibbles uint8
    (N, K/2) otherwise; `scales` (N,) or (N, groups) and `zeros` (N, groups) or None."""

    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None = None

    def dequantized(self) -> torch.Tensor:
        """float32 (N, K)."""
        if self.zeros is None:
            return dequantize_int8(self.values, self.scales)
        return dequantize_int4(self.values, self.scales, self.zeros, self.group_size)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """X X^T (in float64, K x K) of a layer's inputs (..., K): the sum over every row."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return x.T @ x


def gptq(weight: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None,
         damp: float = 0.01, act_order: bool = False, symmetric: bool = False) -> Rounded:
    """`weight` (N, K) rounded by GPTQ against the input statistics `h` (K, K, see `hessian`)
    to `bits` (8: per output row; 4 or 3: per group of `group_size` columns). `damp` adds that
    fraction of H's mean diagonal to the diagonal, which keeps the Cholesky factorisation
    stable when some inputs are (nearly) constant."""
    w = weight.detach().double().clone()
    n, k = w.shape
    h = h.double().clone()
    dead = h.diagonal() == 0  # an input that is always zero: its weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    static = None
    if bits == 8:
        static = (int8_scales(w), None)
    elif act_order:
        static = int4_grid(w, group_size, bits, symmetric)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.empty(n, k, dtype=torch.int16)
    scales, zeros = static if static is not None else (
        torch.empty(n, n_groups(k, group_size), dtype=SCALE_DTYPE),
        torch.empty(n, n_groups(k, group_size), dtype=SCALE_DTYPE))
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block, errors = w[:, start:end].clone(), torch.empty(n, end - start, dtype=w.dtype)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if static is None and column % group_size == 0:  # a new group starts here
                g = column // group_size
                s, z = int4_grid(block[:, i:i + group_size], group_size, bits, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            value, rounded = _round_column(block[:, i], column, bits, group_size, scales, zeros)
            q[:, start + i] = value
            errors[:, i] = (block[:, i] - rounded) / hblock[i, i]
            block[:, i:] -= errors[:, i:i + 1] * hblock[i, i:][None]
        w[:, end:] -= errors @ hinv[start:end, end:]

    values = torch.empty_like(q)
    values[:, order] = q
    if bits == 8:
        return Rounded(values.to(torch.int8), scales, None)
    return Rounded(pack_int4(values.to(torch.uint8)), scales, zeros, group_size)


def _round_column(w: torch.Tensor, column: int, bits: int, group_size: int | None,
                  scales: torch.Tensor, zeros: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored values of one column (N,) of the weight and what they stand for."""
    if bits == 8:
        scale = scales.double()
        value = torch.round(w / scale).clamp(-127, 127)
        return value.to(torch.int16), value * scale
    g = column // group_size
    scale, zero = scales[:, g].double(), zeros[:, g].double()
    value = (torch.round((w - zero) / scale) + 8).clamp(*int4_levels(bits))
    return value.to(torch.int16), (value - 8) * scale + zero


def gptq_quantize(model: Decoder | VLM, tokens: torch.Tensor, spec: QuantSpec,
                  damp: float = 0.01, act_order: bool = False, progress: bool = True
                  ) -> Decoder | VLM:
    """Quantize every Linear layer of `model`'s decoder by GPTQ on the calibration `tokens`
    (N, L), in place (and return `model`), as `lmforge.compress.quant.quantize` does by
    rounding to nearest.

    Sequential: the calibration set goes through the decoder a block at a time, and each
    layer is rounded the moment its input arrives (a pre-forward hook), so every layer sees
    the outputs of the layers already rounded, in the blocks before and in its own block;
    the layers that read the same input (q, k and v; gate and up) share its statistics."""
    check_quantizable(model, spec)
    decoder = decoder_of(model)
    rounded: dict[nn.Module, Rounded] = {}
    shared: list[torch.Tensor] = []  # the last input seen and its statistics

    def round_on_entry(name: str):
        bits, group_size = spec.layer(name)

        def hook(linear: nn.Linear, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if not shared or shared[0] is not x:
                shared[:] = [x, hessian(x)]
            rounded[linear] = gptq(linear.weight, shared[1], bits, group_size, damp, act_order,
                                   spec.symmetric)
            linear.weight.data = rounded[linear].dequantized().to(linear.weight.dtype)
        return hook

    handles = []

    def before_block(i: int, block: nn.Module) -> None:
        handles.extend(linear.register_forward_pre_hook(round_on_entry(f"blocks.{i}.{name}"))
                       for name, linear in block.named_modules() if isinstance(linear, nn.Linear))

    try:
        features = through_blocks(decoder, tokens, before_block, batch_size=len(tokens),
                                  progress=progress, desc="GPTQ")
    finally:
        for handle in handles:
            handle.remove()
    # The output projection is rounded but left as it is: it may be the embedding's weight.
    bits, group_size = spec.layer("lm_head")
    rounded[decoder.lm_head] = gptq(decoder.lm_head.weight, hessian(features), bits,
                                    group_size, damp, act_order, spec.symmetric)
    return replace_linears(model, spec, lambda linear, bits, group_size: QuantLinear.from_values(
        linear, bits, group_size, rounded[linear]))
