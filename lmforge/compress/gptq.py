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

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lmforge.compress.quant import (
    SCALE_DTYPE,
    Rounded,
    int4_grid,
    int4_levels,
    int8_scales,
    n_groups,
    pack_int4,
)

BLOCK = 128  # columns updated together: a multiple of every group size
HESSIAN_ROWS = 1024  # input rows multiplied in float32 before their sum joins the float64 total
HESSIAN_COLUMNS = 512  # the side of the blocks of H multiplied at once


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X (float64, K x K) of a layer's inputs (..., K): the sum over every row.

    Products of float32 rows, HESSIAN_ROWS at a time, are summed in float64: twice as fast as
    float64 throughout, and no long float32 sum. Only the blocks on and above the diagonal
    are multiplied (H is symmetric), HESSIAN_COLUMNS columns a side: a third less work for
    1,536 columns."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    k = x.shape[1]
    h = torch.zeros(k, k, dtype=torch.float64)
    edges = list(range(0, k, HESSIAN_COLUMNS)) + [k]
    spans = list(zip(edges, edges[1:]))
    for rows in x.split(HESSIAN_ROWS):
        for i, (a, b) in enumerate(spans):
            for c, d in spans[i:]:
                h[a:b, c:d] += rows[:, a:b].T @ rows[:, c:d]
    upper = torch.ones(len(spans), len(spans), dtype=torch.bool).triu(1)
    for i, j in upper.nonzero().tolist():
        (a, b), (c, d) = spans[i], spans[j]
        h[c:d, a:b] = h[a:b, c:d].T
    return h


class Hessians:
    """`hessian` of the last input seen: the layers that read one input (q, k and v; gate and
    up) share its statistics."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, hessian(x))
        return self._last[1]


def without_dead_inputs(weight: torch.Tensor, h: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of `weight` and `h` where an input that is always zero (its weights
    never matter) has zero weights and a unit diagonal, so H can be inverted."""
    w, h = weight.detach().double().clone(), h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1: row j holds how
    removing column j's error moves the columns after it. The dampening keeps the
    factorisation stable when some inputs are (nearly) constant."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the column loops on one thread: they are thousands of small operations, which
    cost more to split over threads than they save (GPTQ of a 576 x 1536 weight: 2.4 s on
    one thread, 41 s on two of a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def gptq(weight: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None,
         damp: float = 0.01, act_order: bool = False, symmetric: bool = False) -> Rounded:
    """`weight` (N, K) rounded by GPTQ against the input statistics `h` (K, K, see `hessian`)
    to `bits` (8: per output row; 4 or 3: per group of `group_size` columns), with `damp`
    (see `inverse_factor`)."""
    w, h = without_dead_inputs(weight, h)
    n, k = w.shape
    static = None
    if bits == 8:
        static = (int8_scales(w), None)
    elif act_order:
        static = int4_grid(w, group_size, bits, symmetric)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    hinv = inverse_factor(h, damp)

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
            block[:, i + 1:].addr_(errors[:, i], hblock[i, i + 1:], alpha=-1)  # in place
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
