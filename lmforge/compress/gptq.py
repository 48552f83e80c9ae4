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
    round_int4,
    round_int8,
)

BLOCK = 128  # columns updated together: a multiple of every group size
HESSIAN_ROWS = 4096  # input rows multiplied in float32 before their sum joins the float64 total
HESSIAN_COLUMNS = 512  # the side of the blocks of H multiplied at once


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X (float64, K x K) of a layer's inputs (..., K): the sum over every row.

    Products of float32 rows, HESSIAN_ROWS at a time, are summed in float64: twice as fast as
    float64 throughout, and no long float32 sum (on 65,536 rows of 1,536 features: 2e-8 of
    the exact X^T X, against 3e-7 for one float32 product; chunks of 1,024 rows cost a fifth
    more time for 1e-8). Only the blocks on and above the diagonal
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
    """The upper Cholesky factor R of (H + damp * mean(diag H) * I)^-1 = R^T R: row j holds
    how removing column j's error moves the columns after it. The dampening keeps the
    factorisation stable when some inputs are (nearly) constant.

    With J the matrix that reverses the order and L L^T = J H J, H^-1 = (J L^-1 J)^T (J L^-1
    J), and J L^-1 J is upper triangular: one factorisation and one triangular solve in
    place of two factorisations and an inverse (1,536 columns: 0.22 s against 0.25 s)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h.flip(0, 1))
    identity = torch.eye(len(h), dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)


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
    if bits == 8:
        scales, zeros = int8_scales(w)[:, None], None
    elif act_order:
        scales, zeros = int4_grid(w, group_size, bits, symmetric)
    else:  # each group's grid is set when its first column is reached
        scales = torch.empty(n, n_groups(k, group_size), dtype=SCALE_DTYPE)
        zeros = torch.empty_like(scales)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    # Transposed, so that each column of the weight is a contiguous row here.
    w, h = w.T[order].contiguous(), h[order][:, order]
    hinv = inverse_factor(h, damp)
    # Levels relative to the zero: a column rounds to clamp(round((w - zero) / scale)) * scale
    # + zero, and its stored values are read back from the result at the end.
    lowest, highest = (-127, 127) if bits == 8 else tuple(v - 8 for v in int4_levels(bits))
    group_of = order // group_size if bits != 8 else torch.zeros(k, dtype=torch.long)
    fixed = bits == 8 or act_order

    rounded = torch.empty(k, n, dtype=w.dtype)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block, errors = w[start:end].clone(), torch.empty(end - start, n, dtype=w.dtype)
        hblock = hinv[start:end, start:end]
        step = hblock.diagonal().tolist()
        if fixed:  # every column's grid, in the order the columns are taken
            grids = _column_grids(scales, zeros, group_of[start:end])
        else:
            grids = torch.empty(2, end - start, n, dtype=w.dtype)
        for i in range(end - start):
            if not fixed and i % group_size == 0:  # a new group starts here
                s, z = int4_grid(block[i:i + group_size].T, group_size, bits, symmetric)
                g = (start + i) // group_size
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
                grids[:, i:i + group_size] = torch.stack([s.T, z.T]).double()
            scale, zero, column = grids[0, i], grids[1, i], block[i]
            value = ((column - zero) / scale).round_().clamp_(lowest, highest)
            value = value.mul_(scale).add_(zero)
            rounded[start + i] = value
            errors[i] = (column - value) / step[i]
            block[i + 1:].addr_(hblock[i, i + 1:], errors[i], alpha=-1)  # in place
        w[end:] -= hinv[start:end, end:].T @ errors

    dequantized = rounded[torch.argsort(order)].T  # in the weight's own column order
    if bits == 8:
        return Rounded(round_int8(dequantized, scales[:, 0]), scales[:, 0], None)
    values = round_int4(dequantized, scales, zeros, group_size, bits)
    return Rounded(pack_int4(values), scales, zeros, group_size)


def _column_grids(scales: torch.Tensor, zeros: torch.Tensor | None, groups: torch.Tensor
                  ) -> torch.Tensor:
    """(2, len(groups), N) float64: the scale and zero of each column, whose groups are
    `groups`."""
    scale = scales[:, groups].T.double()
    zero = torch.zeros_like(scale) if zeros is None else zeros[:, groups].T.double()
    return torch.stack([scale, zero])
