"""The decoder-only Transformer: GPT-2 and Llama-style models from one definition.

Choices, all set by `ModelConfig`:
- pre-norm residual blocks, LayerNorm (GPT-2) or RMSNorm (Llama);
- learned absolute positions (GPT-2) or rotary positions with a configurable base (Llama);
- attention through `scaled_dot_product_attention`, with grouped key/value heads, an
  optional QK-norm and an optional sliding window (a mask) on every layer or on some, those
  with a rotary base of their own (Gemma 3); a KV cache;
- MLP: GELU, SwiGLU, GeGLU or ReLU squared; optional norms on the attention and MLP outputs
  before they join the residual stream (Gemma's "sandwich");
- input embedding tied to the output projection, or not, optionally scaled by sqrt(d_model);
- init: normal(0, init_std), with residual output projections scaled by 1/sqrt(2 * layers)
  so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).

The model returns logits; losses belong to the training task, not to the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import FlopsReport, ModelConfig, count_flops
from lmforge.layers import (
    MLP,
    ROTARY_BLOCK,
    Attention,
    KVCache,
    Linear,
    PagedKVCache,
    Positions,
    extend_rotary,
    make_norm,
    register_rotary,
)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool = True, window: int | None = None) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, causal, window)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg)
        post = cfg.post_norms
        self.attn_post_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if post else None
        self.mlp_post_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if post else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary, pos: Positions, mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rotary, pos, mask, cache)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + self.dropout(h)
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + self.dropout(h)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.positions == "learned" else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, window=cfg.sliding_window if cfg.windowed(i) else None)
            for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # trade compute for activation memory when training
        # Which layers slide the window, and whether those turn by a rotary base of their own:
        # fixed by the config, read at every forward pass.
        self.windowed = [cfg.windowed(i) for i in range(cfg.n_layer)]
        self.local_rotary = cfg.positions == "rope" and any(self.windowed) and \
            cfg.rope_local_base not in (None, cfg.rope_base)
        self.tie_weights()
        self.reset_buffers()
        self.reset_parameters()

    def tie_weights(self) -> None:
        # (a quantized model's tied embedding reads the output projection's rows itself)
        if self.cfg.tie_embeddings and isinstance(self.embed, nn.Embedding):
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Rotary tables: derived from the config, never saved (so they are rebuilt after
        a model is materialised from the meta device). Made for the first ROTARY_BLOCK
        positions, and grown as sequences reach further (`cover_positions`): tables for all of
        Gemma 3's 32,768 positions took 128 MB, half the size of its int4 weights."""
        cfg, device = self.cfg, self.final_norm.weight.device
        for prefix, base in self._rotary_bases():
            register_rotary(self, cfg.head_dim, min(cfg.context_length, ROTARY_BLOCK), base,
                            device, prefix)

    def _rotary_bases(self) -> list[tuple[str, float]]:
        """Each rotary table's name and base: the model's, and the windowed layers' own."""
        cfg = self.cfg
        if cfg.positions != "rope":
            return []
        return [("rope", cfg.rope_base)] + (
            [("rope_local", cfg.rope_local_base)] if self.local_rotary else [])

    def cover_positions(self, end: int) -> None:
        """Rotary tables that reach position `end` (a KV cache of `end` positions asks for
        them when it is made, so that a compiled step never grows them)."""
        for prefix, base in self._rotary_bases():
            extend_rotary(self, self.cfg.head_dim, end, base, prefix)

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms and biases keep their defaults (ones / zeros)
            scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer) if scaled else std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, last_only: bool = False,
                select: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T).

        start: the position of idx's first column, the same for every row (an int), or one
        per row (a (B,) tensor) when sequences of different lengths decode together.
        cache: keys and values of earlier positions, read and written in place.
        last_only: logits of the last position only, (B, 1, vocab): a prompt's other
        positions need no output projection, which for a large vocabulary is most of the work.
        select: a (B, T) boolean mask; logits (N, vocab) of the N selected positions only
        (training on some targets, such as a chat's answers).
        embeds: the input vectors (B, T, d_model) instead of idx's embeddings (a
        vision-language model's, with image features in place of image tokens).
        """
        x = self.features(idx, cache, start, embeds)
        if select is not None:
            return self.lm_head(x[select])
        return self.lm_head(x[:, -1:] if last_only else x)

    def features(self, idx: torch.Tensor, cache: KVCache | None = None,
                 start: int | torch.Tensor = 0, embeds: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The final normed hidden states (B, T, d_model): what the output projection, or a
        task head such as a classifier, reads."""
        x, layers = self.block_inputs(idx, cache, start, embeds)
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in the backward pass.
                x = checkpoint(block, x, *layers[i], layer_cache, use_reentrant=False)
            else:
                x = block(x, *layers[i], layer_cache)
        return self.final_norm(x)

    def token_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        """The input vectors of tokens idx: their embeddings, times sqrt(d_model) for a model
        trained that way (Gemma)."""
        x = self.embed(idx).to(self.final_norm.weight.dtype)
        if self.cfg.embed_scale:
            # In the embeddings' dtype, as the reference implementation rounds it.
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        return x

    def block_inputs(self, idx: torch.Tensor, cache: KVCache | None = None,
                     start: int | torch.Tensor = 0, embeds: torch.Tensor | None = None):
        """What the blocks take: the first block's input x (B, T, d_model), and for each block
        the rotary tables, positions and mask it takes with it (`block(x, *layers[i],
        layer_cache)`): for work that goes through the model a block at a time."""
        T = idx.shape[1]
        pos = Positions.of(start, T, cache.length if cache is not None and cache.static else None)
        if pos.end > self.cfg.context_length:
            raise ValueError(f"sequence reaches position {pos.end}, past the model's context "
                             f"length {self.cfg.context_length}")
        if cache is not None and pos.end > cache.length:
            raise ValueError(f"sequence reaches position {pos.end}, past the KV cache's "
                             f"{cache.length} positions")
        if isinstance(cache, PagedKVCache):
            pos = cache.place(pos, idx.shape[0])
        self.cover_positions(pos.end)
        cfg = self.cfg
        x = self.token_embeddings(idx) if embeds is None else embeds
        rotary = local_rotary = None
        if self.pos_embed is not None:
            index = pos.index if pos.index is not None else torch.arange(
                pos.start, pos.end, device=idx.device)
            x = x + self.pos_embed(index)
        else:
            rotary = local_rotary = pos.rotary(self.rope_cos, self.rope_sin)
            if self.local_rotary:
                local_rotary = pos.rotary(self.rope_local_cos, self.rope_local_sin)
        windowed = self.windowed
        full = (rotary, pos, pos.mask(T, idx.device)) if not all(windowed) else None
        local = (local_rotary, pos, pos.mask(T, idx.device, cfg.sliding_window)) \
            if any(windowed) else None
        return self.dropout(x), [local if w else full for w in windowed]

    def new_cache(self, batch: int, length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` positions."""
        cfg, ref = self.cfg, self.final_norm.weight
        self.cover_positions(length or cfg.context_length)
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, length or cfg.context_length,
                       cfg.head_dim, dtype or ref.dtype, ref.device)

    def new_paged_cache(self, slots: int, length: int, block: int, blocks: int = 0,
                        dtype: torch.dtype | None = None) -> PagedKVCache:
        """An empty paged KV cache: `slots` rows of up to `length` positions in blocks of
        `block`, `blocks` of them allocated (it grows as rows take them)."""
        cfg, ref = self.cfg, self.final_norm.weight
        self.cover_positions(length)
        return PagedKVCache(cfg.n_layer, slots, cfg.n_kv_head, length, cfg.head_dim, block,
                            dtype or ref.dtype, ref.device, blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self) -> FlopsReport:
        embedding = self.cfg.vocab_size * self.cfg.d_model
        if self.pos_embed is not None:
            embedding += self.pos_embed.weight.numel()
        if not self.cfg.tie_embeddings:
            embedding += self.lm_head.weight.numel()
        return count_flops(self.cfg, self.num_params(), embedding)
