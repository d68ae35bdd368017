"""LoRA for open_clip towers as FSC-CLIP fine-tunes them (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large
Language Models"; FSC-CLIP ``patch_vit_clip_lora``, ytaek-oh/fsc-clip ``src/training/models/lora_utils/``).

:func:`apply_lora` replaces, in place and keeping every existing parameter name:

- every ``nn.Linear`` whose qualified name has no ``attn`` (the MLP ``c_fc`` / ``c_proj`` of every residual block
  of both towers) by :class:`LoraLinear`: ``y = x W^T + b + s x A^T B^T``, A kaiming-uniform, **B = 0**;
- every ``nn.Conv2d`` (the ViT patch embedding ``conv1``) by :class:`LoraConv2d`: ``A: (r k) x (C_in k)``,
  ``B: (C_out k) x (r k)``, B = 0, ``Delta W = s (B A).view(W.shape)``;
- every ``nn.MultiheadAttention`` (``attn`` of every block, both towers) by :class:`LoraMultiheadAttention`: the
  packed q/k/v in-projection adds ``s x A^T B^T`` with one shared ``A: r x d`` and ``B: 3d x r``, and ``out_proj``
  becomes a :class:`LoraLinear`.

``s = alpha / r`` (reference: r = 4, alpha = 1, no dropout). **Reference quirk, reproduced by default**: the
in-projection's A *and* B are xavier-uniform, so that its delta is non-zero at initialisation and the LoRA model
does not start at the pretrained function; ``zero_init=True`` zero-initialises that B as well (delta 0 at init,
as every other LoRA layer).

:func:`mark_only_lora_as_trainable` freezes every parameter without ``lora_`` in its name (LayerNorms, embeddings,
projections and ``logit_scale`` included). :func:`merge_lora_state_dict` folds the deltas into the base weights and
drops the ``lora_*`` tensors: the result is a plain open_clip state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LoraConfig:
    rank: int = 4
    """r, the rank of every low-rank update (the reference's ``--lora-rank 4``)."""
    alpha: float = 1.0
    """The update is scaled by alpha / r (reference: 1)."""
    zero_init: bool = False
    """Zero-initialise the attention in-projection's B too (the reference draws it xavier-uniform)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Linear):
    """``nn.Linear`` plus ``scaling * x A^T B^T`` (A: r x in, B: out x r; B = 0 at init)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = True, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # out x in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class LoraConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight ``W + scaling * (B A).view(W.shape)`` (A: (r k) x (C_in k), B: (C_out k) x (r k),
    k the kernel size; B = 0 at init)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rank: int,
        alpha: float,
        stride=1,
        padding=0,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        k = self.kernel_size[0]
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank * k, in_channels * k, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_channels * k, rank * k, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A).view(self.weight.shape)  # C_out x C_in x k x k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight + self.delta_weight(), self.bias)


class LoraMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (packed q/k/v projection) whose in-projection adds ``scaling * x A^T B^T`` with one A
    (r x d) shared by q, k and v and B (3d x r); ``out_proj`` is a :class:`LoraLinear`. Same call signature and
    parameter names as the base module, plus ``lora_A`` / ``lora_B``."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        zero_init: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=batch_first, device=device, dtype=dtype
        )
        self.rank, self.scaling = rank, alpha / rank
        self.out_proj = LoraLinear(embed_dim, embed_dim, rank, alpha, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, embed_dim, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(3 * embed_dim, rank, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.lora_A)
        if zero_init:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.xavier_uniform_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # 3d x d

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # L x B x d
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight + self.delta_weight(),
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight + self.out_proj.delta_weight(),
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first:
            out = out.transpose(0, 1)  # B x L x d
        return out, weights


def _share_base(new: nn.Module, old: nn.Module, names) -> nn.Module:
    """Put ``old``'s tensors (parameters keep their identity and requires_grad) into ``new``."""
    for name in names:
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _lora_linear(old: nn.Linear, cfg: LoraConfig) -> LoraLinear:
    w = old.weight
    new = LoraLinear(
        old.in_features,
        old.out_features,
        cfg.rank,
        cfg.alpha,
        bias=old.bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    return _share_base(new, old, ["weight", "bias"])


def _lora_conv(old: nn.Conv2d, cfg: LoraConfig) -> LoraConv2d:
    if old.kernel_size[0] != old.kernel_size[1] or old.groups != 1 or old.dilation != (1, 1):
        raise ValueError(f"LoRA Conv2d supports square, ungrouped, undilated kernels, got {old}")
    w = old.weight
    new = LoraConv2d(
        old.in_channels,
        old.out_channels,
        old.kernel_size[0],
        cfg.rank,
        cfg.alpha,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    return _share_base(new, old, ["weight", "bias"])


def _lora_attention(old: nn.MultiheadAttention, cfg: LoraConfig) -> LoraMultiheadAttention:
    if not old._qkv_same_embed_dim or old.bias_k is not None or old.add_zero_attn:
        raise ValueError("LoRA attention needs a packed q/k/v in-projection without bias_k/bias_v/zero_attn")
    w = old.in_proj_weight
    new = LoraMultiheadAttention(
        old.embed_dim,
        old.num_heads,
        cfg.rank,
        cfg.alpha,
        dropout=old.dropout,
        bias=old.in_proj_bias is not None,
        batch_first=old.batch_first,
        zero_init=cfg.zero_init,
        device=w.device,
        dtype=w.dtype,
    )
    _share_base(new, old, ["in_proj_weight", "in_proj_bias"])
    _share_base(new.out_proj, old.out_proj, ["weight", "bias"])
    return new


def apply_lora(model: nn.Module, cfg: LoraConfig) -> Dict[str, str]:
    """Replace the target layers of ``model`` in place (see the module docstring); returns ``{name: kind}`` of the
    replaced modules. Raises when nothing matches or the model already has LoRA layers."""
    if cfg.rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.rank}")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("the model already has LoRA layers")
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            targets.append((name, _lora_attention, "attention"))
        elif isinstance(module, nn.Conv2d):
            targets.append((name, _lora_conv, "conv2d"))
        elif type(module) is nn.Linear and "attn" not in name:
            targets.append((name, _lora_linear, "linear"))
    if not targets:
        raise ValueError(f"no Linear, Conv2d or MultiheadAttention layer to adapt in {type(model).__name__}")
    replaced = {}
    for name, build, kind in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(getattr(parent, child), cfg))
        replaced[name] = kind
    return replaced


def mark_only_lora_as_trainable(model: nn.Module) -> int:
    """Freeze every parameter whose name has no ``lora_``; returns the number of trainable tensors."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        trainable += int(param.requires_grad)
    return trainable


def is_lora_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("lora_A") for k in state)


def merge_lora_state_dict(state: Mapping[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """Fold every LoRA delta into its base weight and drop the ``lora_*`` tensors (a plain state dict of the base
    model). The rank of each layer is read from its A (``r x in``, or ``(r k) x (C_in k)`` for a convolution);
    ``alpha`` is the model's ``--lora-alpha``."""
    out = {k: v for k, v in state.items() if "lora_" not in k.rpartition(".")[2]}
    for key, a in state.items():
        if not key.endswith("lora_A"):
            continue
        prefix = key[: -len("lora_A")]
        b = state.get(prefix + "lora_B")
        if b is None:
            raise KeyError(f"{key} has no matching {prefix}lora_B")
        if prefix + "weight" in state:
            base_key = prefix + "weight"
        elif prefix + "in_proj_weight" in state:
            base_key = prefix + "in_proj_weight"
        else:
            raise KeyError(f"no base weight next to {key} (expected {prefix}weight or {prefix}in_proj_weight)")
        base = state[base_key]
        rank = a.shape[0] // base.shape[-1] if base.ndim == 4 else a.shape[0]
        delta = (alpha / rank) * (b.float() @ a.float())
        out[base_key] = (base.float() + delta.view(base.shape)).to(base.dtype)
    return out


def lora_parameter_names(state: Mapping[str, torch.Tensor]) -> list:
    """Names of the LoRA tensors of a state dict."""
    return [k for k in state if "lora_" in k.rpartition(".")[2]]


def scale_lora_state_dict(
    state: Mapping[str, torch.Tensor], factor: float, keys: Optional[list] = None
) -> Dict[str, torch.Tensor]:
    """A copy of ``state`` with every LoRA tensor (or those in ``keys``) multiplied by ``factor``."""
    keys = set(lora_parameter_names(state) if keys is None else keys)
    return {k: (v * factor if k in keys else v) for k, v in state.items()}
