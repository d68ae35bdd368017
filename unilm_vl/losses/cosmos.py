"""COSMOS losses (Kim et al., CVPR 2025, "COSMOS: Cross-Modality Self-Distillation for Vision Language
Pre-training"; reference ``ExplainableML/cosmos`` ``src/open_clip/loss.py`` ``COSMOSLoss``): tensors in, tensors
out, rank and world size passed in. No fairseq import.

Notation: V image views (2 global crops first, then the local ones), K caption views (the global captions first),
B local batch, D embedding width; all features L2-normalised.

``CLIP(S, T; s)`` is the mean over every (a in S, b in T) pair of the symmetric InfoNCE of open_clip's ``ClipLoss``
(:func:`unilm_vl.losses.clip.clip_loss`, same gathering). The COSMOS objective is::

    distill = 1/4 [CLIP(S_img, T_img) + CLIP(S_img, T_txt) + CLIP(S_txt, T_img) + CLIP(S_txt, T_txt)]
              with s = exp(distill_logit_scale), S_* = the student's cross-modal views, T_* = sg(teacher globals)
    clip    = CLIP(f_img[global crops], f_txt[all K captions]) with s = exp(logit_scale)
    total   = distill + clip
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from .clip import clip_loss


def multi_view_clip_loss(
    image_views: Sequence[torch.Tensor],
    text_views: Sequence[torch.Tensor],
    logit_scale: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gradient: str = "full",
) -> torch.Tensor:
    """The reference's ``ClipLoss`` over lists of views: the mean over all ``len(image_views) x len(text_views)``
    pairs of the symmetric InfoNCE between image view a and text view b (each B x D, rows aligned by sample)."""
    if len(image_views) == 0 or len(text_views) == 0:
        raise ValueError("multi_view_clip_loss needs at least one image view and one text view")
    terms = [
        clip_loss(a, b, logit_scale, rank, world_size, local_loss, gradient)["clip_loss"]
        for a in image_views
        for b in text_views
    ]
    return torch.stack(terms).mean()


def cosmos_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_cross: torch.Tensor,
    text_cross: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    logit_scale: torch.Tensor,
    distill_logit_scale: torch.Tensor,
    num_global_crops: int = 2,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gradient: str = "full",
) -> Dict[str, torch.Tensor]:
    """COSMOS loss terms (reference ``COSMOSLoss``); the total is their sum.

    Args:
        image_features: V x B x D student pooled image features (global crops first).
        text_features: K x B x D student pooled caption features (all caption views).
        image_cross: V x B x D student cross-modal image views ``||f_img + textpool(f_img, caption g1 tokens)||``.
        text_cross: K x B x D student cross-modal caption views ``||f_txt + imgpool(f_txt, crop g1 patches)||``.
        teacher_image: G x B x D teacher features of the global crops (detached here).
        teacher_text: G' x B x D teacher features of the global captions (detached here).
        logit_scale, distill_logit_scale: the two scales, already exponentiated.
        num_global_crops: the first this many image views enter the CLIP term (local crops stay out of it).
        rank, world_size, local_loss, gradient: gathering, as :func:`unilm_vl.losses.clip.clip_loss`.

    Returns ``{"distill_loss", "clip_loss"}``.
    """
    if num_global_crops < 1 or num_global_crops > image_features.shape[0]:
        raise ValueError(f"num_global_crops={num_global_crops} must be in [1, {image_features.shape[0]}] image views")
    opts = dict(rank=rank, world_size=world_size, local_loss=local_loss, gradient=gradient)
    s_img, s_txt = list(image_cross.unbind(0)), list(text_cross.unbind(0))
    t_img, t_txt = list(teacher_image.detach().unbind(0)), list(teacher_text.detach().unbind(0))
    distill = 0.25 * (
        multi_view_clip_loss(s_img, t_img, distill_logit_scale, **opts)
        + multi_view_clip_loss(s_img, t_txt, distill_logit_scale, **opts)
        + multi_view_clip_loss(s_txt, t_img, distill_logit_scale, **opts)
        + multi_view_clip_loss(s_txt, t_txt, distill_logit_scale, **opts)
    )
    clip = multi_view_clip_loss(
        list(image_features[:num_global_crops].unbind(0)), list(text_features.unbind(0)), logit_scale, **opts
    )
    return {"distill_loss": distill, "clip_loss": clip}
