"""Criterion ``siamlip``: CL2L plus the SimSiam-style cross-modal loss of SiamLIP (Fini et al. 2023; reference
``facebookresearch/clip-rocket`` ``losses.py`` ``SiamLIPLoss``).

Model: ``clip_rocket`` with ``--ssl-head siamlip`` (arch ``clip_rocket_siamlip_*``). With ``p`` the image->text and
text->image predictor outputs and ``v`` the projector outputs of the other modality,
``L = mean[D(p_img, v_txt), D(p_txt, v_img), D(p_img[a], v_txt[a']), D(p_txt[a], v_img[a']) for all a, a']``
with ``D(p, v) = 2 - 2 cos(p, sg(v))``; ``loss = L + CL2L``. No cross-rank operation: each rank's mean over its
batch, averaged over ranks, is the full-batch value (the heads' BatchNorm is per rank unless SyncBatchNorm).
"""

from dataclasses import dataclass
from typing import Dict

import torch
from fairseq.criterions import register_criterion

from ..losses.rocket import siamlip_loss
from .clip_rocket import ClipRocketCriterion, ClipRocketCriterionConfig, require_outputs


@dataclass
class SiamlipCriterionConfig(ClipRocketCriterionConfig):
    pass


@register_criterion("siamlip", dataclass=SiamlipCriterionConfig)
class SiamlipCriterion(ClipRocketCriterion):
    target_prefix = "ssl"
    hint = "use a clip_rocket arch with --ssl-head siamlip (e.g. clip_rocket_siamlip_tiny)"

    def extra_losses(self, out: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
        t = self.target_prefix
        require_outputs(self.__class__.__name__, out, ["pred_image", "pred_text", f"{t}_image", f"{t}_text"], self.hint)
        return {
            "siamlip_loss": siamlip_loss(
                out["pred_image"],
                out["pred_text"],
                out[f"{t}_image"],
                out[f"{t}_text"],
                out.get("pred_image_views"),
                out.get("pred_text_views"),
                out.get(f"{t}_image_views"),
                out.get(f"{t}_text_views"),
            )
        }
