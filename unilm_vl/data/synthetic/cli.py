"""The command line ``python -m unilm_vl.data.synthetic``: generate a world (see :mod:`unilm_vl.data.synthetic`)."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

from ...logging_utils import setup_cli_logging
from .world import WorldConfig, ensure_world, generate_world


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m unilm_vl.data.synthetic``."""
    defaults = WorldConfig()
    p = argparse.ArgumentParser(
        description="Generate the synthetic shape world (see the unilm_vl.data.synthetic docstring)."
    )
    p.add_argument("--out", required=True, help="output directory (its train/val/eval/videos folders are replaced)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="master seed; same seed, same bytes")
    p.add_argument("--num-train", type=int, default=defaults.num_train, help="train images")
    p.add_argument("--num-val", type=int, default=defaults.num_val, help="val images (in distribution)")
    p.add_argument("--num-test", type=int, default=defaults.num_test, help="test images (held-out combos)")
    p.add_argument("--num-videos", type=int, default=defaults.num_videos, help="video clips (a fifth for test)")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="side of a square of equal area")
    p.add_argument("--no-heldout", action="store_true", help="use every colour-shape combo in train/val too")
    p.add_argument("--workers", type=int, default=2, help="processes; the output does not depend on it")
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="keep an existing complete world made with the same arguments instead of regenerating it",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Generate a world from the command line; logs the generation time and returns the manifest."""
    setup_cli_logging()
    args = build_arg_parser().parse_args(argv)
    make = ensure_world if args.if_missing else generate_world
    return make(
        args.out,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        num_videos=args.num_videos,
        image_size=args.image_size,
        heldout=not args.no_heldout,
        workers=args.workers,
    )
