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
from ..modules.clip_negatives import forward_with_negatives
from ..modules.lora import LoraConfig, apply_lora, mark_only_lora_as_trainable


@dataclass
class ClipConfig(FairseqDataclass):
    open_clip_model: str = field(
        default="unilm-vl-clip-tiny",
        metadata={"help": "open_clip registry name of the towers (e.g. ViT-B-32, ViT-B-16, or our unilm-vl-clip-tiny)"},
    )
    pretrained: Optional[str] = field(
        default=None, metadata={"help": "local path of open_clip weights to start from (no hub downloads)"}
    )
    init_logit_scale: float = field(
        default=CLIP_INIT_LOGIT_SCALE,
        metadata={"help": "initial learned log logit scale, ln(1/0.07) as in CLIP (ignored when loading --pretrained)"},
    )
    max_logit_scale: float = field(
        default=CLIP_MAX_LOGIT_SCALE,
        metadata={"help": "exp(logit_scale) is clamped to at most this after each optimiser step"},
    )
    force_quick_gelu: bool = field(
        default=False, metadata={"help": "use QuickGELU activations (needed for OpenAI-trained weights)"}
    )
    lora_rank: int = field(
        default=-1,
        metadata={
            "help": "LoRA rank r of FSC-CLIP's LoRA fine-tuning (reference: 4): adapts every MLP Linear, the patch "
            "Conv2d and every attention block of both towers after loading --pretrained and freezes all other "
            "weights (logit_scale included); -1 = off"
        },
    )
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA updates are scaled by lora_alpha / lora_rank"})
    lora_zero_init: bool = field(
        default=False,
        metadata={
            "help": "zero-initialise the LoRA B of the attention in-projections too; the reference draws it "
            "xavier-uniform, so that the LoRA model differs from the pretrained one at initialisation"
        },
    )


@register_model("clip", dataclass=ClipConfig)
class ClipModel(BaseFairseqModel):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = ClipModule(
            ClipTowersConfig(
                model_name=cfg.open_clip_model,
                pretrained=cfg.pretrained,
                init_logit_scale=cfg.init_logit_scale,
                max_logit_scale=cfg.max_logit_scale,
                force_quick_gelu=cfg.force_quick_gelu,
            )
        )
        self.image_mean, self.image_std = tower_norm(self.towers.clip)
        if getattr(cfg, "lora_rank", -1) > 0:
            lora_cfg = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, zero_init=cfg.lora_zero_init)
            apply_lora(self.towers.clip, lora_cfg)
            mark_only_lora_as_trainable(self)

    @classmethod
    def build_model(cls, cfg: ClipConfig, task):
        return cls(cfg)

    @property
    def image_size(self) -> int:
        return self.towers.image_size

    @property
    def context_length(self) -> int:
        return self.towers.context_length

    def forward(self, image, text, neg_text=None, neg_mask=None, return_dense_tokens: bool = False):
        """Hard-negative captions (``neg_text``/``neg_mask``, type-major) and dense tokens are optional extras of
        the NegCLIP / FSC-CLIP criteria; see :mod:`unilm_vl.modules.clip_negatives`."""
        if neg_text is None and not return_dense_tokens:
            return self.towers(image, text)
        return forward_with_negatives(self.towers, image, text, neg_text, neg_mask, return_dense_tokens)

    def encode_image(self, image):
        return self.towers.encode_image(image)

    def encode_text(self, text):
        return self.towers.encode_text(text)

    def encode_image_dense(self, image):
        """(L2-normalised pooled B x D, projected un-normalised patch tokens B x P x D); see
        :meth:`unilm_vl.modules.clip.ClipModule.encode_image_dense`."""
        return self.towers.encode_image_dense(image)

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
