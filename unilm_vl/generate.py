"""``python -m unilm_vl.generate ARGS``: ``fairseq-generate`` with ``--user-dir`` pointing at this package, reading
``--path`` checkpoints through :mod:`unilm_vl.checkpoint` (no code from the file runs; a refused, foreign or sharded
``--fsdp2`` file stops with one ``error:`` line and exit code 2)."""

import sys

from .checkpoint import fairseq_reads_safely
from .train import with_user_dir


def cli_main():
    from fairseq_cli.generate import cli_main as fairseq_generate

    from .logging_utils import setup_cli_logging

    setup_cli_logging()
    sys.argv = with_user_dir(sys.argv)
    with fairseq_reads_safely():
        fairseq_generate()


def console_main():
    """``python -m unilm_vl.generate`` and the ``unilm-vl-generate`` script: :func:`cli_main` with a user mistake
    ending in one ``error:`` line and exit status 2 (:func:`unilm_vl.cli.run_cli`)."""
    from .cli import run_cli

    sys.exit(run_cli(cli_main))


if __name__ == "__main__":
    console_main()
