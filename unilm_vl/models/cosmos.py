"""Model ``cosmos``: COSMOS (Kim et al., CVPR 2025, "COSMOS: Cross-Modality Self-Distillation for Vision Language
Pre-training"), a thin fairseq adapter over :class:`unilm_vl.modules.cosmos.CosmosModule` (student + EMA teacher).

Input (the task's ``--use-imagecrop-aug`` batches): ``image`` G x B x 3 x S x S global crops, ``image_local``
N x B x 3 x s x s local crops, ``text`` K x B x L caption views (global captions first); plain batches
(``image`` B x 3 x S x S, ``text`` B x L) count as one view each. Output: the student's normalised ``image_features``
(V x B x D), ``text_features`` (K x B x D), cross-modal ``image_cross``/``text_cross``, the teacher's
``teacher_image_features``/``teacher_text_features`` over the global views, ``logit_scale`` and
``distill_logit_scale`` (exp). Criterion: ``cosmos``.

Teacher EMA (``--momentum-teacher m``, ``--momentum-schedule fixed|cosine``): ``theta_t <- m theta_t + (1 - m)
theta_s`` over all parameters. ``--ema-order before_step`` (default) is the reference's order (EMA after backward,
before ``optimizer.step``: the teacher averages in the weights that produced this step's forward);
``after_step`` is the BYOL/DINO order. Both logit scales of student and teacher are clamped after every step.
The teacher is part of the state dict, so checkpoints carry it and resume continues it exactly.

Evaluation: ``encode_image``/``encode_text`` use the student (``--eval-net teacher``: the teacher; the reference
evaluates both), ``encode_image_dense`` the teacher as the reference's segmentation (``--dense-eval-net``).
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import II

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE
from ..losses.ema import teacher_momentum
from ..modules.clip import ClipTowersConfig, tower_norm
from ..modules.cosmos import CosmosConfig, CosmosModule, CosmosNet
from .clip import set_default_arg

MOMENTUM_SCHEDULES = ChoiceEnum(["fixed", "cosine"])
EMA_ORDERS = ChoiceEnum(["before_step", "after_step"])
EVAL_NETS = ChoiceEnum(["student", "teacher"])


@dataclass
class CosmosModelConfig(FairseqDataclass):
    open_clip_model: str = field(
        default="unilm-vl-clip-tiny",
        metadata={
            "help": "open_clip registry name of the towers (a plain ViT image tower and the built-in text tower)"
        },
    )
    pretrained: Optional[str] = field(
        default=None, metadata={"help": "local path of open_clip weights to start student and teacher from"}
    )
    init_logit_scale: float = field(
        default=CLIP_INIT_LOGIT_SCALE,
        metadata={"help": "initial log logit scale of the CLIP term; the distillation scale starts at the same value"},
    )
    max_logit_scale: float = field(
        default=CLIP_MAX_LOGIT_SCALE,
        metadata={"help": "exp of both logit scales is clamped to at most this after each optimiser step"},
    )
    force_quick_gelu: bool = field(default=False, metadata={"help": "QuickGELU activations (OpenAI weights)"})
    cross_attn_heads: int = field(
        default=8, metadata={"help": "heads of the two attentional cross poolers (reference: 8 at width 512)"}
    )
    mask_text_padding: bool = field(
        default=False,
        metadata={
            "help": "mask text positions after EOT out of the image-query cross attention (a fix; the reference "
            "attends to all context positions, padding included)"
        },
    )
    momentum_teacher: float = field(
        default=0.999,
        metadata={"help": "EMA rate m of the teacher (reference recipes: 0.999 on CC3M, 0.99 on larger data)"},
    )
    momentum_schedule: MOMENTUM_SCHEDULES = field(
        default="fixed",
        metadata={
            "help": "fixed m (the reference's --fix-momentum, every released recipe) or cosine from m to 1 over "
            "--max-update updates"
        },
    )
    momentum_total_updates: int = field(
        default=II("optimization.max_update"),
        metadata={"help": "length T of the cosine momentum schedule (fairseq's --max-update)"},
    )
    ema_order: EMA_ORDERS = field(
        default="before_step",
        metadata={
            "help": "before_step: EMA after backward and before the optimiser step (the reference); after_step: "
            "after it (BYOL/DINO)"
        },
    )
    eval_net: EVAL_NETS = field(
        default="student",
        metadata={"help": "network behind encode_image/encode_text (retrieval, zero-shot classification)"},
    )
    dense_eval_net: EVAL_NETS = field(
        default="teacher",
        metadata={
            "help": "network behind encode_image_dense (zero-shot segmentation; the reference "
            "segments with the teacher)"
        },
    )


@register_model("cosmos", dataclass=CosmosModelConfig)
class CosmosModel(BaseFairseqModel):
    def __init__(self, cfg: CosmosModelConfig):
        super().__init__()
        self.cfg = cfg
        if str(cfg.momentum_schedule) == "cosine" and not cfg.momentum_total_updates:
            raise ValueError("--momentum-schedule cosine needs --max-update (the schedule's length)")
        if not 0.0 <= cfg.momentum_teacher <= 1.0:
            raise ValueError(f"--momentum-teacher must be in [0, 1], got {cfg.momentum_teacher}")
        self.net = CosmosModule(
            CosmosConfig(
                towers=ClipTowersConfig(
                    model_name=cfg.open_clip_model,
                    pretrained=cfg.pretrained,
                    init_logit_scale=cfg.init_logit_scale,
                    max_logit_scale=cfg.max_logit_scale,
                    force_quick_gelu=cfg.force_quick_gelu,
                ),
                cross_attn_heads=cfg.cross_attn_heads,
                init_distill_logit_scale=cfg.init_logit_scale,
                max_logit_scale=cfg.max_logit_scale,
                mask_text_padding=cfg.mask_text_padding,
            )
        )
        self.image_mean, self.image_std = tower_norm(self.net.student.clip)

    @classmethod
    def build_model(cls, cfg: CosmosModelConfig, task):
        return cls(cfg)

    @property
    def image_size(self) -> int:
        return self.net.image_size

    @property
    def context_length(self) -> int:
        return self.net.context_length

    def forward(self, image, text, image_local=None):
        return self.net(image, text, image_local)

    def _net(self, which) -> CosmosNet:
        return self.net.teacher if str(which) == "teacher" else self.net.student

    @property
    def eval_net(self):
        return self._net(self.cfg.eval_net)

    def encode_image(self, image):
        return self.eval_net.encode_image(image)

    def encode_text(self, text):
        return self.eval_net.encode_text(text)

    def encode_image_dense(self, image):
        """(L2-normalised pooled B x D, projected un-normalised patch tokens B x P x D), as ClipModel's."""
        # checkpoints written before --dense-eval-net existed lack the key: the default (teacher) applies
        return self._net(getattr(self.cfg, "dense_eval_net", "teacher")).encode_image_dense(image)

    def logit_scale_value(self) -> float:
        return float(self.eval_net.logit_scale.detach().exp())

    def momentum(self, update_num: int) -> float:
        return teacher_momentum(
            update_num, self.cfg.momentum_teacher, self.cfg.momentum_total_updates or 0, str(self.cfg.momentum_schedule)
        )

    def before_optimizer_step(self, update_num: int) -> None:
        """The reference's order: the teacher EMA runs on the pre-step student weights."""
        if str(self.cfg.ema_order) == "before_step":
            self.net.update_teacher(self.momentum(update_num))

    def after_optimizer_step(self, update_num: int) -> None:
        if str(self.cfg.ema_order) == "after_step":
            self.net.update_teacher(self.momentum(update_num))
        self.net.clamp_logit_scales()

    def max_positions(self):
        return None


@register_model_architecture("cosmos", "cosmos_tiny")
def cosmos_tiny(args):
    """unilm-vl-clip-tiny towers (64 px ViT 2x128 patch 8, text 2x128, 64-d) with 4-head cross poolers; use
    local crops of 32 px (``--local-crop-size 32``): CPU-sized."""
    set_default_arg(args, "open_clip_model", "unilm-vl-clip-tiny")
    set_default_arg(args, "cross_attn_heads", 4)


@register_model_architecture("cosmos", "cosmos_vit_b_16")
def cosmos_vit_b_16(args):
    """The reference's ViT-B/16 (embed 512, 8-head cross poolers); 224 px global, 96 px local crops."""
    set_default_arg(args, "open_clip_model", "ViT-B-16")
    set_default_arg(args, "cross_attn_heads", 8)


@register_model_architecture("cosmos", "cosmos_vit_b_32")
def cosmos_vit_b_32(args):
    """The reference's ViT-B/32 variant (96 px local crops give a 3 x 3 grid)."""
    set_default_arg(args, "open_clip_model", "ViT-B-32")
    set_default_arg(args, "cross_attn_heads", 8)
