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

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import CLIP_MAX_LOGIT_SCALE
from ..losses.ema import ema_update_
from .clip import ClipTowersConfig, build_open_clip


def mlp_head(
    dims: Sequence[int], last_bn: bool = False, last_bn_affine: bool = True, bias: bool = True, last_bias: bool = True
) -> nn.Sequential:
    """``Linear - BN - ReLU`` for every hidden layer, a plain final ``Linear`` and optionally a final BN.
    ``bias``/``last_bias``: biases of the hidden and of the final ``Linear``."""
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last_bias if i == len(dims) - 2 else bias))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


@dataclass
class SslHeadsConfig:
    """The non-contrastive heads of clip-rocket's baselines, on the towers' pooled features."""

    kind: str = "none"
    """``none``, ``siamlip`` (SimSiam projector + cross-modal predictors) or ``barlip`` (Barlow Twins projector)."""
    hidden_dim: int = 2048
    """hidden width (reference: 2048 SiamLIP, 3000 BarLIP)."""
    dim: int = 128
    """output width (reference: 128 SiamLIP, 8192 BarLIP)."""
    separate_child: bool = False
    """separate heads for the augmented views (``--separate-proj-child``); otherwise shared with the global ones."""
    siamlip_last_bn: bool = True
    """SiamLIP projector ends in a non-affine BatchNorm (off: ``--siamlip-no-last-bn``)."""
    momentum: bool = False
    """BYOLIP: SiamLIP targets from an EMA copy of the whole model."""


class SiamLipHeads(nn.Module):
    """SimSiam-style heads: per modality a projector ``Linear(in, H, no bias) - BN - ReLU - Linear(H, D, no bias)
    [- BN(D, affine=False)]`` giving the targets ``v``, and the cross-modal predictors image->text and text->image
    ``Linear(D, H, no bias) - BN - ReLU - Linear(H, D)`` giving ``p``."""

    def __init__(self, cfg: SslHeadsConfig, image_width: int, text_width: int, child: bool = False):
        super().__init__()
        h, d = cfg.hidden_dim, cfg.dim
        last_bn = dict(last_bn=cfg.siamlip_last_bn, last_bn_affine=False, bias=False, last_bias=False)
        self.image_projector = mlp_head([image_width, h, d], **last_bn)
        self.text_projector = mlp_head([text_width, h, d], **last_bn)
        self.image_text_predictor = mlp_head([d, h, d], bias=False)
        self.text_image_predictor = mlp_head([d, h, d], bias=False)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        v_img, v_txt = self.image_projector(image), self.text_projector(text)  # B x D
        return {
            "ssl_image": v_img,
            "ssl_text": v_txt,
            "pred_image": self.image_text_predictor(v_img),
            "pred_text": self.text_image_predictor(v_txt),
        }


class BarLipHeads(nn.Module):
    """Barlow Twins projectors per modality: ``Linear(in, H) - BN - ReLU - Linear(H, H) - BN - ReLU - Linear(H, D)
    - BN(D)``; the final affine BatchNorm standardises the features along the batch (the loss does no more).
    Linears before a BatchNorm carry no bias (a bias there is cancelled exactly by the BatchNorm)."""

    def __init__(self, cfg: SslHeadsConfig, image_width: int, text_width: int):
        super().__init__()
        h, d = cfg.hidden_dim, cfg.dim
        self.image_projector = mlp_head([image_width, h, h, d], last_bn=True, bias=False, last_bias=False)
        self.text_projector = mlp_head([text_width, h, h, d], last_bn=True, bias=False, last_bias=False)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"ssl_image": self.image_projector(image), "ssl_text": self.text_projector(text)}


SSL_HEADS = {"siamlip": SiamLipHeads, "barlip": BarLipHeads}


@dataclass
class ClipRocketConfig:
    towers: ClipTowersConfig
    separate_proj: bool = True
    """l2l MLP heads for the augmented views; otherwise the views go through the CLIP projectors."""
    l2l_hidden_dim: int = 4096
    l2l_dim: int = 256
    init_l2l_logit_scale: float = math.log(1 / 0.1)
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE
    ssl: SslHeadsConfig = field(default_factory=SslHeadsConfig)
    """non-contrastive heads (SiamLIP/BYOLIP/BarLIP)."""
    momentum_tau: float = 0.99
    """BYOLIP: constant EMA rate of the momentum copy, applied after every optimiser step."""


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
            raise ValueError(
                f"{cfg.towers.model_name}: clip-rocket needs a ViT tower with a `proj` parameter and a "
                "text tower with a `text_projection` parameter"
            )
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
        self.ssl_heads = self.build_ssl_heads(cfg.ssl)
        self.ssl_view_heads = self.build_ssl_heads(cfg.ssl) if cfg.ssl.separate_child else self.ssl_heads
        self.momentum_net = None
        if cfg.ssl.momentum:
            if cfg.ssl.kind != "siamlip":
                raise ValueError(f"the momentum model (BYOLIP) needs SiamLIP heads, got ssl kind {cfg.ssl.kind!r}")
            twin = copy.deepcopy(self)  # copied while momentum_net is None: the twin has no momentum copy itself
            twin.requires_grad_(False)
            self.momentum_net = twin

    def build_ssl_heads(self, cfg: SslHeadsConfig) -> Optional[nn.Module]:
        if cfg.kind == "none":
            return None
        if cfg.kind not in SSL_HEADS:
            raise ValueError(f"unknown ssl head kind {cfg.kind!r}; choose from none, {', '.join(SSL_HEADS)}")
        return SSL_HEADS[cfg.kind](cfg, self.image_width, self.text_width)

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

    def encode_image_l2l(self, image: torch.Tensor) -> torch.Tensor:
        """The l2l head's embedding of a (global) image: clip-rocket's ``h`` branch of zero-shot evaluation."""
        self._require_l2l()
        return F.normalize(self.l2l_image_projector(self.image_pooled(image)), dim=-1)

    def encode_text_l2l(self, text: torch.Tensor) -> torch.Tensor:
        self._require_l2l()
        return F.normalize(self.l2l_text_projector(self.text_pooled(text)), dim=-1)

    def _require_l2l(self) -> None:
        if not self.cfg.separate_proj:
            raise ValueError("this model has no l2l heads (trained without --separate-proj)")

    def _pooled_views(self, views: torch.Tensor, pooled) -> torch.Tensor:
        A, B = views.shape[:2]
        return pooled(views.flatten(0, 1)).view(A, B, -1)  # A x B x W (towers use LayerNorm: one pass for all)

    @staticmethod
    def _per_view(head, feats: torch.Tensor) -> torch.Tensor:
        # heads hold BatchNorm: one call per view keeps per-view batch statistics, as the reference does
        return torch.stack([head(f) for f in feats.unbind(0)])

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_views: Optional[torch.Tensor] = None,
        text_views: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        img, txt = self.image_pooled(image), self.text_pooled(text)  # B x W
        out = {
            "image_features": F.normalize(self.image_projector(img), dim=-1),
            "text_features": F.normalize(self.text_projector(txt), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        has_views = image_views is not None and text_views is not None
        if has_views:
            img_v = self._pooled_views(image_views, self.image_pooled)  # A x B x W
            txt_v = self._pooled_views(text_views, self.text_pooled)
            if self.cfg.separate_proj:
                h_img = self._per_view(self.l2l_image_projector, img_v)
                h_txt = self._per_view(self.l2l_text_projector, txt_v)
            else:
                h_img, h_txt = self.image_projector(img_v), self.text_projector(txt_v)
            out["image_views"] = F.normalize(h_img, dim=-1)  # A x B x D_l2l
            out["text_views"] = F.normalize(h_txt, dim=-1)
            out["l2l_logit_scale"] = (self.l2l_logit_scale if self.cfg.separate_proj else self.logit_scale).exp()
        if self.ssl_heads is not None:
            out.update(self.ssl_heads(img, txt))
            if has_views:
                per_view = [self.ssl_view_heads(i, t) for i, t in zip(img_v.unbind(0), txt_v.unbind(0))]
                for key in per_view[0]:
                    out[f"{key}_views"] = torch.stack([v[key] for v in per_view])  # A x B x D
        if self.momentum_net is not None:
            with torch.no_grad():
                twin = self.momentum_net(image, text, image_views, text_views)
            for key in ("ssl_image", "ssl_text", "ssl_image_views", "ssl_text_views"):
                if key in twin:
                    out[key.replace("ssl_", "target_")] = twin[key]
        return out

    def online_parameters(self):
        """(name, parameter) of everything but the momentum copy, in the momentum copy's order."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("momentum_net.")]

    @torch.no_grad()
    def update_momentum(self) -> None:
        """BYOLIP: ``theta_m <- tau theta_m + (1 - tau) theta`` with the constant ``momentum_tau``."""
        if self.momentum_net is None:
            return
        online = self.online_parameters()
        target = list(self.momentum_net.named_parameters())
        if [n for n, _ in online] != [n for n, _ in target]:
            raise RuntimeError("momentum copy and online model have different parameters")
        ema_update_([p for _, p in target], [p for _, p in online], self.cfg.momentum_tau)

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
