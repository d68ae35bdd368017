"""``python -m unilm_vl.data.synthetic``: see :mod:`unilm_vl.data.synthetic.cli`."""

from .cli import main

if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
