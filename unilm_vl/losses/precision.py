"""Precision guard shared by every loss: logits, softmaxes and statistics are computed in float32 (or float64)."""

from __future__ import annotations

import functools
import itertools

import torch


def full_precision(fn):
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Under ``torch.autocast`` (fairseq ``--amp``, bf16/fp16 training) matmuls are recast to the low precision even
    when their inputs are float32, so ``s * I @ T^T`` with ``s`` up to 100 would be a bf16 matrix (8-bit mantissa:
    steps of 0.25-0.5 near 100) before any softmax. The losses upcast their inputs and must compute logits,
    softmaxes, covariance matrices and Sinkhorn in float32 (or float64), so they are wrapped with this.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
