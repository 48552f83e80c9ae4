"""Optimizers: AdamW with decay / no-decay groups, and Muon for the hidden matrices.

Muon (momentum + orthogonalised updates via a Newton-Schulz iteration) is written here
rather than taken from `torch.optim.Muon` because that one runs its iteration in bf16,
which is ~20x slower than fp32 on CPUs without bf16 matrix units. On GPU we use bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.train.config import TrainConfig


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Matrices (linear weights, embeddings) decay; vectors (norms, biases) do not."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(params: list[nn.Parameter], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # The fused kernel is fastest on GPU; on CPU the foreach path beats the per-tensor loop.
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=fused,
                             foreach=None if fused else True)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, by a quintic Newton-Schulz iteration.

    The coefficients push singular values towards 1 quickly rather than exactly; that is
    all Muon needs, and it takes 5 matrix products instead of an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    transpose = x.size(0) > x.size(1)
    if transpose:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transpose else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then the update replaced by its orthogonalised form."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = orthogonalize(p.grad.lerp(buf, group["momentum"]))
                # Scale so that tall and wide matrices get updates of similar RMS.
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


class Optimizers:
    """Several optimizers stepping together, seen by the loop as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state_dict: dict) -> None:
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state_dict[str(i)])


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str
                    ) -> torch.optim.Optimizer | Optimizers:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return adamw(params, cfg, device_type)
    if cfg.optimizer != "muon":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adamw or muon")
    # Muon is for the hidden matrices; embeddings and the output head stay with AdamW.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings |= {id(p) for name, p in model.named_parameters() if name.startswith("lm_head")}
    matrices = [p for p in params if p.dim() == 2 and id(p) not in embeddings]
    rest = [p for p in params if id(p) not in {id(m) for m in matrices}]
    muon = Muon(matrices, lr=cfg.muon_lr, momentum=cfg.muon_momentum)
    for group in muon.param_groups:
        group["lr_scale"] = cfg.muon_lr / cfg.lr
    return Optimizers(muon, adamw(rest, cfg, device_type))
