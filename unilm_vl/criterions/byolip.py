"""Criterion ``byolip``: SiamLIP whose targets come from an EMA momentum copy of the whole model (BYOLIP; Fini
et al. 2023, reference ``facebookresearch/clip-rocket`` ``--momentum``, ``main.py``).

Model: ``clip_rocket`` with ``--ssl-head siamlip --momentum`` (arch ``clip_rocket_byolip_*``). The momentum copy
runs in train mode without gradient on the same inputs; its projector outputs are the targets ``v``. After every
optimiser step the model applies ``theta_m <- tau theta_m + (1 - tau) theta`` with a constant tau
(``--momentum-tau``, 0.99). The momentum copy is part of the model's state dict, so it is saved in every
checkpoint and restored on resume; every rank applies the same update to the same (all-reduced) parameters, so
the copies stay identical across ranks.
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion

from .siamlip import SiamlipCriterion, SiamlipCriterionConfig


@dataclass
class ByolipCriterionConfig(SiamlipCriterionConfig):
    pass


@register_criterion("byolip", dataclass=ByolipCriterionConfig)
class ByolipCriterion(SiamlipCriterion):
    target_prefix = "target"
    hint = "use a clip_rocket arch with --ssl-head siamlip --momentum (e.g. clip_rocket_byolip_tiny)"
