"""Export a trained ``clip`` model (fairseq checkpoint) as a plain open_clip state dict, LoRA deltas merged.

    python -m unilm_vl.export_open_clip --checkpoint checkpoints/fsc_clip/checkpoint_last.pt --out fsc_clip.pt

The output loads with ``open_clip.create_model(NAME).load_state_dict(torch.load(OUT))`` (strict) and, for a LoRA
checkpoint (``--lora-rank > 0``), gives the LoRA model's outputs (the ``lora_*`` tensors are folded into their base
weights with the checkpoint's ``--lora-alpha``, see :func:`unilm_vl.modules.lora.merge_lora_state_dict`). It is
also what ``--pretrained`` takes, which is how the ``negclip`` / ``fsc_clip`` recipes fine-tune the ``clip``
recipe's checkpoint. The checkpoint is read without running code from it
(:func:`unilm_vl.checkpoint.read_fairseq_state`); a refused or unusable file (a sharded ``--fsdp2`` one included)
stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

from .checkpoint import read_fairseq_state
from .modules.lora import is_lora_state_dict, merge_lora_state_dict

logger = logging.getLogger(__name__)

TOWERS_PREFIX = "towers.clip."
"""Where the open_clip model sits in the ``clip`` model's state dict."""


def checkpoint_model_cfg(state: dict) -> Mapping:
    """The model section of a fairseq checkpoint's config (``{}`` when it has none)."""
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    return model_cfg or {}


def towers_state_dict(model_state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The open_clip part (keys without the ``towers.clip.`` prefix) of a ``clip`` model state dict."""
    out = {k[len(TOWERS_PREFIX) :]: v for k, v in model_state.items() if k.startswith(TOWERS_PREFIX)}
    if not out:
        raise ValueError(f"{what} has no '{TOWERS_PREFIX}*' weights: not a checkpoint of the clip model")
    others = [k for k in model_state if not k.startswith(TOWERS_PREFIX)]
    if others:
        logger.info(
            "%s: %d tensors outside the open_clip towers are not exported (e.g. %s)", what, len(others), others[0]
        )
    return out


def open_clip_state_dict(
    model_state: Mapping[str, torch.Tensor], lora_alpha: float = 1.0, what: str = "checkpoint"
) -> Dict[str, torch.Tensor]:
    """A plain open_clip state dict from a ``clip`` model state dict, LoRA merged when present."""
    towers = towers_state_dict(model_state, what)
    return merge_lora_state_dict(towers, lora_alpha) if is_lora_state_dict(towers) else towers


def export(checkpoint: str, out: str) -> Tuple[str, Optional[str]]:
    """Write the open_clip state dict of ``checkpoint`` to ``out``; returns (out, open_clip model name)."""
    state = read_fairseq_state(checkpoint)
    model_cfg = checkpoint_model_cfg(state)
    alpha = float(model_cfg.get("lora_alpha", 1.0) or 1.0)
    weights = open_clip_state_dict(state["model"], alpha, checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(weights, out)
    name = model_cfg.get("open_clip_model")
    logger.info("wrote %s (%d tensors, open_clip model %s)", out, len(weights), name)
    return out, name


def main(argv=None) -> int:
    """CLI entry point. Exit codes: 0 written, 2 bad arguments or inputs (one ``error:`` line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="fairseq checkpoint of a clip model (LoRA or not)")
    parser.add_argument("--out", required=True, help="output .pt: a plain open_clip state dict")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    from .cli import report_error

    try:
        export(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as exc:  # refused checkpoints are ValueErrors
        return report_error(exc)
    return 0


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
