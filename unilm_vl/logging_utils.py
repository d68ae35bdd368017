"""Logging set-up for our command-line entry points.

Importing fairseq runs ``logging.basicConfig(level=DEBUG)`` (in ``fairseq/models/wav2vec``), which makes every
later ``basicConfig`` a no-op and floods the output with third-party DEBUG lines. CLIs call
:func:`setup_cli_logging` to replace that with fairseq's own format at INFO (or ``$LOGLEVEL``)."""

import logging
import os
import sys


def setup_cli_logging(stream=None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:  # basicConfig's; other handlers (e.g. pytest's) stay
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(os.environ.get("LOGLEVEL", "INFO").upper())
