"""``python -m unilm_vl.generate ARGS``: ``fairseq-generate`` with ``--user-dir`` pointing at this package."""
import sys

from .train import with_user_dir


def cli_main():
    from fairseq_cli.generate import cli_main as fairseq_generate

    from .logging_utils import setup_cli_logging

    setup_cli_logging()
    sys.argv = with_user_dir(sys.argv)
    fairseq_generate()


if __name__ == "__main__":
    cli_main()
