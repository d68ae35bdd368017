"""CLIP's symmetric InfoNCE with open_clip's ``ClipLoss`` semantics (Radford et al. 2021; ``mlfoundations/open_clip``
``src/open_clip/loss.py``) and the in-batch retrieval accuracies. Gathering: :mod:`unilm_vl.losses.distributed`."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .distributed import gather_features, scores_local_rows
from .precision import full_precision


@full_precision
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gradient: str = "full",
    logit_bias: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP: ``0.5 * [CE(s I T^T, y) + CE(s T I^T, y)]`` over the (gathered) batch.

    Features are expected L2-normalised (B x D each); ``logit_scale`` is ``s = exp(learned scale)``. All N x N
    logits by default; the local rows against all columns (B x N, labels offset by ``B * rank``) with
    ``local_loss`` on more than one rank or with ``gradient="query"``. Logits and the softmax run in float32
    whatever the feature dtype.
    """
    image_features = image_features.float()
    text_features = text_features.float()
    scale = logit_scale.float()
    all_image, all_text = gather_features(image_features, text_features, rank, world_size, gradient)
    if scores_local_rows(local_loss, world_size, gradient):
        logits_per_image = scale * image_features @ all_text.T  # B x N
        logits_per_text = scale * text_features @ all_image.T  # B x N
        labels = torch.arange(image_features.shape[0], device=image_features.device) + image_features.shape[0] * rank
    else:
        logits_per_image = scale * all_image @ all_text.T  # N x N
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_features.device)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    loss = 0.5 * (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    )
    return {"clip_loss": loss}


@torch.no_grad()
@full_precision
def contrastive_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fraction of local rows whose best match is the paired item, image->text and text->image."""
    sim = image_features.float() @ text_features.float().T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return {"i2t_acc": (sim.argmax(1) == labels).float().mean(), "t2i_acc": (sim.argmax(0) == labels).float().mean()}
