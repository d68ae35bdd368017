"""Registered criteria, one module per key; loss maths lives in functional.py."""
import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_") and _file != "functional.py":
        importlib.import_module(f"{__name__}.{_file[:-3]}")
