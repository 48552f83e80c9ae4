"""Building blocks of a Transformer: norms, rotary positions, attention with a KV cache, MLPs.

Everything here is shape-generic and knows nothing about training or files; the models in
`lmforge.models` assemble these pieces from a `ModelConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def rotary_tables(head_dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim), for the half-split rotary convention."""
    # Always computed on the CPU (in fp32), whatever device a model is being built on.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
                               / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; cos/sin are (T, D). Rotates the two halves of D."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of one layer, preallocated and written in place as decoding goes."""

    def __init__(self, batch: int, n_kv_head: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, n_kv_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions start..start+T; return everything so far."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (MHA, GQA, MQA) through SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(start, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=_decode_mask(T, k.shape[2], x.device),
            is_causal=T == k.shape[2] and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _decode_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Mask for queries that are the last q_len of k_len positions (a prefill after a cache).

    SDPA's is_causal aligns the mask to the top-left, which is only right when the queries
    start at position 0; one new token may see everything, so it needs no mask at all.
    """
    if q_len == k_len or q_len == 1:
        return None
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return rows >= torch.arange(k_len, device=device)[None, :]


class MLP(nn.Module):
    """Feed-forward block: GELU, ReLU squared, or the gated SwiGLU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * h
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            # The tanh approximation is what GPT-2 was trained with.
            h = F.gelu(h, approximate="tanh")
        return self.down_proj(h)
