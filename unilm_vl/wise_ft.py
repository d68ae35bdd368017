"""WiSE-FT weight-space ensembling of a fine-tuned ``clip`` checkpoint with its starting point (Wortsman et al.,
CVPR 2022, "Robust fine-tuning of zero-shot models"; ``patch_wise_ft`` of FSC-CLIP, ``ytaek-oh/fsc-clip``).

    python -m unilm_vl.wise_ft --finetuned checkpoints/negclip/checkpoint_last.pt --pretrained clip_init.pt \
        --alpha 0.5 --out checkpoints/negclip/wise_ft_0.5.pt
    python -m unilm_vl.eval.retrieval --checkpoint checkpoints/negclip/wise_ft_0.5.pt --data karpathy.json

``theta = (1 - alpha) theta_0 + alpha theta_1`` for every floating-point tensor, theta_1 the fine-tuned and
theta_0 the pretrained weights (a fairseq ``clip`` checkpoint or a plain open_clip state dict). For a LoRA
checkpoint (``--lora-rank > 0``) only the ``lora_*`` tensors are interpolated, towards zero, as the reference does:
the base weights were frozen and are kept, ``--pretrained`` is not needed, and since both A and B are scaled the
merged delta scales by ``alpha^2``; ``alpha = 0`` zeroes every delta (the pretrained weights), ``alpha = 1`` keeps
the fine-tuned model. The output is the fine-tuned checkpoint with the interpolated weights, without optimiser state
and with ``--pretrained`` cleared (the weights are all in the file), so every eval command loads it. Both inputs
are read without running code from them (:func:`unilm_vl.checkpoint.read_fairseq_state` /
:func:`~unilm_vl.checkpoint.load_checkpoint_file`); a refused or unusable file (a sharded ``--fsdp2`` one included)
stops with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, Mapping, Optional

import torch

from .checkpoint import check_fairseq_state, load_checkpoint_file, read_fairseq_state
from .export_open_clip import TOWERS_PREFIX
from .modules.lora import is_lora_state_dict, scale_lora_state_dict

logger = logging.getLogger(__name__)


def load_pretrained_model_state(path: str) -> Dict[str, torch.Tensor]:
    """A ``clip`` model state dict (``towers.clip.*`` keys) from a fairseq checkpoint or an open_clip state dict
    (bare, under ``state_dict``, with or without DDP's ``module.`` prefix)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and "model" in state and "cfg" in state:
        return dict(check_fairseq_state(state, path)["model"])
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is neither a fairseq checkpoint nor an open_clip state dict")
    return {TOWERS_PREFIX + (k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def wise_ft_state_dict(
    finetuned: Mapping[str, torch.Tensor], pretrained: Optional[Mapping[str, torch.Tensor]], alpha: float
) -> Dict[str, torch.Tensor]:
    """The interpolated state dict (see the module docstring). Raises when the two full-fine-tuning state dicts do
    not have the same keys and shapes."""
    if is_lora_state_dict(finetuned):
        return scale_lora_state_dict(finetuned, alpha)
    if pretrained is None:
        raise ValueError("WiSE-FT of a full fine-tuning checkpoint needs the pretrained weights")
    missing = sorted(set(finetuned) - set(pretrained))
    extra = sorted(set(pretrained) - set(finetuned))
    if missing or extra:
        raise ValueError(
            f"fine-tuned and pretrained weights differ: missing in pretrained {missing[:5]}, "
            f"only in pretrained {extra[:5]}"
        )
    out = {}
    for key, theta1 in finetuned.items():
        theta0 = pretrained[key]
        if theta0.shape != theta1.shape:
            raise ValueError(f"{key}: fine-tuned shape {tuple(theta1.shape)} vs pretrained {tuple(theta0.shape)}")
        if theta1.is_floating_point():
            out[key] = ((1 - alpha) * theta0.float() + alpha * theta1.float()).to(theta1.dtype)
        else:
            out[key] = theta1
    return out


def wise_ft(finetuned: str, pretrained: Optional[str], alpha: float, out: str) -> str:
    """Write the WiSE-FT checkpoint of ``finetuned`` at ``alpha`` to ``out``."""
    state = read_fairseq_state(finetuned)
    if is_lora_state_dict(state["model"]):
        if pretrained:
            logger.info(
                "%s is a LoRA checkpoint: only its lora_* tensors are scaled, --pretrained is not read", finetuned
            )
        pretrained = None
    theta0 = load_pretrained_model_state(pretrained) if pretrained else None
    state["model"] = wise_ft_state_dict(state["model"], theta0, alpha)
    state["last_optimizer_state"] = None
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None and "pretrained" in cfg["model"]:
        cfg["model"]["pretrained"] = None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(state, out)
    logger.info("wrote %s (alpha %.3f)", out, alpha)
    return out


def main(argv=None) -> int:
    """CLI entry point. Exit codes: 0 written, 2 bad arguments or inputs (one ``error:`` line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--finetuned", required=True, help="fine-tuned fairseq checkpoint of a clip model")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="its starting point: a fairseq clip checkpoint or an "
        "open_clip state dict (not needed for LoRA checkpoints)",
    )
    parser.add_argument("--alpha", type=float, required=True, help="weight of the fine-tuned model (0 = pretrained)")
    parser.add_argument("--out", required=True, help="output fairseq checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        wise_ft(args.finetuned, args.pretrained, args.alpha, args.out)
    except (ValueError, FileNotFoundError) as exc:  # refused checkpoints are ValueErrors
        from .cli import report_error

        return report_error(exc)
    return 0


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
