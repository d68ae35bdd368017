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


if __name__ == "__main__":
    try:
        cli_main()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
