"""Pure loss maths: tensors in, tensors out, rank and world size passed in. No fairseq import.

Gradient semantics of the distributed CLIP loss (open_clip's ``gather_features``; W ranks, N = W x B):

| local_loss | gather_with_grad | rank-averaged gradient vs 1-process full-batch gradient |
|---|---|---|
| False | True  | equal (our default)                                          |
| True  | True  | equal, B x N logits per rank instead of N x N               |
| False | False | exactly 1/W of it (each rank back-props only its own slot)  |
| True  | False | not proportional (query-side paths only; SLIP/clip-rocket)  |

The loss *value* averaged over ranks equals the full-batch loss in every mode.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, rank: int, world_size: int,
                    local_loss: bool = False, gather_with_grad: bool = True):
    """All ranks' features, concatenated in rank order (open_clip semantics, see the module table)."""
    if world_size == 1:
        return image_features, text_features
    from open_clip.loss import gather_features as _open_clip_gather

    return _open_clip_gather(image_features, text_features, local_loss=local_loss,
                             gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, world_size: int = 1, local_loss: bool = False, gather_with_grad: bool = True,
              logit_bias: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """Symmetric InfoNCE of CLIP: ``0.5 * [CE(s I T^T, y) + CE(s T I^T, y)]`` over the (gathered) batch.

    Features are expected L2-normalised (B x D each); ``logit_scale`` is ``s = exp(learned scale)``. Logits and
    the softmax run in float32 whatever the feature dtype.
    """
    image_features = image_features.float()
    text_features = text_features.float()
    scale = logit_scale.float()
    all_image, all_text = gather_features(image_features, text_features, rank, world_size, local_loss,
                                          gather_with_grad)
    if world_size > 1 and local_loss:
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
    loss = 0.5 * (F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing))
    return {"clip_loss": loss}


@torch.no_grad()
def contrastive_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fraction of local rows whose best match is the paired item, image->text and text->image."""
    sim = image_features.float() @ text_features.float().T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return {"i2t_acc": (sim.argmax(1) == labels).float().mean(), "t2i_acc": (sim.argmax(0) == labels).float().mean()}
