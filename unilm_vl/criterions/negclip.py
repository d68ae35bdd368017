"""Criterion ``negclip``: the CLIP loss with hard-negative captions added to the image->text softmax (Yuksekgonul
et al., ICLR 2023, "When and why vision-language models behave like bags-of-words"; as FSC-CLIP's NegCLIP baseline
runs it: ``--add-random-text-hard-negatives negclip --loss-name clip``, ``ClipLoss`` in ``ytaek-oh/fsc-clip``
``src/training/losses/loss.py``).

Sample: the contrastive task's batch plus, from ``--hard-negatives``, ``net_input["neg_text"]`` ((T*B) x L,
type-major: row ``t*B + b`` = negative type t of sample b) and ``net_input["neg_mask"]`` ((T*B,) 0/1). Batches
without them (validation, or no ``--hard-negatives``) give the plain CLIP loss, and so does a training step in which
no rank holds a valid negative (the reference then appends no column; the ranks compare their counts first).

Loss (:func:`unilm_vl.criterions.functional_negatives.negclip_loss`): image->text CE over
``[all N positives; all T*N negatives of every rank]``, text->image CE over the N positives, averaged. Missing
negatives (as long as some rank has a valid one) are zero vectors whose logit-0 column stays in the softmax (the
reference's behaviour); ``--mask-missing-negatives`` drops them instead. Gathering is the ``clip`` criterion's
(with gradient by default; the reference gathers without gradient whatever its ``--gather-with-grad`` says and
substitutes the own rows, which gives 1/W of the full-batch gradient; passing ``--gather-with-grad``, a store-false
flag of fairseq's parser, reproduces that). ``--local-loss`` is refused together with the gradient-free gather:
that is the reference's broken mode (no label offset, no gradient through any gathered slot); with the
gradient-carrying gather it is exact (local rows against all columns, labels offset by ``B * rank``).
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion

from . import functional_negatives
from .clip import ClipCriterionConfig, ContrastiveCriterion, contrastive_logging_output, data_parallel_rank_world


@dataclass
class NegclipCriterionConfig(ClipCriterionConfig):
    mask_missing_negatives: bool = field(default=False, metadata={
        "help": "drop missing hard negatives from the softmax; the reference keeps them as zero vectors (logit 0)"})


def check_gather_mode(cfg: ClipCriterionConfig, criterion: str) -> None:
    """The reference's gather without gradient combined with local logits leaves no gradient path through the
    own rank's keys (FSC-CLIP's ``--local-loss`` is broken: its ``_gather_features`` substitutes no slot and
    offsets no label): refused."""
    if cfg.local_loss and not cfg.gather_with_grad:
        raise ValueError(f"criterion {criterion}: --local-loss needs the gradient-carrying gather (do not pass "
                         "--gather-with-grad, which turns it off)")


@register_criterion("negclip", dataclass=NegclipCriterionConfig)
class NegclipCriterion(ContrastiveCriterion):
    def __init__(self, cfg: NegclipCriterionConfig, task):
        super().__init__(cfg, task)
        check_gather_mode(cfg, "negclip")

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        negatives = None
        if "neg_text_features" in out:
            negatives = functional_negatives.fill_missing(out["neg_text_features"], out["neg_mask"])  # (T*B) x D
        losses = functional_negatives.negclip_loss(
            out["image_features"], out["text_features"], out["logit_scale"], negatives, out.get("neg_mask"),
            rank, world, self.cfg.local_loss, self.cfg.gather_with_grad, self.cfg.label_smoothing,
            self.cfg.mask_missing_negatives)
        loss = sum(losses.values())
        return loss, 1, contrastive_logging_output(loss, losses, out, sample)
