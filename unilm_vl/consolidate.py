"""``python -m unilm_vl.consolidate CKPT --out FULL.pt``: one regular fairseq checkpoint from a sharded ``--fsdp2``
checkpoint (the small ``CKPT`` file and the shards directory it names), in a single process without GPUs.

The result holds the full fp32 ``model`` (and ``criterion``) state, the config, the optimizer history and iterator
state and, unless ``--no-optimizer``, the optimizer state in fairseq's index-keyed form, so it loads in every eval,
convert and export tool and resumes a run without ``--fsdp2`` (or with it, on any number of ranks).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from fairseq.checkpoint_utils import torch_persistent_save

from .fsdp2 import consolidated_state
from .logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m unilm_vl.consolidate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="sharded checkpoint file written with --fsdp2 (e.g. checkpoint_last.pt)")
    parser.add_argument("--out", required=True, help="path of the regular checkpoint to write")
    parser.add_argument(
        "--no-optimizer",
        action="store_true",
        help="leave the optimizer state out (a smaller file for evaluation and export)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import report_error

    setup_cli_logging()
    args = parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        return report_error(f"{args.checkpoint}: no such checkpoint file")
    try:
        state = consolidated_state(args.checkpoint, with_optimizer=not args.no_optimizer)
    except (ValueError, FileNotFoundError) as exc:
        return report_error(exc)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch_persistent_save(state, args.out)
    logger.info(
        "wrote %s (%d model tensors%s)",
        args.out,
        len(state["model"]),
        ", optimizer state" if "last_optimizer_state" in state else "",
    )
    return 0


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
