"""How much memory one rank needs to train a decoder, before buying the machines.

Per rank, at the peak of a step (the start of the backward pass, when every activation is
still held and the optimizer state exists):

- weights, gradients and AdamW's two moments in fp32 (4 + 4 + 8 bytes a parameter), whole on
  every rank under DDP, 1/world of them under FSDP;
- gathered and transient weights: under FSDP the root's parameters (embeddings, output
  projection, final norm: kept whole from forward to backward) with their whole gradient
  (reduced only once the embedding's comes, last), and two blocks' parameters (the one
  computing and the one fetched ahead); DDP under bf16 autocast keeps a bf16 copy of every
  weight; and everywhere, the embedding's gradient arrives as a dense vocabulary x width
  tensor before it is added to the weight's;
- activations: what each block saves for its backward pass, counted tensor by tensor below,
  or only each block's input with gradient checkpointing (plus one block recomputed); and
  the logits with their float32 copy, the log-softmax, and their two gradients.

Buffers of the libraries themselves (the CUDA context, allocator fragmentation, gloo/NCCL
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
    gradients: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer state", self.optimizer), ("gathered / cast weights", self.gathered),
                ("activations", self.activations), ("total", self.total)]


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
    share = world if parallel == "fsdp" else 1
    compute = 2 if bf16 else 4
    embedding_gradient = 4 * cfg.vocab_size * cfg.d_model
    if parallel == "fsdp" and world > 1:
        gathered = (root + 2 * block) * compute + 4 * root
    else:
        gathered = params * 2 if bf16 else 0
    tokens = batch_size * (context or cfg.context_length)
    return MemoryEstimate(
        weights=4 * params // share,
        gradients=4 * params // share,
        optimizer=ADAMW_BYTES * params // share,
        gathered=gathered + embedding_gradient,
        activations=activation_bytes(cfg, tokens, compute, grad_checkpointing),
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
