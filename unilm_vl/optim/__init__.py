"""Optimizers registered with fairseq (imported from the package ``__init__``: fairseq imports only ``tasks/`` and
``models/`` of a user dir)."""

from . import open_clip_adamw  # noqa: F401
