"""Criterion ``negclip``: the CLIP loss with hard-negative captions added to the image->text softmax (Yuksekgonul
et al., ICLR 2023, "When and why vision-language models behave like bags-of-words"; as FSC-CLIP's NegCLIP baseline
runs it: ``--add-random-text-hard-negatives negclip --loss-name clip``, ``ClipLoss`` in ``ytaek-oh/fsc-clip``
``src/training/losses/loss.py``).

Sample: the contrastive task's batch plus, from ``--hard-negatives``, ``net_input["neg_text"]`` ((T*B) x L,
type-major: row ``t*B + b`` = negative type t of sample b) and ``net_input["neg_mask"]`` ((T*B,) 0/1). Batches
without them (validation, or no ``--hard-negatives``) give the plain CLIP loss, and so does a training step in which
no rank holds a valid negative (the reference then appends no column; the ranks compare their counts first).

Loss (:func:`unilm_vl.losses.negatives.negclip_loss`): image->text CE over
``[all N positives; all T*N negatives of every rank]``, text->image CE over the N positives, averaged. Missing
negatives (as long as some rank has a valid one) are zero vectors whose logit-0 column stays in the softmax (the
reference's behaviour); ``--mask-missing-negatives`` drops them instead. Gathering is the ``clip`` criterion's
(``--gather-gradient``, ``full`` by default; the reference gathers without gradient whatever its
``--gather-with-grad`` says and substitutes the own rows, which gives 1/W of the full-batch gradient:
``--gather-gradient own`` reproduces that). The reference's ``--local-loss`` is broken (no label offset, no gradient
through any gathered slot); here it is exact in every mode (local rows against all columns, labels offset by
``B * rank``; with ``query`` only the local rows get a gradient).
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from ..losses.distributed import data_parallel_rank_world
from ..losses.negatives import fill_missing, negclip_loss
from .clip import ClipCriterionConfig, ContrastiveCriterion, contrastive_logging_output


@dataclass
class NegclipCriterionConfig(ClipCriterionConfig):
    mask_missing_negatives: bool = field(
        default=False,
        metadata={
            "help": "drop missing hard negatives from the softmax; the reference keeps them as zero vectors (logit 0)"
        },
    )


@register_criterion("negclip", dataclass=NegclipCriterionConfig)
class NegclipCriterion(ContrastiveCriterion):
    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        negatives = None
        if "neg_text_features" in out:
            negatives = fill_missing(out["neg_text_features"], out["neg_mask"])  # (T*B) x D
        losses = negclip_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            negatives,
            out.get("neg_mask"),
            rank,
            world,
            self.cfg.local_loss,
            self.gather_gradient,
            self.cfg.label_smoothing,
            self.cfg.mask_missing_negatives,
        )
        loss = sum(losses.values())
        return loss, 1, contrastive_logging_output(loss, losses, out, sample)
