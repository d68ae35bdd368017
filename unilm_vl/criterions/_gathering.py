"""``--gather-gradient``: the one flag that says how every criterion gathers features across ranks, its config
fields, and the deprecated spellings it replaces. Meanings: :mod:`unilm_vl.losses.distributed`.

Deprecated spellings (they keep working, with one warning per spelling and process):

- ``--gather-with-grad`` (clip, cosmos, negclip, fsc_clip): a store-false flag, so passing it switched the
  gradient-carrying gather *off*: ``--gather-gradient own``, or ``query`` together with ``--local-loss``;
- ``--gather-gradient reference`` (clip_rocket, siamlip, byolip, barlip, swalip): ``--gather-gradient query``;
- ``--itc-gather-gradient full|reference`` (cosa): ``--gather-gradient full|query``.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..losses.distributed import GATHER_GRADIENTS

logger = logging.getLogger(__name__)

GATHER_GRADIENT_CHOICES = ChoiceEnum(list(GATHER_GRADIENTS))
GATHER_GRADIENT_HELP = (
    "how features are gathered across ranks: full (every gathered row carries its gradient back to its owner: "
    "rank-averaged gradients equal one process on the global batch), own (other ranks' rows are constants, each "
    "rank back-props only its own rows: 1/world_size of the full gradient for N x N logits; open_clip's "
    "gather_with_grad=False), query (every gathered row is a constant, own rows included, at every world size, and "
    "only the local rows are scored: query-side gradients, the clip-rocket and COSA gathers); table in "
    "unilm_vl/losses/distributed.py"
)

_warned = set()


def warn_deprecated(spelling: str, replacement: str) -> None:
    """Log ``<spelling> is deprecated: use <replacement>`` once per spelling and process."""
    if spelling in _warned:
        return
    _warned.add(spelling)
    logger.warning(f"{spelling} is deprecated: use {replacement}")


@dataclass
class GatherConfig(FairseqDataclass):
    """The gathering fields of the CLIP-style criteria (clip, cosmos, negclip, fsc_clip)."""

    local_loss: bool = field(
        default=False,
        metadata={
            "help": "score only the local rows against all gathered columns (B x N logits instead of N x N, labels "
            "offset by B * rank); same gradients as N x N under --gather-gradient full"
        },
    )
    gather_gradient: GATHER_GRADIENT_CHOICES = field(default="full", metadata={"help": GATHER_GRADIENT_HELP})
    gather_with_grad: bool = field(
        default=True,
        metadata={
            "help": "deprecated: use --gather-gradient own (query with --local-loss); a store-false flag: passing it "
            "still switches the gradient-carrying gather off"
        },
    )


def resolve_gather_gradient(cfg, criterion: str) -> str:
    """The ``--gather-gradient`` value ``cfg`` asks for, the deprecated spellings mapped onto it (with a warning);
    a deprecated spelling that contradicts an explicit ``--gather-gradient`` is refused."""
    mode = str(cfg.gather_gradient)
    if mode == "reference":
        warn_deprecated("--gather-gradient reference", "--gather-gradient query")
        mode = "query"
    alias: Optional[str] = None
    spelling = ""
    if not getattr(cfg, "gather_with_grad", True):
        alias = "query" if cfg.local_loss else "own"
        spelling = "--gather-with-grad"
        warn_deprecated(spelling, "--gather-gradient own (query with --local-loss)")
    legacy = getattr(cfg, "itc_gather_gradient", None)
    if legacy is not None:
        alias = {"full": "full", "reference": "query"}[str(legacy)]
        spelling = f"--itc-gather-gradient {legacy}"
        warn_deprecated("--itc-gather-gradient", "--gather-gradient full|query (reference = query)")
    if alias is not None:
        if mode not in ("full", alias):
            raise ValueError(
                f"criterion {criterion}: {spelling} means --gather-gradient {alias}, which contradicts "
                f"--gather-gradient {mode}; pass only --gather-gradient"
            )
        mode = alias
    return mode
