"""Criterion ``swalip``: CL2L plus SwAV-style swapped prediction between view pairs, the other modality's gathered
l2l embeddings acting as prototypes (SwALIP; Fini et al. 2023, reference ``facebookresearch/clip-rocket``
``losses.py`` ``SwALIPLoss``).

Model: ``clip_rocket`` (arch ``clip_rocket_swalip_*``) trained with ``--num-augs`` >= 2. The targets of view pair
(a, a') are Sinkhorn-Knopp assignments (``--sk-iters``, ``--target-epsilon``; sums all-reduced over ranks, so they
equal single-process SK on the global batch) of the other pair (a+1, a'+1 mod A; the reference's (1-a, 1-a') for
its fixed A = 2); ``loss = swalip_weight * L_sw + CL2L``. Validation batches have no views and skip the term.
The reference asserts label smoothing 0 for SwALIP; here it is only the default.
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq.criterions import register_criterion

from ..losses.rocket import swalip_loss
from .clip_rocket import ClipRocketCriterion, ClipRocketCriterionConfig


@dataclass
class SwalipCriterionConfig(ClipRocketCriterionConfig):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label smoothing of the l2l terms (the reference's SwALIP runs use 0)"}
    )
    swalip_weight: float = field(default=0.2, metadata={"help": "weight of the SwALIP term added to CL2L"})
    sk_iters: int = field(default=3, metadata={"help": "Sinkhorn-Knopp iterations"})
    target_epsilon: float = field(default=0.05, metadata={"help": "Sinkhorn-Knopp entropy temperature epsilon"})


@register_criterion("swalip", dataclass=SwalipCriterionConfig)
class SwalipCriterion(ClipRocketCriterion):
    def extra_losses(self, out: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
        if "image_views" not in out:
            return {}
        loss = swalip_loss(
            out["image_views"],
            out["text_views"],
            out["l2l_logit_scale"],
            iterations=self.cfg.sk_iters,
            epsilon=self.cfg.target_epsilon,
            rank=rank,
            world_size=world,
            gradient=self.gather_gradient,
        )
        return {"swalip_loss": self.cfg.swalip_weight * loss}
