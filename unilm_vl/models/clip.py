"""Model ``clip``: open_clip image and text towers (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), as a thin fairseq adapter over :class:`unilm_vl.modules.clip.ClipModule`.

Input: ``image`` B x 3 x H x W, ``text`` B x L token ids. Output: ``{"image_features", "text_features"}`` (B x D,
L2-normalised) and ``"logit_scale"`` (exp of the learned scale, clamped to <= 100 after every optimiser step).
Archs: ``clip_tiny`` / ``clip_small`` (CPU-sized) and open_clip's named towers (``clip_vit_b_32``, ...);
``--open-clip-model`` takes any open_clip registry name and ``--pretrained`` a local weights file.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE
from ..modules.clip import ClipModule, ClipTowersConfig, tower_norm


@dataclass
class ClipConfig(FairseqDataclass):
    open_clip_model: str = field(default="unilm-vl-clip-tiny", metadata={
        "help": "open_clip registry name of the towers (e.g. ViT-B-32, ViT-B-16, or our unilm-vl-clip-tiny)"})
    pretrained: Optional[str] = field(default=None, metadata={
        "help": "local path of open_clip weights to start from (no hub downloads)"})
    init_logit_scale: float = field(default=CLIP_INIT_LOGIT_SCALE, metadata={
        "help": "initial learned log logit scale, ln(1/0.07) as in CLIP (ignored when loading --pretrained)"})
    max_logit_scale: float = field(default=CLIP_MAX_LOGIT_SCALE, metadata={
        "help": "exp(logit_scale) is clamped to at most this after each optimiser step"})
    force_quick_gelu: bool = field(default=False, metadata={
        "help": "use QuickGELU activations (needed for OpenAI-trained weights)"})


@register_model("clip", dataclass=ClipConfig)
class ClipModel(BaseFairseqModel):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = ClipModule(ClipTowersConfig(
            model_name=cfg.open_clip_model, pretrained=cfg.pretrained, init_logit_scale=cfg.init_logit_scale,
            max_logit_scale=cfg.max_logit_scale, force_quick_gelu=cfg.force_quick_gelu))
        self.image_mean, self.image_std = tower_norm(self.towers.clip)

    @classmethod
    def build_model(cls, cfg: ClipConfig, task):
        return cls(cfg)

    @property
    def image_size(self) -> int:
        return self.towers.image_size

    @property
    def context_length(self) -> int:
        return self.towers.context_length

    def forward(self, image, text):
        return self.towers(image, text)

    def encode_image(self, image):
        return self.towers.encode_image(image)

    def encode_text(self, text):
        return self.towers.encode_text(text)

    def logit_scale_value(self) -> float:
        return float(self.towers.clip.logit_scale.detach().exp())

    def after_optimizer_step(self, update_num: int) -> None:
        self.towers.clamp_logit_scale()

    def max_positions(self):
        return None


def set_default_arg(args, name, value):
    """Arch functions only fill options the user did not give."""
    if getattr(args, name, None) is None:
        setattr(args, name, value)


@register_model_architecture("clip", "clip_tiny")
def clip_tiny(args):
    """ViT 2x128 patch 8 at 64 px, text 2x128, 64-d embedding: trains on CPU in minutes."""
    set_default_arg(args, "open_clip_model", "unilm-vl-clip-tiny")


@register_model_architecture("clip", "clip_small")
def clip_small(args):
    """ViT 6x384 patch 8 at 96 px, text 6x256, 256-d embedding."""
    set_default_arg(args, "open_clip_model", "unilm-vl-clip-small")


@register_model_architecture("clip", "clip_vit_b_32")
def clip_vit_b_32(args):
    set_default_arg(args, "open_clip_model", "ViT-B-32")


@register_model_architecture("clip", "clip_vit_b_16")
def clip_vit_b_16(args):
    set_default_arg(args, "open_clip_model", "ViT-B-16")


@register_model_architecture("clip", "clip_vit_l_14")
def clip_vit_l_14(args):
    set_default_arg(args, "open_clip_model", "ViT-L-14")
