"""``python -m unilm_vl.train ARGS``: ``fairseq-train`` with ``--user-dir`` pointing at this package, so it works
from any directory once unilm_vl is installed."""
import os
import sys


def with_user_dir(argv):
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return list(argv)
    return [argv[0], "--user-dir", os.path.dirname(os.path.abspath(__file__))] + list(argv[1:])


def cli_main():
    from fairseq_cli.train import cli_main as fairseq_train

    sys.argv = with_user_dir(sys.argv)
    fairseq_train()


if __name__ == "__main__":
    cli_main()
