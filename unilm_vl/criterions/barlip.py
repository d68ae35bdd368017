"""Criterion ``barlip``: CL2L plus the Barlow Twins loss between image and text (BarLIP; Fini et al. 2023,
reference ``facebookresearch/clip-rocket`` ``losses.py`` ``BarLIPLoss``).

Model: ``clip_rocket`` with ``--ssl-head barlip`` (arch ``clip_rocket_barlip_*``), whose heads end in an affine
BatchNorm. ``C = z_img^T z_txt / B``, averaged over ranks; ``l = scale [sum_i (1 - C_ii)^2 + lambda sum_{i!=j}
C_ij^2]``, averaged over the global pair and all A x A view pairs; ``loss = L + CL2L``.
``--gather-gradient full`` all-reduces C differentiably (rank-averaged gradients equal the 1-rank ones);
``own`` and ``query`` all-reduce in place as the reference does (gradients 1/W of those); ``query`` is the
reference's setting for the CL2L gathers as well.
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq.criterions import register_criterion

from ..losses.rocket import barlip_loss
from .clip_rocket import ClipRocketCriterion, ClipRocketCriterionConfig, require_outputs


@dataclass
class BarlipCriterionConfig(ClipRocketCriterionConfig):
    barlip_lamb: float = field(default=5e-3, metadata={"help": "weight lambda of the off-diagonal terms"})
    barlip_scale_loss: float = field(default=0.025, metadata={"help": "scale of the whole Barlow Twins loss"})


@register_criterion("barlip", dataclass=BarlipCriterionConfig)
class BarlipCriterion(ClipRocketCriterion):
    def extra_losses(self, out: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
        require_outputs(
            "barlip",
            out,
            ["ssl_image", "ssl_text"],
            "use a clip_rocket arch with --ssl-head barlip (e.g. clip_rocket_barlip_tiny)",
        )
        return {
            "barlip_loss": barlip_loss(
                out["ssl_image"],
                out["ssl_text"],
                out.get("ssl_image_views"),
                out.get("ssl_text_views"),
                lamb=self.cfg.barlip_lamb,
                scale=self.cfg.barlip_scale_loss,
                world_size=world,
                gradient=self.gather_gradient,
            )
        }
