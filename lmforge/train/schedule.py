"""Learning-rate schedules: a pure function of the step, so resuming needs no schedule state."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant", "inverse-sqrt")


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, kind: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total`-step run.

    cosine: linear warmup, then cosine from lr down to min_lr at the last step.
    wsd: linear warmup, constant, then a linear decay to min_lr over the final
    `decay_fraction` of the run (warmup-stable-decay).
    constant: linear warmup, then lr.
    inverse-sqrt: linear warmup, then lr * sqrt(warmup / step), never below min_lr (the
    original Transformer's schedule, scaled so that its peak is lr).
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if kind == "constant":
        return lr
    if kind == "wsd":
        decay_start = total - int(decay_fraction * total)
        if step < decay_start:
            return lr
        progress = (step - decay_start) / max(total - decay_start, 1)
        return lr + (min_lr - lr) * min(progress, 1.0)
    if kind == "inverse-sqrt":
        return max(lr * math.sqrt(max(warmup, 1) / (step + 1)), min_lr)
    if kind == "cosine":
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    raise ValueError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
