"""Building blocks of a Transformer: norms, rotary positions, attention with a KV cache, MLPs.

Everything here is shape-generic and knows nothing about training or files; the models in
`lmforge.models` assemble these pieces from a `ModelConfig`.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress import kernels
from lmforge.config import ModelConfig


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def rotary_tables(head_dim: int, length: int, base: float, start: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each (length, head_dim), of positions start..start+length,
    for the half-split rotary convention.

    The sin table's first half is negated so that rotating the two halves of a vector is one
    `roll` (see `apply_rotary`), which saves three small ops per call when decoding.
    """
    # Always computed on the CPU (in fp32), whatever device a model is being built on.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
                               / head_dim))
    positions = torch.arange(start, start + length, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


# Rotary tables are made this many positions at a time, each block alike whenever it is made:
# a position's entries do not depend on how far the tables had grown.
ROTARY_BLOCK = 4096


def _rotary_blocks(head_dim: int, base: float, start: int, stop: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = [rotary_tables(head_dim, min(ROTARY_BLOCK, stop - first), base, first)
              for first in range(start, stop, ROTARY_BLOCK)]
    return torch.cat([cos for cos, _ in blocks]), torch.cat([sin for _, sin in blocks])


def register_rotary(module: nn.Module, head_dim: int, length: int, base: float,
                    device: torch.device | str, prefix: str = "rope") -> None:
    """Give `module` rotary tables of `length` positions as buffers `{prefix}_cos` /
    `{prefix}_sin`: derived from the config, never saved (rebuilt after a model is
    materialised from the meta device)."""
    cos, sin = _rotary_blocks(head_dim, base, 0, length)
    module.register_buffer(f"{prefix}_cos", cos.to(device), persistent=False)
    module.register_buffer(f"{prefix}_sin", sin.to(device), persistent=False)


def extend_rotary(module: nn.Module, head_dim: int, length: int, base: float,
                  prefix: str = "rope") -> None:
    """Grow `module`'s rotary tables (see `register_rotary`, whole blocks of positions) to at
    least `length` positions, in their device and dtype."""
    cos, sin = getattr(module, f"{prefix}_cos"), getattr(module, f"{prefix}_sin")
    if length <= cos.shape[0]:
        return
    more_cos, more_sin = _rotary_blocks(head_dim, base, cos.shape[0],
                                        -(-length // ROTARY_BLOCK) * ROTARY_BLOCK)
    module.register_buffer(f"{prefix}_cos", torch.cat([cos, more_cos.to(cos)]), persistent=False)
    module.register_buffer(f"{prefix}_sin", torch.cat([sin, more_sin.to(sin)]), persistent=False)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The original Transformer's fixed position table (length, dim): sin on even features,
    cos on odd ones, wavelengths from 2 pi to 10000 * 2 pi."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; cos/sin from `rotary_tables`, broadcastable to x.

    x * cos + [-x2, x1] * sin, with [-x2, x1] * sin written as roll(x) * signed sin.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


@dataclass(frozen=True)
class Positions:
    """Where the tokens of one forward pass sit in their sequences.

    Either every row starts at the same `start` (training, a prompt, one sequence decoding),
    or each row has its own positions in `index` (B, T): sequences of different lengths
    decoding together. `end` is one past the furthest position, so attention reads the
    first `end` cached positions. `slots`: where the positions go in a paged cache, their
    blocks and places in them (each B * T, row by row), found once for all layers.
    """

    start: int
    end: int
    index: torch.Tensor | None = None
    slots: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, start: int | torch.Tensor, length: int, end: int | None = None) -> Positions:
        """end: how many cache positions attention reads when rows have their own starts;
        by default one past the furthest, a fixed number keeps shapes static (compiled)."""
        if isinstance(start, int):
            return cls(start, start + length)
        index = start.view(-1, 1) + torch.arange(length, device=start.device)
        return cls(0, int(index.max()) + 1 if end is None else end, index)

    def rows(self, batch: int) -> torch.Tensor:
        """Each row's positions (batch, T)."""
        if self.index is not None:
            return self.index
        return torch.arange(self.start, self.end).expand(batch, self.end - self.start)

    def lengths(self) -> torch.Tensor:
        """How many positions each row's last query sees (causally): one per row, or none
        when all rows see all `end`."""
        return kernels.NOTHING if self.index is None else self.index[:, -1] + 1

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:
            return cos[self.start:self.end], sin[self.start:self.end]
        return cos[self.index].unsqueeze(1), sin[self.index].unsqueeze(1)  # (B, 1, T, D)

    def mask(self, length: int, device: torch.device, window: int | None = None
             ) -> torch.Tensor | None:
        """Boolean attention mask (True = may attend) for `length` queries, or None when
        SDPA's is_causal (or no mask at all, for one query) is right.

        A row's query at position p sees keys 0..p, or with a sliding `window` the last
        `window` of them, p - window + 1..p. When every row starts together, SDPA's is_causal
        covers a whole sequence and a single new token may see everything; only a chunk after
        cached positions, rows at different positions, or a window that leaves out the first
        keys need a mask.
        """
        keys = torch.arange(self.end, device=device)
        if self.index is not None:
            queries = self.index[:, None, :, None]  # (B, 1, T, end)
        else:
            if (length == 1 or self.start == 0) and (window is None or self.end <= window):
                return None
            queries = torch.arange(self.start, self.end, device=device)[:, None]
        seen = keys <= queries
        return seen if window is None else seen & (keys > queries - window)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """`t` itself (no copy) as a Parameter that wants no gradient, for the tensors a compiled
    decode step reads beside the model's parameters: the KV cache and the int kernels' weights.
    Dynamo checks every tensor a step reads that is not a Parameter at every call, even when
    told to skip its guards (`skip_guard_eval_unsafe`); for int4 SmolLM2 these checks were 0.8
    ms of a 4.6 ms compiled step."""
    return nn.Parameter(t, requires_grad=False)


def layer_views(k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values: views of the first dimension of `k` and `v`, made once
    (indexing the big tensors every step costs time)."""
    return [(frozen(k_i), frozen(v_i)) for k_i, v_i in zip(k.unbind(0), v.unbind(0))]


class KVCache:
    """Keys and values of every layer for `batch` sequence slots of `length` positions,
    written in place as decoding goes. Each slot holds one sequence from position 0; `resize`
    reallocates (the engine grows a cache as its sequences need it)."""

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layer, batch, n_kv_head, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = length
        # Attend over every position (masked) instead of the furthest one used: static shapes
        # for a compiled decode step, at the price of reading the whole cache.
        self.static = False
        self.layers = layer_views(self.k, self.v)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory the cache holds."""
        return self.k.nbytes + self.v.nbytes

    def resize(self, batch: int, length: int) -> None:
        """Hold `batch` slots of `length` positions from now on, keeping the cached keys and
        values that fit (views from `rows` no longer follow this cache)."""
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        shape = (n_layer, batch, n_kv_head, length, head_dim)
        self.k, self.v = resized(self.k, shape), resized(self.v, shape)
        self.length = length
        self.layers = layer_views(self.k, self.v)

    def rows(self, first: int, count: int = 1) -> KVCache:
        """A cache over slots first..first+count, sharing this one's memory."""
        view = object.__new__(type(self))
        view.k, view.v = self.k[:, first:first + count], self.v[:, first:first + count]
        view.length, view.static = self.length, self.static
        view.layers = layer_views(view.k, view.v)
        return view


class PagedLayer(NamedTuple):
    """One layer of a `PagedKVCache`: its blocks of keys and values (blocks, block, Hkv, D)
    and the block table (rows, blocks a row) they share with the other layers."""

    k: torch.Tensor
    v: torch.Tensor
    table: torch.Tensor


class PagedKVCache:
    """Keys and values of every layer in blocks of `block` positions, taken from one pool as
    sequences grow and given back when they end (paged attention, Kwon et al. 2023): the
    memory follows the positions in use, not slots x length. Row r's j-th block is
    `table[r, j]`. Block 0 is never handed out: the rows of free slots point there, so that a
    step over every slot (a compiled one) writes their unused positions somewhere harmless.
    `length`: the most positions a row may reach."""

    def __init__(self, n_layer: int, slots: int, n_kv_head: int, length: int, head_dim: int,
                 block: int, dtype: torch.dtype, device: torch.device | str,
                 blocks: int = 0) -> None:
        self.block, self.length, self.static = block, length, False
        self.table = torch.zeros(slots, -(-length // block), dtype=torch.long, device=device)
        # a position's heads side by side: storing a step's keys is one indexed copy a layer
        shape = (n_layer, 1 + blocks, block, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.owned: list[list[int]] = [[] for _ in range(slots)]
        self.free = list(range(blocks, 0, -1))  # popped from the end: lowest ids first
        self._layers()

    def _layers(self) -> None:
        self.layers = [PagedLayer(k, v, self.table) for k, v in layer_views(self.k, self.v)]

    @property
    def batch(self) -> int:
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.table.nbytes

    @property
    def block_bytes(self) -> int:
        return 2 * self.k[:, :1].nbytes

    def place(self, pos: Positions, batch: int) -> Positions:
        """`pos` with the `slots` its positions take in this cache's blocks."""
        rows = pos.rows(batch).to(self.table.device)
        blocks = self.table.gather(1, rows // self.block)
        return replace(pos, slots=(blocks.reshape(-1), (rows % self.block).reshape(-1)))

    def missing(self, slot: int, end: int) -> int:
        """Blocks row `slot` still needs to hold positions 0..end-1."""
        return max(0, -(-end // self.block) - len(self.owned[slot]))

    def reserve(self, slot: int, end: int) -> None:
        """Give row `slot` the blocks it needs to hold positions 0..end-1, growing the pool
        by half (at least) when it runs out."""
        needed = self.missing(slot, end)
        if needed > len(self.free):
            self.grow(max(needed - len(self.free), self.k.shape[1] // 2))
        owned = self.owned[slot]
        new = [self.free.pop() for _ in range(needed)]
        if new:
            self.table[slot, len(owned):len(owned) + needed] = torch.tensor(new)
            owned += new

    def release(self, slot: int) -> None:
        """Row `slot`'s blocks back to the pool (the row points to block 0 again)."""
        if self.owned[slot]:
            self.free += reversed(self.owned[slot])
            self.owned[slot] = []
            self.table[slot] = 0

    def grow(self, blocks: int) -> None:
        """`blocks` more blocks in the pool (views from `rows` no longer follow this cache)."""
        n_layer, total, *rest = self.k.shape
        shape = (n_layer, total + blocks, *rest)
        self.k, self.v = resized(self.k, shape), resized(self.v, shape)
        self.free = list(range(total + blocks - 1, total - 1, -1)) + self.free
        self._layers()

    def empty(self) -> None:
        """Give all memory back but block 0 (every row must have been released)."""
        if any(self.owned):
            raise RuntimeError("rows still hold blocks")
        self.k, self.v = self.k[:, :1].clone(), self.v[:, :1].clone()
        self.free = []
        self._layers()

    def rows(self, first: int, count: int = 1) -> PagedKVCache:
        """A cache over rows first..first+count, sharing this one's blocks and table."""
        view = object.__new__(type(self))
        view.block, view.length, view.static = self.block, self.length, self.static
        view.k, view.v, view.table = self.k, self.v, self.table[first:first + count]
        view.owned, view.free = self.owned[first:first + count], self.free
        view._layers()
        return view


def resized(t: torch.Tensor, shape: tuple[int, ...], fill: float = 0) -> torch.Tensor:
    """A new tensor of `shape` holding `t`'s values where the two overlap, `fill` elsewhere."""
    out = t.new_full(shape, fill)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape))
    out[overlap] = t[overlap]
    return out


def write_cache(layer: tuple[torch.Tensor, torch.Tensor] | PagedLayer, k: torch.Tensor,
                v: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Store k, v (B, Hkv, T, D) at their positions; return the first pos.end cached ones."""
    if isinstance(layer, PagedLayer):
        store_paged(layer, k, v, pos)
        return read_paged(layer.k, layer.table, pos.end), read_paged(layer.v, layer.table, pos.end)
    cache_k, cache_v = layer
    if pos.index is None:
        cache_k[:, :, pos.start:pos.end] = k
        cache_v[:, :, pos.start:pos.end] = v
    else:
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        cache_k[rows, :, pos.index] = k.transpose(1, 2)
        cache_v[rows, :, pos.index] = v.transpose(1, 2)
    return cache_k[:, :, :pos.end], cache_v[:, :, :pos.end]


def store_paged(layer: PagedLayer, k: torch.Tensor, v: torch.Tensor, pos: Positions) -> None:
    """Store k, v (B, Hkv, T, D) in their rows' blocks, at `pos.slots`."""
    B, heads, T, dim = k.shape
    # into the layer's tensor itself: a compiled step writes through a view of it by copying
    # the whole pool back
    layer.k.index_put_(pos.slots, k.transpose(1, 2).reshape(B * T, heads, dim).to(layer.k.dtype))
    layer.v.index_put_(pos.slots, v.transpose(1, 2).reshape(B * T, heads, dim).to(layer.v.dtype))


def read_paged(blocks: torch.Tensor, table: torch.Tensor, end: int) -> torch.Tensor:
    """Each row's first `end` positions (B, Hkv, end, D) from its blocks (a copy)."""
    size, heads, dim = blocks.shape[1:]
    n = -(-end // size)
    rows = blocks[table[:, :n]]  # (B, n, block, Hkv, D)
    return rows.reshape(-1, n * size, heads, dim)[:, :end].transpose(1, 2)


def decode_cached(layer: tuple[torch.Tensor, torch.Tensor] | PagedLayer, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, pos: Positions, scale: float | None,
                  window: int | None) -> torch.Tensor:
    """A decoding step's attention (B, H, 1, D) on lmforge's CPU kernel: k, v stored at
    their positions, q attending over each row's own."""
    if isinstance(layer, PagedLayer):
        store_paged(layer, k, v, pos)
        return kernels.decode_attention(q, layer.k.transpose(1, 2), layer.v.transpose(1, 2),
                                        pos.lengths(), layer.table, pos.end, scale, window)
    k, v = write_cache(layer, k, v, pos)
    return kernels.decode_attention(q, k, v, pos.lengths(), end=pos.end, scale=scale,
                                    window=window)


def project(x: torch.Tensor, layers: tuple[nn.Module, ...], fused: Callable | None
            ) -> tuple[torch.Tensor, ...]:
    """Each of `layers` applied to x: in one call through `fused` where it takes this input
    (it returns None where it does not), else one by one."""
    out = fused(x, layers) if fused is not None else None
    return out if out is not None else tuple(layer(x) for layer in layers)


@functools.cache
def onednn_products() -> bool:
    """Whether float32 products on this CPU go through oneDNN rather than PyTorch's default,
    MKL, which keeps to its AVX2 code on AMD CPUs where oneDNN takes their AVX-512: on a 2-core
    Zen 5, a decoder's products 1.5-3.5x faster, and with their gradients 1.6-2x
    (`benchmarks/products.py`). x86 only, where PyTorch is built with oneDNN;
    `LMFORGE_ONEDNN=0` keeps PyTorch's default."""
    return (os.environ.get("LMFORGE_ONEDNN", "1") != "0"
            and platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x W^T (+ bias) on oneDNN: x (..., K), weight (N, K), either of any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` whose gradients are oneDNN products too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = _product(grad, weight.t()) if wants_x else None
        grad_weight = _product(rows.t(), x.reshape(-1, x.shape[-1]).t()) if wants_weight else None
        grad_bias = rows.sum(0) if wants_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for float32 on the CPU (see `onednn_products`), gradients
    included: a prompt's products, scoring, training. Plain, non-empty tensors only (not
    autocast's, a compiled graph's or a sharded parameter's: the compiler takes oneDNN's
    product for frozen weights alone; oneDNN refuses a product over nothing)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter)
            or x.numel() == 0 or weight.numel() == 0
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or not onednn_products()):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose product for the few rows of a decoding step (float32, on a CPU, no
    gradient asked for) runs on lmforge's kernel, which reads each weight once for up to 8
    rows where PyTorch's product slows down past two: SmolLM2 decoding 8 sequences at once
    steps 1.4x faster (`kernels.float_matmul`); more rows go through `linear`. Saved, loaded
    and adapted as `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if (x2d.shape[0] > kernels.MAX_ROWS or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or not self.weight.is_contiguous() or not kernels.available()):
            return linear(x, self.weight, self.bias)
        y = kernels.float_matmul(x2d, self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    """Self-attention with grouped key/value heads (MHA, GQA, MQA) through SDPA: causal, or
    over every position (`causal=False`, a vision encoder's patches). `window`: the layer's
    sliding window, which its mask carries; a decoding step on the CPU reads it here, as it
    attends through lmforge's kernel (`kernels.decode_attention`) rather than SDPA and a mask."""

    def __init__(self, cfg: ModelConfig, causal: bool = True, window: int | None = None) -> None:
        super().__init__()
        self.causal, self.window = causal, window
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = cfg.attn_scale
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = Linear(cfg.d_model, q_dim, bias=qkv_bias)
        self.k_proj = Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.o_proj = Linear(q_dim, cfg.d_model, bias=cfg.bias)
        # One call for q, k and v (a quantized model's `KernelGroup`), where one is set.
        self.fused: Callable | None = None
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                pos: Positions, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.fused)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None and T == 1 and decodes_on_kernel(q, cache[0]):
            y = decode_cached(cache, q, k, v, pos, self.scale, self.window)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:  # which may hold its values in another dtype (`Engine`'s kv_dtype)
            k, v = (t.to(q.dtype) for t in write_cache(cache, k, v, pos))
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=self.causal and mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel's cache types


def decodes_on_kernel(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a decoding step's attention runs on lmforge's CPU kernel: float32 queries on the
    CPU over a float32, bfloat16 or float16 cache, no gradient asked for, the kernels built."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype in CACHE_DTYPES
            and not q.requires_grad and kernels.available())


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output (`memory`), which
    are computed once per sequence and reused at every decoding step."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.o_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def memory(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of the encoder's output."""
        return self._heads(self.k_proj(encoded)), self._heads(self.v_proj(encoded))

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor) -> torch.Tensor:
        """key_mask: (B, 1, 1, S), True where the source has a token (not padding)."""
        B, T, _ = x.shape
        y = F.scaled_dot_product_attention(
            self._heads(self.q_proj(x)), *memory, attn_mask=key_mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    """Feed-forward block: GELU (GPT-2's tanh approximation, or exact), ReLU (the original
    Transformer), ReLU squared, or gated: SwiGLU (Llama) and GeGLU (Gemma, tanh GELU)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.up_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.gate_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias) if cfg.mlp in GATED else None
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.fused: Callable | None = None  # one call for gate and up, as in `Attention`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            gate, h = project(x, (self.gate_proj, self.up_proj), self.fused)
        else:
            h = self.up_proj(x)
        if self.kind == "swiglu":
            h = F.silu(gate) * h
        elif self.kind == "geglu":
            h = F.gelu(gate, approximate="tanh") * h
        elif self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "relu":
            h = F.relu(h)
        elif self.kind == "gelu-exact":
            h = F.gelu(h)  # nanoGPT's; on a CPU twice as fast as the approximation
        else:
            # The tanh approximation is what GPT-2 was trained with.
            h = F.gelu(h, approximate="tanh")
        return self.down_proj(h)
