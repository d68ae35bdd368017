"""unilm_vl: Kosmos-2, COSA and the CLIP / self-distillation family as one fairseq plugin.

Use as ``fairseq-train --user-dir unilm_vl ...``. fairseq imports only ``tasks/`` and ``models/`` of a user dir,
so the criteria and optimizers are imported here.
"""
from . import criterions, models, optim, tasks  # noqa: F401  (registers everything)

__version__ = "0.1.0"
