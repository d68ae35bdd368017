"""Model ``clip_rocket``: CLIP with the improved recipe's separate l2l projectors for augmented views (Fini et al.
2023, "Improved baselines for vision-language pre-training"), a thin adapter over
:class:`unilm_vl.modules.clip_rocket.ClipRocketModule`.

Input: ``image`` B x 3 x H x W and ``text`` B x L (global views), optionally ``image_views`` A x B x 3 x H x W and
``text_views`` A x B x L (the task's ``--num-augs`` strong views). Output: see the module. Under DDP on CUDA the
heads' BatchNorm layers are converted to SyncBatchNorm, as in the reference (CPU/gloo keeps per-rank BatchNorm:
PyTorch's SyncBatchNorm needs CUDA).

``--ssl-head siamlip|barlip`` adds the non-contrastive heads of the reference's SiamLIP/BarLIP models (and
``--momentum`` the EMA copy of BYOLIP); the archs ``clip_rocket_{siamlip,byolip,barlip,swalip}_*`` set them.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE
from ..modules.clip import ClipTowersConfig, tower_image_size, tower_norm
from ..modules.clip_rocket import ClipRocketConfig, ClipRocketModule, SslHeadsConfig
from .clip import set_default_arg

SSL_HEAD_CHOICES = ChoiceEnum(["none", "siamlip", "barlip"])


@dataclass
class ClipRocketModelConfig(FairseqDataclass):
    open_clip_model: str = field(
        default="unilm-vl-clip-tiny", metadata={"help": "open_clip registry name of the towers (a ViT image tower)"}
    )
    pretrained: Optional[str] = field(default=None, metadata={"help": "local path of open_clip weights to start from"})
    init_logit_scale: float = field(
        default=CLIP_INIT_LOGIT_SCALE, metadata={"help": "initial log logit scale of the CLIP (global) term"}
    )
    max_logit_scale: float = field(
        default=CLIP_MAX_LOGIT_SCALE,
        metadata={"help": "both exp(logit scales) are clamped to at most this after each optimiser step"},
    )
    separate_proj: bool = field(
        default=True,
        metadata={"help": "separate l2l MLP projectors (and logit scale) for the augmented views (--separate-proj)"},
    )
    l2l_hidden_dim: int = field(default=4096, metadata={"help": "hidden width of the l2l MLP projectors"})
    l2l_dim: int = field(default=256, metadata={"help": "output width of the l2l MLP projectors"})
    force_quick_gelu: bool = field(default=False, metadata={"help": "QuickGELU activations (OpenAI weights)"})
    ssl_head: SSL_HEAD_CHOICES = field(
        default="none",
        metadata={
            "help": "non-contrastive heads on the pooled features: siamlip (SimSiam projector + image->text and "
            "text->image predictors, for the siamlip/byolip criteria) or barlip (Barlow Twins projector)"
        },
    )
    ssl_hidden_dim: int = field(
        default=2048,
        metadata={"help": "hidden width of the non-contrastive heads (reference: 2048 SiamLIP, 3000 BarLIP)"},
    )
    ssl_dim: int = field(
        default=128,
        metadata={"help": "output width of the non-contrastive heads (reference: 128 SiamLIP, 8192 BarLIP)"},
    )
    separate_proj_child: bool = field(
        default=False,
        metadata={"help": "separate non-contrastive heads for the augmented views (else shared with the global views)"},
    )
    siamlip_no_last_bn: bool = field(
        default=False, metadata={"help": "drop the final non-affine BatchNorm of the SiamLIP projector"}
    )
    momentum: bool = field(
        default=False,
        metadata={"help": "BYOLIP: SiamLIP targets from an EMA copy of the whole model (saved in the checkpoint)"},
    )
    momentum_tau: float = field(
        default=0.99, metadata={"help": "constant EMA rate of the momentum copy, applied after every optimiser step"}
    )


@register_model("clip_rocket", dataclass=ClipRocketModelConfig)
class ClipRocketModel(BaseFairseqModel):
    def __init__(self, cfg: ClipRocketModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = ClipRocketModule(
            ClipRocketConfig(
                towers=ClipTowersConfig(
                    model_name=cfg.open_clip_model,
                    pretrained=cfg.pretrained,
                    init_logit_scale=cfg.init_logit_scale,
                    max_logit_scale=cfg.max_logit_scale,
                    force_quick_gelu=cfg.force_quick_gelu,
                ),
                separate_proj=cfg.separate_proj,
                l2l_hidden_dim=cfg.l2l_hidden_dim,
                l2l_dim=cfg.l2l_dim,
                max_logit_scale=cfg.max_logit_scale,
                ssl=SslHeadsConfig(
                    kind=str(cfg.ssl_head),
                    hidden_dim=cfg.ssl_hidden_dim,
                    dim=cfg.ssl_dim,
                    separate_child=cfg.separate_proj_child,
                    siamlip_last_bn=not cfg.siamlip_no_last_bn,
                    momentum=cfg.momentum,
                ),
                momentum_tau=cfg.momentum_tau,
            )
        )
        self.image_mean, self.image_std = tower_norm(self.net.clip)

    @classmethod
    def build_model(cls, cfg: ClipRocketModelConfig, task):
        model = cls(cfg)
        if torch.cuda.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    @property
    def image_size(self) -> int:
        return tower_image_size(self.net.clip)

    @property
    def context_length(self) -> int:
        return int(self.net.clip.context_length)

    def forward(self, image, text, image_views=None, text_views=None):
        return self.net(image, text, image_views, text_views)

    def encode_image(self, image):
        return self.net.encode_image(image)

    def encode_text(self, text):
        return self.net.encode_text(text)

    @property
    def has_l2l_head(self) -> bool:
        return self.net.cfg.separate_proj

    def encode_image_l2l(self, image):
        return self.net.encode_image_l2l(image)

    def encode_text_l2l(self, text):
        return self.net.encode_text_l2l(text)

    def logit_scale_value(self) -> float:
        return float(self.net.logit_scale.detach().exp())

    def after_optimizer_step(self, update_num: int) -> None:
        """After every optimiser step, as the reference (main.py): the EMA of the momentum copy, then the clamps."""
        self.net.update_momentum()
        self.net.clamp_logit_scales()

    def max_positions(self):
        return None


@register_model_architecture("clip_rocket", "clip_rocket_tiny")
def clip_rocket_tiny(args):
    """Tiny towers (see clip_tiny) with 256-wide l2l heads to 64 dims: CPU-sized."""
    set_default_arg(args, "open_clip_model", "unilm-vl-clip-tiny")
    set_default_arg(args, "l2l_hidden_dim", 256)
    set_default_arg(args, "l2l_dim", 64)


@register_model_architecture("clip_rocket", "clip_rocket_vit_b_16")
def clip_rocket_vit_b_16(args):
    """The reference's CL2L_VITB16 shape on open_clip's ViT-B-16 (l2l heads 4096 -> 256)."""
    set_default_arg(args, "open_clip_model", "ViT-B-16")
    set_default_arg(args, "l2l_hidden_dim", 4096)
    set_default_arg(args, "l2l_dim", 256)


def _siamlip_heads(args, hidden: int, dim: int):
    set_default_arg(args, "ssl_head", "siamlip")
    set_default_arg(args, "ssl_hidden_dim", hidden)
    set_default_arg(args, "ssl_dim", dim)


def _barlip_heads(args, hidden: int, dim: int):
    set_default_arg(args, "ssl_head", "barlip")
    set_default_arg(args, "ssl_hidden_dim", hidden)
    set_default_arg(args, "ssl_dim", dim)


@register_model_architecture("clip_rocket", "clip_rocket_siamlip_tiny")
def clip_rocket_siamlip_tiny(args):
    """clip_rocket_tiny with SiamLIP heads 128 -> 32 (criterion siamlip)."""
    _siamlip_heads(args, 128, 32)
    clip_rocket_tiny(args)


@register_model_architecture("clip_rocket", "clip_rocket_byolip_tiny")
def clip_rocket_byolip_tiny(args):
    """clip_rocket_siamlip_tiny with the EMA momentum copy (criterion byolip)."""
    args.momentum = True  # a store_true flag: argparse leaves False, never None
    clip_rocket_siamlip_tiny(args)


@register_model_architecture("clip_rocket", "clip_rocket_barlip_tiny")
def clip_rocket_barlip_tiny(args):
    """clip_rocket_tiny with Barlow Twins heads 128 -> 256 (criterion barlip)."""
    _barlip_heads(args, 128, 256)
    clip_rocket_tiny(args)


@register_model_architecture("clip_rocket", "clip_rocket_swalip_tiny")
def clip_rocket_swalip_tiny(args):
    """SwALIP reuses the l2l heads: clip_rocket_tiny (criterion swalip)."""
    clip_rocket_tiny(args)


@register_model_architecture("clip_rocket", "clip_rocket_siamlip_vit_b_16")
def clip_rocket_siamlip_vit_b_16(args):
    """The reference's SiamLIP heads (2048 -> 128) on clip_rocket_vit_b_16."""
    _siamlip_heads(args, 2048, 128)
    clip_rocket_vit_b_16(args)


@register_model_architecture("clip_rocket", "clip_rocket_byolip_vit_b_16")
def clip_rocket_byolip_vit_b_16(args):
    """clip_rocket_siamlip_vit_b_16 with the EMA momentum copy (tau 0.99)."""
    args.momentum = True  # a store_true flag: argparse leaves False, never None
    clip_rocket_siamlip_vit_b_16(args)


@register_model_architecture("clip_rocket", "clip_rocket_barlip_vit_b_16")
def clip_rocket_barlip_vit_b_16(args):
    """The reference's BarLIP heads (3000 -> 8192) on clip_rocket_vit_b_16."""
    _barlip_heads(args, 3000, 8192)
    clip_rocket_vit_b_16(args)
