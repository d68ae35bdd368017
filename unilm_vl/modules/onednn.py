"""fp32 inference GEMMs on CPU through oneDNN instead of MKL.

PyTorch's CPU ``F.linear`` calls MKL's sgemm. On AMD CPUs with AVX-512 MKL runs its AVX2 kernels (MKL 2024.2 in
torch 2.14.1, measured on an EPYC with avx512f), while oneDNN, which the same torch build ships as
``torch.ops.mkldnn``, picks its kernels from the CPU's instruction-set flags. One core, fp32 (benchmarks/README.md,
"Issue 20, fifth session"): 394 x 768 by 768 x 3072 (a ViT-B/16 MLP GEMM for two images) 9.6 ms against 19.5 ms,
142 x 768 by 768 x 3072 3.2 against 7.0 ms, a 2-row step through twelve 768-wide decoder layers whose weights
stream from memory 20.9 against 35.2 ms. Both compute the same fp32 products, summed in another order: the results
agree to float rounding (about 1e-6 relative), not bitwise.

oneDNN's op has no backward, so it runs only where autograd does not need one: no input requires a gradient while
grad mode is on (``torch.no_grad`` / ``inference_mode`` generation, a frozen tower during training). It is also
skipped under CPU autocast (where ``F.linear`` runs in bf16), for dtypes other than fp32, for tensor subclasses
(FSDP's DTensors), while ``torch.compile`` traces, and for small GEMMs, where oneDNN's fixed cost per call
(about 10 us) outweighs its faster kernel: below :data:`MIN_WORK` multiply-adds (rows x in x out) unless the weight
has at least :data:`MIN_WEIGHT` elements (measured, one core: 16 x 256 by 256 x 256, 1M multiply-adds, 30 against
MKL's 26 us; 8 x 256 by 256 x 1024, 2M, 52 against 64 us; 128 x 64 by 64 x 256, 2M, 30 against 42 us; the 768-wide
layers of a decoder step, whose weights stream from memory, faster from one row on). Everything else is
``F.linear`` itself.

:func:`use_onednn` switches the plain ``nn.Linear`` and ``nn.MultiheadAttention`` modules of a model to the
subclasses below in place (parameters, names and state dicts unchanged); ``UNILM_VL_ONEDNN=0`` in the environment
or :func:`set_onednn_enabled` turns the oneDNN path off process-wide (the subclasses then run their parents' code).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MIN_WORK = 1 << 21
"""GEMMs of at least this many multiply-adds (rows x in x out) take oneDNN."""
MIN_WEIGHT = 1 << 19
"""GEMMs whose weight has at least this many elements (2 MiB of fp32) take oneDNN from one row on."""


def _onednn_linear_op():
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_LINEAR = _onednn_linear_op()
_PLAIN = (torch.Tensor, nn.Parameter)
_ENABLED = os.environ.get("UNILM_VL_ONEDNN", "1") != "0"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (every x86-64 and aarch64 wheel of torch 2.x does)."""
    return _LINEAR is not None


def onednn_enabled() -> bool:
    """Whether the oneDNN path is on (``UNILM_VL_ONEDNN`` at import, then :func:`set_onednn_enabled`)."""
    return _ENABLED


def set_onednn_enabled(enabled: bool) -> bool:
    """Turn the oneDNN path on or off for the whole process; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`linear` sends ``x W^T + b`` to oneDNN (see the module docstring for each condition)."""
    if not _ENABLED or _LINEAR is None:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False  # first: where a training step leaves
    # a Parameter over a tensor subclass (DTensor, fake or functional tensors) has the subclass's type
    if type(x) is not torch.Tensor or type(weight) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    rows = x.numel() // x.size(-1)
    return rows * weight.numel() >= MIN_WORK or weight.numel() >= MIN_WEIGHT


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x: ... x in, weight: out x in), through oneDNN where :func:`onednn_applies`."""
    if onednn_applies(x, weight, bias):
        return _LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDnnMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention without weights, padding mask or dropout (open_clip's
    towers at inference) runs its packed in-projection and its out-projection through :func:`linear` and the
    attention through ``F.scaled_dot_product_attention``; every other call is the parent's forward."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if (
            query is key
            and key is value
            and query.dim() == 3
            and self.batch_first
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
            and key_padding_mask is None
            and not need_weights
            and not is_causal
            and (attn_mask is None or attn_mask.dim() == 2)
            and not (self.training and self.dropout > 0)
            and onednn_applies(query, self.in_proj_weight, self.in_proj_bias)
        ):
            return self._self_attention(query, attn_mask), None
        return super().forward(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )

    def _self_attention(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, length, dim = x.shape
        heads = self.num_heads
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # B x N x 3D
        q, k, v = qkv.view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # B x H x N x d each
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention: True = masked; SDPA: True = attended
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # B x H x N x d
        out = out.transpose(1, 2).reshape(batch, length, dim)  # B x N x D
        return linear(out, self.out_proj.weight, self.out_proj.bias)


def use_onednn(model: nn.Module) -> int:
    """Switch every module of ``model`` whose type is exactly ``nn.Linear`` or ``nn.MultiheadAttention`` to
    :class:`OneDnnLinear` / :class:`OneDnnMultiheadAttention`, in place (the subclasses add no state, so parameters,
    buffers and state-dict keys stay as they are). Subclasses (LoRA layers, ``out_proj`` inside an attention) are left
    alone. Returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            switched += 1
        elif type(module) is nn.MultiheadAttention:
            module.__class__ = OneDnnMultiheadAttention
            switched += 1
    return switched
