"""Towers and heads of the improved CLIP recipe (clip-rocket, Fini et al. 2023, "Improved baselines for
vision-language pre-training"), on open_clip towers.

The open_clip towers are built (and pretrained weights loaded) as usual, then their projections are moved into
``image_projector`` / ``text_projector`` (``Linear(width, D, bias=False)``, the reference's CLIP projectors) and
removed from the towers, so the towers return pooled pre-projection features. ``separate_proj`` adds the
reference's l2l heads for the augmented views: ``Linear(in, H) - BN - ReLU - Linear(H, H) - BN - ReLU -
Linear(H, D_l2l)`` (BatchNorm becomes SyncBatchNorm under DDP through ``convert_sync_batchnorm``), with their own
learnable ``l2l_logit_scale`` starting at ln(1/0.1).

Outputs (dict): ``image_features``/``text_features`` (B x D, L2-normalised, global views through the CLIP
projectors), ``logit_scale`` (exp), and with views ``image_views``/``text_views`` (A x B x D_l2l, L2-normalised)
and ``l2l_logit_scale`` (exp).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import CLIP_MAX_LOGIT_SCALE
from .clip import ClipTowersConfig, build_open_clip


def mlp_head(dims: Sequence[int], last_bn: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """``Linear - BN - ReLU`` for every hidden layer, a plain final ``Linear`` and optionally a final BN."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


@dataclass
class ClipRocketConfig:
    towers: ClipTowersConfig
    separate_proj: bool = True
    """l2l MLP heads for the augmented views; otherwise the views go through the CLIP projectors."""
    l2l_hidden_dim: int = 4096
    l2l_dim: int = 256
    init_l2l_logit_scale: float = math.log(1 / 0.1)
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE


def _move_projection(param: Optional[torch.Tensor], in_dim: int) -> nn.Linear:
    """An open_clip projection parameter (in x out, applied as ``x @ P``) as ``Linear(in, out, bias=False)``."""
    linear = nn.Linear(in_dim, param.shape[1], bias=False)
    with torch.no_grad():
        linear.weight.copy_(param.T)
    return linear


class ClipRocketModule(nn.Module):
    def __init__(self, cfg: ClipRocketConfig):
        super().__init__()
        self.cfg = cfg
        clip = build_open_clip(cfg.towers)
        if getattr(clip.visual, "proj", None) is None or not isinstance(clip.text_projection, nn.Parameter):
            raise ValueError(f"{cfg.towers.model_name}: clip-rocket needs a ViT tower with a `proj` parameter and a "
                             "text tower with a `text_projection` parameter")
        self.image_projector = _move_projection(clip.visual.proj, clip.visual.proj.shape[0])
        self.text_projector = _move_projection(clip.text_projection, clip.text_projection.shape[0])
        clip.visual.proj = None
        clip.text_projection = None
        self.clip = clip
        self.image_width = self.image_projector.in_features
        self.text_width = self.text_projector.in_features
        self.embed_dim = self.image_projector.out_features
        if cfg.separate_proj:
            h, d = cfg.l2l_hidden_dim, cfg.l2l_dim
            self.l2l_image_projector = mlp_head([self.image_width, h, h, d])
            self.l2l_text_projector = mlp_head([self.text_width, h, h, d])
            self.l2l_logit_scale = nn.Parameter(torch.tensor(cfg.init_l2l_logit_scale))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def image_pooled(self, image: torch.Tensor) -> torch.Tensor:
        return self.clip.visual(image)  # B x W_img (no projection)

    def text_pooled(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)  # B x W_txt (no projection)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projector(self.image_pooled(image)), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projector(self.text_pooled(text)), dim=-1)

    def _views(self, views: torch.Tensor, pooled, head, fallback) -> torch.Tensor:
        A, B = views.shape[:2]
        feats = pooled(views.flatten(0, 1))  # (A*B) x W
        feats = head(feats) if self.cfg.separate_proj else fallback(feats)
        return F.normalize(feats, dim=-1).view(A, B, -1)  # A x B x D

    def forward(self, image: torch.Tensor, text: torch.Tensor, image_views: Optional[torch.Tensor] = None,
                text_views: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        out = {"image_features": self.encode_image(image), "text_features": self.encode_text(text),
               "logit_scale": self.logit_scale.exp()}
        if image_views is not None and text_views is not None:
            img_head = self.l2l_image_projector if self.cfg.separate_proj else None
            txt_head = self.l2l_text_projector if self.cfg.separate_proj else None
            out["image_views"] = self._views(image_views, self.image_pooled, img_head, self.image_projector)
            out["text_views"] = self._views(text_views, self.text_pooled, txt_head, self.text_projector)
            out["l2l_logit_scale"] = (self.l2l_logit_scale if self.cfg.separate_proj else self.logit_scale).exp()
        return out

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp both log scales to [0, ln(max)] after each optimiser step, as the reference does."""
        top = math.log(self.cfg.max_logit_scale)
        self.logit_scale.clamp_(0, top)
        if self.cfg.separate_proj:
            self.l2l_logit_scale.clamp_(0, top)

    def open_clip_state_dict(self) -> Dict[str, torch.Tensor]:
        """The towers as a plain open_clip CLIP state dict (projections moved back), e.g. for WiSE-FT or export."""
        state = {k: v for k, v in self.clip.state_dict().items()}
        state["visual.proj"] = self.image_projector.weight.detach().T.contiguous()
        state["text_projection"] = self.text_projector.weight.detach().T.contiguous()
        return state
