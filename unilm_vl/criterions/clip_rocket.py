"""Criterion ``clip_rocket``: the CL2L loss of the improved CLIP recipe (Fini et al. 2023, "Improved baselines for
vision-language pre-training"; reference ``facebookresearch/clip-rocket`` ``losses.py`` ``CL2LLoss``).

Sample: the contrastive task with ``--num-augs A`` (global image/text plus A strong image and text views); the
model is ``clip_rocket``. Loss: the global CLIP terms without label smoothing plus the mean over all A x A
(image view, text view) pairs of the l2l terms with label smoothing ``--label-smoothing``, weighted
``(Lg + A Ll) / (1 + A)``, averaged over both directions and doubled with ``--loss-avg-or-sum sum``. Without views
(validation) only the global terms remain. Logits are local rows against the gathered columns, as the reference.

Gradient semantics (``--gather-gradient``, table in :mod:`unilm_vl.losses.distributed`): ``full`` (default)
gathers with a differentiable all-gather so that rank-averaged gradients equal the 1-rank full-batch gradients;
``query`` is clip-rocket's detached ``all_gather`` without substituting the own slot (query-side-only gradients;
clip-rocket skips the gather on one process, where it trains as ``full``); ``own`` substitutes the own slot.
``sample_size`` is 1 per rank. Maths: :mod:`unilm_vl.losses.rocket`.

The non-contrastive criteria ``siamlip``, ``byolip``, ``barlip`` and ``swalip`` subclass this one and add their
term to the CL2L loss, as the reference does.
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..losses.distributed import GATHER_GRADIENTS, data_parallel_rank_world
from ..losses.rocket import cl2l_loss
from ._gathering import GATHER_GRADIENT_HELP
from .clip import ContrastiveCriterion, contrastive_logging_output


@dataclass
class ClipRocketCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.1,
        metadata={
            "help": "label smoothing of the augmented-view (l2l) terms only; the global terms have none "
            "(CLIP-rocket recipe: 0.1, reference default and SwALIP: 0)"
        },
    )
    loss_avg_or_sum: ChoiceEnum(["avg", "sum"]) = field(
        default="avg",
        metadata={"help": "avg: (L_img + L_txt) / 2; sum: L_img + L_txt (the CLIP-rocket recipe on YFCC15M)"},
    )
    gather_gradient: ChoiceEnum([*GATHER_GRADIENTS, "reference"]) = field(
        default="full",
        metadata={
            "help": GATHER_GRADIENT_HELP + "; an all-reduced statistic (BarLIP's C) keeps its own summand live under "
            "own and query; reference: deprecated, use query"
        },
    )


@register_criterion("clip_rocket", dataclass=ClipRocketCriterionConfig)
class ClipRocketCriterion(ContrastiveCriterion):
    def extra_losses(self, out: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
        """The term a subclass adds to the CL2L loss (``{"<name>_loss": tensor}``, already weighted)."""
        return {}

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        cl2l = cl2l_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            out.get("image_views"),
            out.get("text_views"),
            out.get("l2l_logit_scale"),
            label_smoothing=self.cfg.label_smoothing,
            reduction=str(self.cfg.loss_avg_or_sum),
            rank=rank,
            world_size=world,
            gradient=self.gather_gradient,
        )
        extra = self.extra_losses(out, rank, world)
        loss = cl2l["clip_loss"] + sum(extra.values())
        return loss, 1, contrastive_logging_output(loss, {**cl2l, **extra}, out, sample)


def require_outputs(criterion: str, out: Dict[str, torch.Tensor], keys, hint: str) -> None:
    """A clear error when the model lacks the heads a criterion needs (instead of a KeyError deep in the loss)."""
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"criterion {criterion} needs model outputs {missing}: {hint}")
