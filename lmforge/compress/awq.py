"""AWQ: activation-aware scales, so that rounding spares the weights that meet large inputs
(Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression").

A linear layer y = W x computes the same with W' = W diag(s) and x' = x / s. Scaling up the
columns that meet large inputs (s > 1) makes their weights relatively larger on their group's
grid, so rounding costs them less of what they contribute to y. The 1/s goes into whatever
makes x, where the graph allows it without changing the float model:
- the attention and MLP norms' weights (and biases), for q, k, v and for gate, up;
- v_proj's output rows, for o_proj (with grouped key/value heads, the query heads that share
  a value head share its scales);
- up_proj's output rows, for down_proj, when the MLP is gated (SwiGLU) or a plain ReLU,
  both of which commute with a positive scale; GELU and ReLU squared do not.

The scales are s = mean|x|^a per input channel, with a taken from a grid over [0, 1] (a = 0
is plain rounding to nearest, so AWQ never does worse on its objective) to minimise the
layers' output error on the calibration inputs, ||(Q(W s)/s - W) X||^2 =
tr(dW H dW^T), H = X^T X: the same statistics GPTQ uses, so the search costs a few small
matrix products per candidate however many calibration tokens there are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.gptq import hessian
from lmforge.compress.quant import round_to_nearest
from lmforge.config import ModelConfig

GRID = 20  # exponents tried, 0, 1/20, ... 19/20
CLIP_GRID = 20  # shares of each group's range tried for clipping, 1 down to 1/2
FOLDING_MLPS = ("swiglu", "relu")  # activations a positive scale passes through


@dataclass
class InputStats:
    """What AWQ needs of a layer's inputs: H = X^T X and the mean magnitude of each channel."""

    h: torch.Tensor
    magnitude: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> InputStats:
        return cls(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        self.h += hessian(x)
        self.magnitude += x.reshape(-1, x.shape[-1]).abs().sum(dim=0, dtype=torch.float64)
        self.rows += x.numel() // x.shape[-1]

    def mean_magnitude(self) -> torch.Tensor:
        return self.magnitude / max(self.rows, 1)


@dataclass(frozen=True)
class Grid:
    """The grid the block's layers will be rounded to."""

    bits: int
    group_size: int | None
    symmetric: bool = False

    def error(self, w: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> float:
        """Output error tr(dW H dW^T) of rounding `w` with columns scaled by `s`."""
        scaled = round_to_nearest(w * s, self.bits, self.group_size, self.symmetric)
        dw = scaled.dequantized() / s - w
        return float(((dw @ h) * dw).sum())


def search_scales(weights: list[torch.Tensor], stats: InputStats, grid: Grid,
                  heads: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The per-input-channel scales (K,) that minimise the rounding error of `weights` (each
    (N_i, K), all reading the inputs `stats` describes). `heads` = (value heads, query heads
    per value head, head width) ties the scales of o_proj's inputs that come from one value
    channel, since that channel's 1/s goes into one row of v_proj."""
    w = torch.cat([weight.detach().float() for weight in weights])
    h = stats.h.float()
    magnitude = stats.mean_magnitude().float()
    if heads is not None:
        magnitude = magnitude.reshape(*heads).mean(dim=1, keepdim=True)
    best, best_error = None, float("inf")
    for a in torch.arange(GRID) / GRID:
        s = magnitude.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1, so the scaled weights stay in range
        if heads is not None:
            s = s.expand(*heads)
        s = s.reshape(-1)
        error = grid.error(w, s, h)
        if error < best_error:
            best, best_error = s, error
    return best


@dataclass(frozen=True)
class ScaledBlock:
    """What `scale_block` did: the scales by the input they scale (attn: q, k, v's; o:
    o_proj's; mlp: gate and up's; down: down_proj's), and the statistics H of each Linear
    layer's input as the scales left it, H / (s s^T), for clipping."""

    scales: dict[str, torch.Tensor]
    inputs: dict[nn.Module, torch.Tensor]


def scale_block(block: nn.Module, cfg: ModelConfig, run: Callable[[], None], grid: Grid
                ) -> ScaledBlock:
    """Search AWQ scales for every place in `block` the graph allows (see the module
    docstring) on the calibration inputs `run()` sends through it, and fold them in: the
    block computes what it did."""
    attn, mlp = block.attn, block.mlp
    readers = {"attn": attn.q_proj, "o": attn.o_proj, "mlp": mlp.up_proj, "down": mlp.down_proj}
    stats = {key: InputStats.empty(linear.in_features) for key, linear in readers.items()}
    handles = [linear.register_forward_pre_hook(lambda _, args, key=key: stats[key].add(args[0]))
               for key, linear in readers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()

    scales = {}
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    scales["attn"] = search_scales([m.weight for m in qkv], stats["attn"], grid)
    _fold(scales["attn"], qkv, norm=block.attn_norm)

    heads = (cfg.n_kv_head, cfg.n_head // cfg.n_kv_head, cfg.head_dim)
    scales["o"] = search_scales([attn.o_proj.weight], stats["o"], grid, heads)
    _fold(scales["o"], [attn.o_proj], rows_of=attn.v_proj,
          row_scales=scales["o"].reshape(*heads)[:, 0].reshape(-1))

    ups = [mlp.gate_proj, mlp.up_proj] if mlp.gate_proj is not None else [mlp.up_proj]
    scales["mlp"] = search_scales([m.weight for m in ups], stats["mlp"], grid)
    _fold(scales["mlp"], ups, norm=block.mlp_norm)

    if cfg.mlp in FOLDING_MLPS:
        scales["down"] = search_scales([mlp.down_proj.weight], stats["down"], grid)
        _fold(scales["down"], [mlp.down_proj], rows_of=mlp.up_proj)

    readers = {"attn": qkv, "o": [attn.o_proj], "mlp": ups, "down": [mlp.down_proj]}
    inputs = {}
    for key, linears in readers.items():
        s = scales.get(key, torch.ones(linears[0].in_features)).double()
        for linear in linears:
            inputs[linear] = stats[key].h / (s[:, None] * s[None, :])
    return ScaledBlock(scales, inputs)


def clip_weights(weight: torch.Tensor, h: torch.Tensor, grid: Grid) -> torch.Tensor:
    """`weight` (N, K) with each group of each row clamped to the share of its range
    [r * min, r * max], r in [1/2, 1], that rounds with the least output error on inputs of
    statistics `h` (K, K): clipping a few outlying weights buys a finer grid for the rest.
    Each group is judged on its own (the diagonal block of H), so all are chosen at once."""
    w = weight.detach().float()
    n, k = w.shape
    size = grid.group_size
    pad = -k % size
    blocks = F.pad(h.float(), (0, pad, 0, pad)).reshape(-1, size, k // size + (pad > 0), size)
    blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (groups, size, size)
    padded = F.pad(w, (0, pad)).reshape(n, -1, size)
    low, high = padded.amin(dim=-1, keepdim=True), padded.amax(dim=-1, keepdim=True)
    best, best_error = padded, torch.full(padded.shape[:2], float("inf"))
    for r in torch.linspace(1, 0.5, CLIP_GRID):
        clipped = torch.minimum(torch.maximum(padded, r * low), r * high)
        q = round_to_nearest(clipped.reshape(n, -1)[:, :k], grid.bits, size, grid.symmetric)
        dw = F.pad(q.dequantized() - w, (0, pad)).reshape(n, -1, size)
        error = torch.einsum("ngi,gij,ngj->ng", dw, blocks, dw)
        better = error < best_error
        best = torch.where(better[..., None], clipped, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(n, -1)[:, :k].to(weight.dtype)


@torch.no_grad()
def _fold(s: torch.Tensor, linears: list[nn.Linear], norm: nn.Module | None = None,
          rows_of: nn.Linear | None = None, row_scales: torch.Tensor | None = None) -> None:
    """Scale the columns of `linears` by `s` and what feeds them by 1/s: `norm`'s weight and
    bias, or the output rows of `rows_of` (by `row_scales`, when they are fewer than s)."""
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))
    divide = [norm.weight, getattr(norm, "bias", None)] if norm is not None else [rows_of.bias]
    inverse = s if row_scales is None else row_scales
    if rows_of is not None:
        rows_of.weight.div_(inverse[:, None].to(rows_of.weight.dtype))
    for t in divide:
        if t is not None:
            t.div_(inverse.to(t.dtype))
