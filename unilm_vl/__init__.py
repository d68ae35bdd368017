"""unilm_vl: Kosmos-2, COSA and the CLIP / self-distillation family as one fairseq plugin.

Use as ``fairseq-train --user-dir unilm_vl ...``. fairseq imports only ``tasks/`` and ``models/`` of a user dir,
so the criteria and optimizers are imported here. The Python API, ``unilm_vl.Kosmos2Grounder``
(:mod:`unilm_vl.api`), is imported on first use.
"""

from . import criterions, models, optim, tasks  # noqa: F401  (registers everything)

__version__ = "0.1.0"

_LAZY = {"Kosmos2Grounder": "api"}
"""Public names imported from their module on first access (``import unilm_vl`` loads only the plugin)."""


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
