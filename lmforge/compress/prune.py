"""Pruning: setting a share of a model's weights to zero, chosen so the model loses least.

Three ways to choose, for every Linear layer of the decoder's blocks (the embedding and the
output projection are kept whole, as is usual):
- magnitude: the weights of smallest |W| in the layer (the classic baseline);
- wanda: the smallest |W_ij| * ||X_j||, the weight times the norm of the input it meets, in
  each output row (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs");
- sparsegpt: the weights whose removal costs least given the other weights may change, then
  the others updated to make up for them, column by column as GPTQ rounds (Frantar and
  Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").
The share is a fraction of each layer (unstructured) or the pattern N:M, N of every M
consecutive weights of a row zero, which GPUs multiply faster (2:4). Wanda and SparseGPT look
at calibration text, a block at a time (`through_blocks`): each layer is pruned as its input
arrives, after the layers before it were. A pruned model is an ordinary float model directory
with zeros in its weights, plus `sparsity.json` saying how it was made and each layer's share
of zeros; it can be quantized like any other.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmforge.compress.calib import on_linear_inputs, through_blocks
from lmforge.compress.gptq import (
    BLOCK,
    Hessians,
    inverse_factor,
    one_thread,
    without_dead_inputs,
)
from lmforge.compress.quant import decoder_of, quantization_of
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITY = "sparsity.json"


class PruningError(LmforgeError, ValueError):
    """Pruning asked for in a way that cannot be done."""


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: `sparsity`, a fraction of each layer, or `pattern` (N, M)."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruningError(f"unknown pruning method {self.method!r}: use one of "
                               f"{', '.join(METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise PruningError("give either a sparsity (a fraction, e.g. 0.5) or a pattern "
                               "(N:M, e.g. 2:4), not both")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise PruningError(f"sparsity {self.sparsity} is not between 0 and 1")
        if self.pattern is not None and not (0 < self.pattern[0] < self.pattern[1]
                                             and BLOCK % self.pattern[1] == 0):
            raise PruningError(f"pattern {self.pattern[0]}:{self.pattern[1]} must be N:M with "
                               f"0 < N < M and M dividing {BLOCK}, e.g. 2:4 (N of every M "
                               "weights are zero)")

    @classmethod
    def parse_pattern(cls, text: str) -> tuple[int, int]:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise PruningError(f"pattern {text!r} is not N:M, e.g. 2:4")
        return int(n), int(m)

    def describe(self) -> str:
        share = (f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern
                 else f"{self.sparsity:.0%}")
        return f"{self.method} {share}"


# ------------------------------------------------------------------------------- masks


def smallest(scores: torch.Tensor, spec: PruneSpec, per_row: bool = True) -> torch.Tensor:
    """A mask (N, K), True where a weight goes: the lowest `scores` in each row (or in the
    whole layer), or the N lowest of every M consecutive ones in a row."""
    if spec.pattern is not None:
        n, m = spec.pattern
        groups = scores.reshape(scores.shape[0], -1, m)
        lowest = groups.topk(n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).flatten(1)
    flat = scores if per_row else scores.reshape(1, -1)
    count = int(flat.shape[1] * spec.sparsity)
    lowest = flat.topk(count, dim=1, largest=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True).view_as(scores)


@one_thread()
def sparsegpt(weight: torch.Tensor, h: torch.Tensor, spec: PruneSpec, damp: float = 0.01
              ) -> torch.Tensor:
    """`weight` (N, K) pruned by SparseGPT against the input statistics `h` (K, K): float32,
    with zeros where the mask put them. A block of columns at a time, the weights with the
    lowest w^2 / Hinv_jj^2 (the cost of removing one) are chosen, across the block's rows
    for a sparsity (so layers keep their exact share) or N of every M in a row; then, column
    by column, the removed weights' error is spread over the columns not yet reached."""
    w, h = without_dead_inputs(weight, h)
    hinv = inverse_factor(h, damp)
    w = w.T.contiguous()  # each column of the weight a contiguous row, as in `gptq`
    k, n = w.shape
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block, errors = w[start:end].clone(), torch.empty(end - start, n, dtype=w.dtype)
        hblock = hinv[start:end, start:end]
        step = hblock.diagonal()
        mask = torch.zeros(end - start, n, dtype=torch.bool)
        if spec.pattern is None:
            mask[:] = smallest(block.T.square() / step.square(), spec, per_row=False).T
        for i in range(end - start):
            if spec.pattern is not None and i % spec.pattern[1] == 0:  # the next M columns,
                m = spec.pattern[1]  # as the updates so far left them
                cost = block[i:i + m].T.square() / step[i:i + m].square()
                mask[i:i + m] = smallest(cost, spec).T
            kept = block[i] * ~mask[i]
            errors[i] = (block[i] - kept) / step[i]
            block[i + 1:].addr_(hblock[i, i + 1:], errors[i], alpha=-1)  # in place
            block[i] = kept
        w[start:end] = block
        w[end:] -= hinv[start:end, end:].T @ errors
    return w.T.to(weight.dtype)


def check_prunable(model: Decoder | VLM, spec: PruneSpec) -> None:
    if quantization_of(model) is not None:
        raise PruningError("this model is quantized: prune its float original, then quantize")
    if spec.pattern is not None:
        for name, linear in _block_linears(decoder_of(model)):
            if linear.in_features % spec.pattern[1]:
                raise PruningError(f"{name} has {linear.in_features} input features, not a "
                                   f"multiple of {spec.pattern[1]}: the pattern "
                                   f"{spec.pattern[0]}:{spec.pattern[1]} cannot tile it")


def _block_linears(decoder: Decoder) -> list[tuple[str, nn.Linear]]:
    return [(f"blocks.{i}.{name}", m) for i, block in enumerate(decoder.blocks)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------- model


@torch.no_grad()
def prune(model: Decoder | VLM, spec: PruneSpec, tokens: torch.Tensor | None = None,
          damp: float = 0.01, progress: bool = True) -> dict[str, float]:
    """Prune `model`'s decoder in place by `spec`; wanda and sparsegpt need calibration
    `tokens` (N, L). Returns each layer's share of zero weights."""
    check_prunable(model, spec)
    decoder = decoder_of(model)
    if spec.method == "magnitude":
        for _, linear in tqdm(_block_linears(decoder), desc="magnitude", unit="layer",
                              disable=not progress):
            scores = linear.weight.abs()
            linear.weight[smallest(scores, spec, per_row=spec.pattern is not None)] = 0
    else:
        if tokens is None:
            raise PruningError(f"{spec.method} chooses weights by the activations of "
                               "calibration text: give some (--calib FILE)")
        statistics = Hessians()

        def prune_layer(name: str, linear: nn.Linear, x: torch.Tensor) -> None:
            if spec.method == "sparsegpt":
                linear.weight.copy_(sparsegpt(linear.weight, statistics(x), spec, damp))
            else:
                norms = x.reshape(-1, x.shape[-1]).float().square().sum(dim=0).sqrt()
                linear.weight[smallest(linear.weight.abs() * norms, spec)] = 0

        handles = []
        try:
            through_blocks(decoder, tokens, lambda i, block, run: handles.extend(
                on_linear_inputs(block, f"blocks.{i}", prune_layer)), batch_size=len(tokens),
                progress=progress, desc=spec.method)
        finally:
            for handle in handles:
                handle.remove()
    return {name: float((linear.weight == 0).float().mean())
            for name, linear in _block_linears(decoder)}


def save_sparsity(directory: str | Path, spec: PruneSpec, layers: dict[str, float]) -> None:
    """sparsity.json: how the model was pruned, and each layer's share of zeros."""
    record = dataclasses.asdict(spec) | {"layers": layers}
    (Path(directory) / SPARSITY).write_text(json.dumps(record, indent=2) + "\n")
