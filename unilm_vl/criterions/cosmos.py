"""Criterion ``cosmos``: the COSMOS objective (Kim et al., CVPR 2025, "COSMOS: Cross-Modality Self-Distillation for
Vision Language Pre-training"; reference ``ExplainableML/cosmos`` ``src/open_clip/loss.py`` ``COSMOSLoss``), for
the ``cosmos`` model.

Sample: the ``image_text_contrastive`` task's multi-crop batches (``--use-imagecrop-aug``; see
:mod:`unilm_vl.data.multicrop`) or plain batches (one view each, e.g. validation).

Loss (:func:`unilm_vl.losses.cosmos.cosmos_loss`), weights 1:1, each term logged::

    distill_loss = 1/4 sum_{S in {img_cross, txt_cross}, T in {teacher img, teacher txt}} CLIP(S, sg(T); distill scale)
    clip_loss    = CLIP(global crops, all caption views; logit scale)

``CLIP`` is the mean over view pairs of the symmetric InfoNCE; it is not DINO (no centering, no sharpening, no
prototypes). Features are gathered across ranks as in criterion ``clip`` (``--gather-gradient``, ``full`` by
default; the reference recipes gather as ``own``); validation uses each rank's local batch. ``sample_size`` is 1 per
rank.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion

from ..losses.cosmos import cosmos_loss
from ..losses.distributed import data_parallel_rank_world
from ._gathering import GatherConfig
from .clip import ContrastiveCriterion, contrastive_logging_output


@dataclass
class CosmosCriterionConfig(GatherConfig):
    pass


@register_criterion("cosmos", dataclass=CosmosCriterionConfig)
class CosmosCriterion(ContrastiveCriterion):
    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        for key in ("image_cross", "teacher_image_features", "distill_logit_scale"):
            assert key in out, f"criterion cosmos needs the cosmos model (--arch cosmos_tiny, ...); no {key!r}"
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        losses = cosmos_loss(
            out["image_features"],
            out["text_features"],
            out["image_cross"],
            out["text_cross"],
            out["teacher_image_features"],
            out["teacher_text_features"],
            out["logit_scale"],
            out["distill_logit_scale"],
            num_global_crops=out["num_global_crops"],
            rank=rank,
            world_size=world,
            local_loss=self.cfg.local_loss,
            gradient=self.gather_gradient,
        )
        loss = sum(losses.values())
        # accuracies of the first global crop against the first (global) caption
        first = {**out, "image_features": out["image_features"][0], "text_features": out["text_features"][0]}
        logging_output = contrastive_logging_output(loss, losses, first, sample)
        logging_output["distill_logit_scale"] = out["distill_logit_scale"].detach().float().item()
        return loss, 1, logging_output
