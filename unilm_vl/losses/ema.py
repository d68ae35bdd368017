"""Exponential moving averages of parameters: BYOL's momentum update (clip-rocket's BYOLIP,
``facebookresearch/clip-rocket`` ``main.py``) and the COSMOS teacher's rate schedules (``ExplainableML/cosmos``
``src/training/train.py``, ``src/training/scheduler.py``). No fairseq import."""

from __future__ import annotations

import math
from typing import Sequence

import torch


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place ``target <- tau * target + (1 - tau) * online`` for every pair (BYOL momentum update)."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA needs as many target as online tensors, got {len(target)} and {len(online)}")
    for t, o in zip(target, online):
        t.mul_(tau).add_(o.detach().to(t.dtype), alpha=1 - tau)


def cosine_momentum(step: int, base: float, total_steps: int) -> float:
    """The cosine momentum schedule without warm-up: ``1 + (1 + cos(pi step / T)) / 2 * (m0 - 1)``, from ``m0`` at
    step 0 towards 1 at step T (steps past T stay at 1)."""
    if total_steps <= 0:
        raise ValueError(f"the cosine momentum schedule needs total_steps > 0, got {total_steps}")
    step = min(step, total_steps)
    return 1 + 0.5 * (1 + math.cos(math.pi * step / total_steps)) * (base - 1)


def teacher_momentum(step: int, base: float, total_steps: int, schedule: str = "fixed") -> float:
    """EMA rate of the teacher at update ``step`` (0-based): ``fixed`` (every released recipe) or ``cosine``."""
    if schedule == "fixed":
        return base
    if schedule == "cosine":
        return cosine_momentum(step, base, total_steps)
    raise ValueError(f"momentum schedule must be 'fixed' or 'cosine', got {schedule!r}")
