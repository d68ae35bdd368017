"""Criterion ``clip``: the symmetric InfoNCE loss of CLIP with open_clip's ``ClipLoss`` semantics.

Features of all ranks are gathered as ``--gather-gradient`` says (``full`` by default, so that 2 ranks x B give
exactly the gradients of 1 rank x 2B; ``own`` is open_clip's default; table in :mod:`unilm_vl.losses.distributed`);
``--local-loss`` computes only the local rows against all columns. Validation uses each rank's local batch.
``sample_size`` is 1 per rank: fairseq sums gradients over ranks and divides by the summed sample size, i.e. it
averages the per-rank mean losses. Maths: :func:`unilm_vl.losses.clip.clip_loss`.
"""

from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion

from ..losses.clip import clip_loss, contrastive_accuracy
from ..losses.distributed import data_parallel_rank_world
from ._gathering import GatherConfig, resolve_gather_gradient


@dataclass
class ClipCriterionConfig(GatherConfig):
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of both cross-entropies"})


class ContrastiveCriterion(FairseqCriterion):
    """Shared plumbing of the contrastive criteria (clip, clip_rocket family, negclip, fsc_clip, cosmos): the config
    kept as ``self.cfg``, the resolved ``--gather-gradient`` as ``self.gather_gradient``, sample_size 1 per rank and
    :func:`reduce_contrastive_metrics`. Not registered itself."""

    def __init__(self, cfg, task):
        super().__init__(task)
        self.cfg = cfg
        self.gather_gradient = resolve_gather_gradient(cfg, type(self).__name__)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        reduce_contrastive_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@register_criterion("clip", dataclass=ClipCriterionConfig)
class ClipCriterion(ContrastiveCriterion):
    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        losses = clip_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            rank,
            world,
            self.cfg.local_loss,
            self.gather_gradient,
            label_smoothing=self.cfg.label_smoothing,
        )
        loss = sum(losses.values())
        return loss, 1, contrastive_logging_output(loss, losses, out, sample)


def contrastive_logging_output(loss, terms, out, sample) -> dict:
    """The logging output of a contrastive criterion (sample_size 1 per rank): the total, every loss term, the
    logit scale(s) and the in-batch retrieval accuracies (summed per sample for :func:`reduce_contrastive_metrics`)."""
    acc = contrastive_accuracy(out["image_features"], out["text_features"])
    bsz = sample["nsentences"]
    logging_output = {
        "loss": loss.detach().item(),
        "ntokens": sample["ntokens"],
        "nsentences": bsz,
        "sample_size": 1,
        "logit_scale": out["logit_scale"].detach().float().item(),
        "i2t_acc": acc["i2t_acc"].item() * bsz,
        "t2i_acc": acc["t2i_acc"].item() * bsz,
    }
    if "l2l_logit_scale" in out:
        logging_output["l2l_logit_scale"] = out["l2l_logit_scale"].detach().float().item()
    for name, value in terms.items():
        logging_output[name] = value.detach().item()
    return logging_output


def reduce_contrastive_metrics(logging_outputs) -> None:
    """Per-rank loss terms are averaged over ranks (sample_size 1 each); accuracies are per sample."""
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs) or 1
    nsentences = sum(log.get("nsentences", 0) for log in logging_outputs) or 1
    keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()
    for key in sorted(keys):
        if key == "loss" or key.endswith("_loss") or key.endswith("logit_scale"):
            metrics.log_scalar(key, sum(log.get(key, 0) for log in logging_outputs) / sample_size, sample_size, round=4)
        elif key.endswith("_acc"):
            metrics.log_scalar(
                key, 100.0 * sum(log.get(key, 0) for log in logging_outputs) / nsentences, nsentences, round=2
            )
