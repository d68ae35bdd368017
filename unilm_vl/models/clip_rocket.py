"""Model ``clip_rocket``: CLIP with the improved recipe's separate l2l projectors for augmented views (Fini et al.
2023, "Improved baselines for vision-language pre-training"), a thin adapter over
:class:`unilm_vl.modules.clip_rocket.ClipRocketModule`.

Input: ``image`` B x 3 x H x W and ``text`` B x L (global views), optionally ``image_views`` A x B x 3 x H x W and
``text_views`` A x B x L (the task's ``--num-augs`` strong views). Output: see the module. Under DDP on CUDA the
heads' BatchNorm layers are converted to SyncBatchNorm, as in the reference (CPU/gloo keeps per-rank BatchNorm:
PyTorch's SyncBatchNorm needs CUDA).
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE
from ..modules.clip import ClipTowersConfig, tower_image_size, tower_norm
from ..modules.clip_rocket import ClipRocketConfig, ClipRocketModule
from .clip import set_default_arg


@dataclass
class ClipRocketModelConfig(FairseqDataclass):
    open_clip_model: str = field(default="unilm-vl-clip-tiny", metadata={
        "help": "open_clip registry name of the towers (a ViT image tower)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "local path of open_clip weights to start from"})
    init_logit_scale: float = field(default=CLIP_INIT_LOGIT_SCALE, metadata={
        "help": "initial log logit scale of the CLIP (global) term"})
    max_logit_scale: float = field(default=CLIP_MAX_LOGIT_SCALE, metadata={
        "help": "both exp(logit scales) are clamped to at most this after each optimiser step"})
    separate_proj: bool = field(default=True, metadata={
        "help": "separate l2l MLP projectors (and logit scale) for the augmented views (--separate-proj)"})
    l2l_hidden_dim: int = field(default=4096, metadata={"help": "hidden width of the l2l MLP projectors"})
    l2l_dim: int = field(default=256, metadata={"help": "output width of the l2l MLP projectors"})
    force_quick_gelu: bool = field(default=False, metadata={"help": "QuickGELU activations (OpenAI weights)"})


@register_model("clip_rocket", dataclass=ClipRocketModelConfig)
class ClipRocketModel(BaseFairseqModel):
    def __init__(self, cfg: ClipRocketModelConfig):
        super().__init__()
        self.cfg = cfg
        self.net = ClipRocketModule(ClipRocketConfig(
            towers=ClipTowersConfig(model_name=cfg.open_clip_model, pretrained=cfg.pretrained,
                                    init_logit_scale=cfg.init_logit_scale, max_logit_scale=cfg.max_logit_scale,
                                    force_quick_gelu=cfg.force_quick_gelu),
            separate_proj=cfg.separate_proj, l2l_hidden_dim=cfg.l2l_hidden_dim, l2l_dim=cfg.l2l_dim,
            max_logit_scale=cfg.max_logit_scale))
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

    def logit_scale_value(self) -> float:
        return float(self.net.logit_scale.detach().exp())

    def after_optimizer_step(self, update_num: int) -> None:
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
