"""Registered criteria, one module per key: adapters over the pure maths of :mod:`unilm_vl.losses`. Modules whose
name starts with ``_`` hold shared criterion code and register nothing."""

import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_"):
        importlib.import_module(f"{__name__}.{_file[:-3]}")
