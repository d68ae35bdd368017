"""Criterion ``cosmos``: the COSMOS objective (Kim et al., CVPR 2025, "COSMOS: Cross-Modality Self-Distillation for
Vision Language Pre-training"; contrastive.md 1.7), for the ``cosmos`` model.

Sample: the ``image_text_contrastive`` task's multi-crop batches (``--use-imagecrop-aug``; see
:mod:`unilm_vl.data.multicrop`) or plain batches (one view each, e.g. validation).

Loss (:func:`unilm_vl.criterions.functional_cosmos.cosmos_loss`), weights 1:1, each term logged::

    distill_loss = 1/4 sum_{S in {img_cross, txt_cross}, T in {teacher img, teacher txt}} CLIP(S, sg(T); distill scale)
    clip_loss    = CLIP(global crops, all caption views; logit scale)

``CLIP`` is the mean over view pairs of the symmetric InfoNCE; it is not DINO (no centering, no sharpening, no
prototypes). Features are gathered across ranks as in criterion ``clip`` (with gradient by default); validation uses
each rank's local batch. ``sample_size`` is 1 per rank.
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from . import functional_cosmos
from .clip import ContrastiveCriterion, contrastive_logging_output, data_parallel_rank_world


@dataclass
class CosmosCriterionConfig(FairseqDataclass):
    local_loss: bool = field(default=False, metadata={
        "help": "compute logits of local rows against all gathered columns only (B x N instead of N x N)"})
    gather_with_grad: bool = field(default=True, metadata={
        "help": "gather features across ranks with gradient (rank-averaged gradients equal the full-batch ones); "
                "the reference recipes gather without (gradients are then 1/world_size of those)"})


@register_criterion("cosmos", dataclass=CosmosCriterionConfig)
class CosmosCriterion(ContrastiveCriterion):
    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        for key in ("image_cross", "teacher_image_features", "distill_logit_scale"):
            assert key in out, f"criterion cosmos needs the cosmos model (--arch cosmos_tiny, ...); no {key!r}"
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        losses = functional_cosmos.cosmos_loss(
            out["image_features"], out["text_features"], out["image_cross"], out["text_cross"],
            out["teacher_image_features"], out["teacher_text_features"], out["logit_scale"],
            out["distill_logit_scale"], num_global_crops=out["num_global_crops"], rank=rank, world_size=world,
            local_loss=self.cfg.local_loss, gather_with_grad=self.cfg.gather_with_grad)
        loss = sum(losses.values())
        # accuracies of the first global crop against the first (global) caption
        first = {**out, "image_features": out["image_features"][0], "text_features": out["text_features"][0]}
        logging_output = contrastive_logging_output(loss, losses, first, sample)
        logging_output["distill_logit_scale"] = out["distill_logit_scale"].detach().float().item()
        return loss, 1, logging_output
