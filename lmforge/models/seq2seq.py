"""The encoder-decoder Transformer (Vaswani et al., 2017), for translation and other
sequence-to-sequence tasks, built from the same layers as the decoder-only model.

- The encoder reads the whole source with self-attention; padding is masked out of every
  attention, so a padded source encodes exactly as the unpadded one.
- The decoder writes the target with causal self-attention (a KV cache when generating) and
  cross-attention to the encoder's output, whose keys and values are computed once.
- Positions: the original fixed sinusoids or learned ones added to the embeddings (scaled by
  sqrt(d_model)), or rotary in both self-attentions (cross-attention compares a target
  position with source positions, which rotary has no meaning for, so it has none).
- Post-norm residual blocks as in the paper, or pre-norm (`norm_first`), which trains
  without a long warmup.
- One embedding for source, target and output projection when `tie_embeddings` (a joint
  vocabulary, as the paper shares for English-German).
- For decoding, a `Seq2SeqCache` holds each row's cross-attention memory beside its
  self-attention keys and values: `start_sequence` encodes a source into a row, and then
  `forward(tokens, cache, start)` decodes as a decoder-only model does, so the inference
  engine runs both families through one step.

The model returns logits; losses (label smoothing included) belong to the training task.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import FlopsReport, Seq2SeqConfig
from lmforge.layers import (
    MLP,
    Attention,
    CrossAttention,
    KVCache,
    Linear,
    Positions,
    make_norm,
    register_rotary,
    resized,
    sinusoidal_positions,
)

Rotary = tuple[torch.Tensor, torch.Tensor]


def pad_sources(sources: list[list[int]], pad: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids right-padded to one width (B, S), and their mask: True at tokens."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad, dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = torch.tensor(s)
    mask = torch.arange(width)[None] < torch.tensor([len(s) for s in sources])[:, None]
    return ids.to(device), mask.to(device)


class Seq2SeqCache(KVCache):
    """A decoder KV cache whose rows also hold their encoded source: every decoder layer's
    cross-attention keys and values (padded to max_length) and the source's length."""

    def __init__(self, cfg: Seq2SeqConfig, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        head_dim = cfg.d_model // cfg.n_head
        super().__init__(cfg.n_decoder_layer, batch, cfg.n_head, length, head_dim, dtype, device)
        shape = (cfg.n_decoder_layer, batch, cfg.n_head, cfg.max_length, head_dim)
        self.memory_k = torch.zeros(shape, dtype=dtype, device=device)
        self.memory_v = torch.zeros(shape, dtype=dtype, device=device)
        # A free row attends to one (zero) position: attending to none would be NaN.
        self.lengths = torch.ones(batch, dtype=torch.long, device=device)

    def resize(self, batch: int, length: int) -> None:
        super().resize(batch, length)
        shape = (self.memory_k.shape[0], batch, *self.memory_k.shape[2:])
        self.memory_k, self.memory_v = resized(self.memory_k, shape), resized(self.memory_v, shape)
        self.lengths = resized(self.lengths, (batch,), fill=1)

    def rows(self, first: int, count: int = 1) -> Seq2SeqCache:
        view = super().rows(first, count)
        view.memory_k = self.memory_k[:, first:first + count]
        view.memory_v = self.memory_v[:, first:first + count]
        view.lengths = self.lengths[first:first + count]
        return view

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.memory_k.nbytes + self.memory_v.nbytes

    def sources(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Each layer's memory and the source mask (B, S), S the longest source in the rows."""
        width = int(self.lengths.max())
        memory = list(zip(self.memory_k[:, :, :, :width].unbind(0),
                          self.memory_v[:, :, :, :width].unbind(0)))
        mask = torch.arange(width, device=self.lengths.device)[None] < self.lengths[:, None]
        return memory, mask


class _Residual(nn.Module):
    """x + dropout(f(x)) with the norm before f (pre-norm) or after the sum (post-norm)."""

    def __init__(self, cfg: Seq2SeqConfig, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.norm_first = inner, cfg.norm_first
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(self.inner(self.norm(x), *args))
        return self.norm(x + self.dropout(self.inner(x, *args)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        block = cfg.block_config()
        self.attn = _Residual(cfg, Attention(block))
        self.mlp = _Residual(cfg, MLP(block))

    def forward(self, x: torch.Tensor, rotary: Rotary | None, pos: Positions,
                key_mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x, rotary, pos, key_mask))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        block = cfg.block_config()
        self.attn = _Residual(cfg, Attention(block))
        self.cross = _Residual(cfg, CrossAttention(block))
        self.mlp = _Residual(cfg, MLP(block))

    def forward(self, x: torch.Tensor, rotary: Rotary | None, pos: Positions,
                mask: torch.Tensor | None, cache: tuple[torch.Tensor, torch.Tensor] | None,
                memory: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        """memory: the cross-attention keys and values, or the encoder's output to make them
        of (in training, inside the block's own call: a sharded block has its weights then)."""
        if isinstance(memory, torch.Tensor):
            memory = self.cross.inner.memory(memory)
        x = self.attn(x, rotary, pos, mask, cache)
        return self.mlp(self.cross(x, memory, key_mask))


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.source_pos = nn.Embedding(cfg.max_length, cfg.d_model)
            self.target_pos = nn.Embedding(cfg.max_length, cfg.d_model)
        self.reset_buffers()
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layer))
        # Pre-norm leaves the residual stream unnormalised: one last norm on each side.
        self.encoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) \
            if cfg.norm_first else nn.Identity()
        self.decoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) \
            if cfg.norm_first else nn.Identity()
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_buffers(self) -> None:
        """Sinusoid or rotary tables: derived, never saved (rebuilt after loading on the meta
        device)."""
        cfg, device = self.cfg, self.embed.weight.device
        if cfg.positions == "sinusoidal":
            table = sinusoidal_positions(cfg.max_length, cfg.d_model)
            self.register_buffer("sinusoids", table.to(device), persistent=False)
        elif cfg.positions == "rope":
            register_rotary(self, cfg.d_model // cfg.n_head, cfg.max_length, cfg.rope_base, device)

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, self.cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _embed(self, ids: torch.Tensor, pos: Positions, side: str) -> torch.Tensor:
        if pos.end > self.cfg.max_length:
            raise ValueError(f"a {side} of {pos.end} tokens is past the model's max_length "
                             f"{self.cfg.max_length}")
        x = self.embed(ids) * math.sqrt(self.cfg.d_model)
        index = pos.index if pos.index is not None else \
            torch.arange(pos.start, pos.end, device=ids.device)
        if self.cfg.positions == "learned":
            x = x + (self.source_pos if side == "source" else self.target_pos)(index)
        elif self.cfg.positions == "sinusoidal":
            x = x + self.sinusoids[index]
        return self.dropout(x)

    def _rotary(self, pos: Positions) -> Rotary | None:
        return pos.rotary(self.rope_cos, self.rope_sin) if self.cfg.positions == "rope" else None

    @staticmethod
    def key_mask(source_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) True-for-tokens -> the (B, 1, 1, S) mask attention over the source takes."""
        return source_mask[:, None, None, :]

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, d_model) for source ids (B, S); source_mask (B, S) is True
        at tokens and False at padding."""
        pos, key_mask = Positions.of(0, source.shape[1]), self.key_mask(source_mask)
        x = self._embed(source, pos, "source")
        rotary = self._rotary(pos)
        for block in self.encoder:
            x = block(x, rotary, pos, key_mask)
        return self.encoder_norm(x)

    def memory(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values, computed once."""
        return [block.cross.inner.memory(encoded) for block in self.decoder]

    def decode(self, target: torch.Tensor,
               memory: list[tuple[torch.Tensor, torch.Tensor]] | list[torch.Tensor],
               source_mask: torch.Tensor, cache: KVCache | None = None,
               start: int | torch.Tensor = 0) -> torch.Tensor:
        """Logits (B, T, vocab) for target ids (B, T) at positions start.. (with a cache of
        the earlier ones when generating); `start` may be a tensor (B,), one per row. memory:
        each decoder layer's cross-attention keys and values, or the encoder's output for
        each (see DecoderBlock)."""
        pos = Positions.of(start, target.shape[1])
        x = self._embed(target, pos, "target")
        mask, key_mask = pos.mask(target.shape[1], target.device), self.key_mask(source_mask)
        rotary = self._rotary(pos)
        for i, block in enumerate(self.decoder):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(x, rotary, pos, mask, layer_cache, memory[i], key_mask)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, target: torch.Tensor, cache: Seq2SeqCache | None = None,
                start: int | torch.Tensor = 0, last_only: bool = False,
                source: torch.Tensor | None = None,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of target ids (B, T): teacher-forced given `source` ids (B, S)
        and `source_mask` (training), or decoding with a `cache` whose rows hold their encoded
        sources (see `start_sequence`). last_only: the last position's logits only."""
        if source is not None:
            if source_mask is None:
                source_mask = torch.ones_like(source, dtype=torch.bool)
            memory = [self.encode(source, source_mask)] * len(self.decoder)
        elif isinstance(cache, Seq2SeqCache):
            memory, source_mask = cache.sources()
        else:
            raise ValueError("a seq2seq model decodes either a given source or a Seq2SeqCache "
                             "whose rows hold their sources (see start_sequence)")
        logits = self.decode(target, memory, source_mask, cache, start)
        return logits[:, -1:] if last_only else logits

    def new_cache(self, batch: int, length: int | None = None,
                  dtype: torch.dtype | None = None) -> Seq2SeqCache:
        ref = self.embed.weight
        return Seq2SeqCache(self.cfg, batch, length or self.cfg.max_length, dtype or ref.dtype,
                            ref.device)

    def decoder_cache(self, batch: int, length: int) -> KVCache:
        """A cache of the decoder's self-attention only, for `decode` with memory passed in
        (batched generation and beam search, which encode all their sources at once)."""
        cfg, ref = self.cfg, self.embed.weight
        return KVCache(cfg.n_decoder_layer, batch, cfg.n_head, length, cfg.d_model // cfg.n_head,
                       ref.dtype, ref.device)

    def start_sequence(self, source: torch.Tensor, cache: Seq2SeqCache) -> None:
        """Encode source ids (S,) into the one row of `cache` (a `rows(i, 1)` view): its
        memory and length, for decoding to read."""
        if len(source) > self.cfg.max_length:
            raise ValueError(f"a source of {len(source)} tokens is past the model's max_length "
                             f"{self.cfg.max_length}")
        mask = torch.ones(1, len(source), dtype=torch.bool, device=source.device)
        encoded = self.encode(source[None], mask)
        for i, (k, v) in enumerate(self.memory(encoded)):
            cache.memory_k[i, 0, :, :len(source)] = k[0]
            cache.memory_v[i, 0, :, :len(source)] = v[0]
        cache.lengths[0] = len(source)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self) -> FlopsReport:
        """Training FLOPs per target token, roughly: 6 per matmul weight, counting each target
        token as if it also paid for one source token's pass through the encoder."""
        params = self.num_params()
        tables = [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]
        if not self.cfg.tie_embeddings:
            tables.append(self.lm_head.weight)
        non_embedding = params - sum(t.numel() for t in tables)
        matmul = non_embedding + self.cfg.vocab_size * self.cfg.d_model  # the output projection
        return FlopsReport(params, non_embedding, 6 * matmul)
