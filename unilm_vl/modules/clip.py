"""open_clip towers behind a small dataclass config.

Named towers come from open_clip's model registry (``ViT-B-32``, ``ViT-L-14``, ...) plus our tiny CPU configs in
``open_clip_configs/`` (registered with ``open_clip.add_model_config``). Pretrained weights load from a local file
path only (no hub access at run time).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "open_clip_configs")
open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class ClipTowersConfig:
    model_name: str = "unilm-vl-clip-tiny"
    """open_clip registry name of the towers."""
    pretrained: Optional[str] = None
    """Local path of an open_clip state dict / checkpoint, or None for random init."""
    init_logit_scale: float = CLIP_INIT_LOGIT_SCALE
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE
    force_quick_gelu: bool = False


def register_open_clip_config(name: str, model_cfg: Dict) -> None:
    """Add ``model_cfg`` (an open_clip model config: ``embed_dim``, ``vision_cfg``, ``text_cfg``, the layout of
    open_clip's ``model_configs/*.json``) to open_clip's registry under ``name``, so :func:`build_open_clip` and
    ``open_clip.create_model`` build it. The config is written to a temporary file that open_clip reads once (its
    registry keeps configs in memory), never into the installed package. Registering the same config again does
    nothing; another config under a registered name raises ``ValueError``."""
    known = open_clip.get_model_config(name)
    if known is not None:
        if known != json.loads(json.dumps(model_cfg)):
            raise ValueError(f"open_clip model {name!r} is already registered with another config")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(model_cfg, fh)
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) is None:
        raise ValueError(
            f"open_clip did not register {name!r}: a model config needs embed_dim, vision_cfg and text_cfg"
        )


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... Model initialized randomly." record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model ")


def create_open_clip_model(model_name: str, **kwargs) -> nn.Module:
    """``open_clip.create_model(model_name, pretrained=None, **kwargs)`` without its warning that the model is
    initialized randomly: every caller here either loads weights next (a local ``--pretrained`` file, a checkpoint's
    state dict) or wants random towers, so the warning would mislead (it printed before every checkpoint load). The
    filter sits on the root logger, which open_clip's ``logging.warning`` uses, only for this call; every other
    record, open_clip's other warnings included, passes."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        return open_clip.create_model(model_name, pretrained=None, **kwargs)
    finally:
        root.removeFilter(drop)


def build_open_clip(cfg: ClipTowersConfig) -> nn.Module:
    """An open_clip CLIP model returning dict outputs. Raises on unknown names or missing weight files."""
    if cfg.model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {cfg.model_name!r}; known include "
            f"{[m for m in open_clip.list_models() if 'ViT' in m][:8]} and unilm-vl-clip-tiny"
        )
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        raise FileNotFoundError(f"pretrained weights not found: {cfg.pretrained} (only local files are supported)")
    model = create_open_clip_model(cfg.model_name, force_quick_gelu=cfg.force_quick_gelu, output_dict=True)
    if cfg.pretrained is not None:
        open_clip.load_checkpoint(model, cfg.pretrained)
    else:
        with torch.no_grad():
            model.logit_scale.fill_(cfg.init_logit_scale)
    return model


def tower_image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def tower_norm(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation mean/std the towers were configured with (OpenAI CLIP's unless set otherwise)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return mean, std


def correlative_self_attention(x: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """SCLIP's correlative self-attention (CSA) with the weights of ``attn`` (ExplainableML/cosmos
    ``src/open_clip/transformer.py`` ``custom_attn(..., csa=True)``):
    per head ``(softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))) v``, then ``out_proj``. ``x`` is the block's
    normalised input, B x N x W (batch-first, as open_clip's towers run ``nn.MultiheadAttention``). Written here
    because open_clip has no CSA (the reference patches its own copy of the tower)."""
    if not attn.batch_first:
        raise ValueError("correlative_self_attention expects a batch-first nn.MultiheadAttention")
    b, n, w = x.shape
    heads = attn.num_heads
    q, k, v = (
        F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    )  # 3 x (B x H x N x d)
    scale = (w // heads) ** -0.5
    weights = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1) + torch.softmax(
        k @ k.transpose(-1, -2) * scale, dim=-1
    )  # B x H x N x N
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, w))  # B x N x W


def _csa_block_attention(attn: nn.MultiheadAttention, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None):
    """``ResidualAttentionBlock.attention``'s signature, computed with :func:`correlative_self_attention`."""
    return correlative_self_attention(q_x, attn)


@contextmanager
def csa_last_block(model: nn.Module) -> Iterator[None]:
    """Within the block, the LAST residual block of every open_clip ``VisionTransformer`` inside ``model`` attends
    with :func:`correlative_self_attention` (both residuals and the MLP kept, as the reference's segmentation-only
    ``--use-csa`` path). For zero-shot segmentation; the pooled features change too."""
    from open_clip.transformer import VisionTransformer

    blocks = [m.transformer.resblocks[-1] for m in model.modules() if isinstance(m, VisionTransformer)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no open_clip VisionTransformer for correlative self-attention")
    for block in blocks:
        block.attention = functools.partial(_csa_block_attention, block.attn)  # instance attribute over the method
    try:
        yield
    finally:
        for block in blocks:
            del block.attention  # back to the class's attention


class ClipModule(nn.Module):
    """Image and text towers -> L2-normalised features and the logit scale."""

    def __init__(self, cfg: ClipTowersConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = build_open_clip(cfg)

    @property
    def image_size(self) -> int:
        return tower_image_size(self.clip)

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(image, normalize=True)  # B x D

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text, normalize=True)  # B x D

    def encode_image_dense(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised pooled features (B x D) and projected, un-normalised patch tokens (B x P x D).

        The patch tokens are the tower's outputs after ``ln_post`` without the class token, times ``proj`` (what
        FSC-CLIP's ``--return-dense-tokens`` and patch-level zero-shot segmentation use). Only ViT towers whose
        ``_pool`` returns patch tokens are supported."""
        visual = self.clip.visual
        if not hasattr(visual, "_pool") or not hasattr(visual, "output_tokens"):
            raise TypeError(f"dense image tokens need an open_clip VisionTransformer, got {type(visual).__name__}")
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(image)  # B x D, B x P x W
        finally:
            visual.output_tokens = previous
        if visual.proj is not None:
            tokens = tokens @ visual.proj  # B x P x D
        return F.normalize(pooled, dim=-1), tokens

    def encode_text_dense(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised pooled features (B x D) and all projected, un-normalised token outputs (B x L x D), the
        latter after ``ln_final`` as in FSC-CLIP's dense text tokens. Pooling is the tower's own (EOT by default),
        so the pooled features equal :meth:`encode_text`."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)  # B x L x W
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # B x L x W
        pooled = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        if projection is not None:
            project = projection if isinstance(projection, nn.Linear) else (lambda t: t @ projection)
            pooled, x = project(pooled), project(x)  # B x D, B x L x D
        return F.normalize(pooled, dim=-1), x

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(image),
            "text_features": self.encode_text(text),
            "logit_scale": self.clip.logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp ``logit_scale`` to [0, ln(max_logit_scale)] (open_clip does this after every optimiser step)."""
        self.clip.logit_scale.clamp_(0, torch.log(torch.tensor(self.cfg.max_logit_scale)).item())
