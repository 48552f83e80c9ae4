"""How much memory one rank needs to train a decoder, before buying the machines.

Per rank, weights and AdamW's two moments in fp32 (4 + 8 bytes a parameter: all of them on
every rank under DDP, 1/world under FSDP) are there throughout. Gradients are not: the loop
drops them after each optimizer step (`zero_grad(set_to_none=True)`) and the backward pass
makes them as it frees activations. So a step peaks at one of two moments:

- the end of the forward pass: every activation held, counted tensor by tensor below (or
  only each block's input with gradient checkpointing, plus one block recomputed), with the
  logits, their float32 copy, the log-softmax and, as backward starts, their two gradients;
  and what is gathered for computing: under FSDP the root's parameters (embeddings, output
  projection, final norm, kept whole from forward to backward) and two blocks' (the one
  computing and the one fetched ahead), in the compute dtype; under DDP with bf16 autocast,
  a bf16 copy of every weight;
- the end of the backward pass: every gradient (1/world of them under FSDP); the embedding's
  arriving as a dense vocabulary x width tensor, which with tied embeddings autograd adds to
  the output projection's (held since the backward pass began) into a third; and under FSDP
  the root's whole parameters and gradient until that last reduction.

Buffers of the libraries themselves (the CUDA context, allocator caching, gloo and NCCL
buffers) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.models.decoder import Decoder

ADAMW_BYTES = 8  # two fp32 moments per parameter


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by what holds them."""

    weights: int
    optimizer: int
    activations: int  # at the end of the forward pass
    gathered: int  # gathered or cast weights, at the end of the forward pass
    gradients: int  # at the end of the backward pass
    transient: int  # whole gradients and weights not yet reduced, at the end of backward

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.activations + self.gathered,
                                                   self.gradients + self.transient)

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("optimizer state", self.optimizer),
                ("end of forward:", None), ("  activations", self.activations),
                ("  gathered / cast weights", self.gathered),
                ("end of backward:", None), ("  gradients", self.gradients),
                ("  whole, before reducing", self.transient), ("peak", self.total)]


def estimate_memory(cfg: ModelConfig, world: int = 1, parallel: str = "ddp",
                    batch_size: int = 1, context: int = 0, bf16: bool = False,
                    grad_checkpointing: bool = False) -> MemoryEstimate:
    """Peak training memory of one rank: `batch_size` sequences of `context` tokens (0 = the
    model's) per micro-batch, fp32 weights with bf16 compute when `bf16`."""
    with torch.device("meta"):
        model = Decoder(cfg)
    params = model.num_params()
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = params - cfg.n_layer * block
    sharded = parallel == "fsdp" and world > 1
    share = world if sharded else 1
    compute = 2 if bf16 else 4
    if sharded:
        gathered = (root + 2 * block) * compute
    else:
        gathered = params * 2 if bf16 else 0
    embedding_gradients = (2 if cfg.tie_embeddings else 1) * 4 * cfg.vocab_size * cfg.d_model
    transient = embedding_gradients + ((4 + compute) * root if sharded else 0)
    tokens = batch_size * (context or cfg.context_length)
    return MemoryEstimate(
        weights=4 * params // share,
        optimizer=ADAMW_BYTES * params // share,
        activations=activation_bytes(cfg, tokens, compute, grad_checkpointing),
        gathered=gathered,
        gradients=4 * params // share,
        transient=transient,
    )


def activation_bytes(cfg: ModelConfig, tokens: int, compute: int,
                     grad_checkpointing: bool) -> int:
    """What the forward pass keeps for the backward pass, for `tokens` tokens."""
    d, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    q = cfg.n_head * cfg.head_dim
    # Per token in a block: the residual stream entering each half and its normed copy
    # (4 d), the queries, keys and values attention saves (q + 2 kv) and its output (q);
    # in the MLP, the hidden layer's pre-activation and activation, and for gated MLPs the
    # gate and the product (2 or 4 d_mlp).
    hidden = (4 if cfg.mlp in ("swiglu", "geglu") else 2) * cfg.d_mlp
    per_block = tokens * (4 * d + 2 * q + 2 * kv + hidden) * compute
    # The logits, their float32 copy (the logits themselves in fp32), the log-softmax
    # cross-entropy keeps, and in backward the gradients of both.
    logits = tokens * cfg.vocab_size * (compute + 12)
    if grad_checkpointing:
        return cfg.n_layer * tokens * d * compute + per_block + logits
    return cfg.n_layer * per_block + logits
