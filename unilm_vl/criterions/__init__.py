"""Registered criteria, one module per key; loss maths lives in functional.py (CLIP / clip-rocket) and
functional_<family>.py (one file per model family), which are not criteria and are not imported here."""
import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_") and not _file.startswith("functional"):
        importlib.import_module(f"{__name__}.{_file[:-3]}")
