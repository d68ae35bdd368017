"""clip-rocket's losses (Fini et al., TMLR 2023, "Improved baselines for vision-language pre-training"; reference
``facebookresearch/clip-rocket`` ``losses.py``): CL2L and the non-contrastive SiamLIP / BYOLIP, BarLIP and SwALIP
terms. Tensors in, tensors out, rank and world size passed in; ``gradient`` as in
:mod:`unilm_vl.losses.distributed` (the reference's detached gathers are ``query``, its in-place all-reduce ``own``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, gather_rows
from .precision import full_precision


def _local_vs_global_ce(
    query: torch.Tensor, keys_all: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    logits = scale * query @ keys_all.T  # B_local x N
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@full_precision
def cl2l_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    image_views: Optional[torch.Tensor] = None,
    text_views: Optional[torch.Tensor] = None,
    l2l_logit_scale: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "avg",
    rank: int = 0,
    world_size: int = 1,
    gradient: str = "full",
) -> Dict[str, torch.Tensor]:
    """The CL2L contrastive loss of clip-rocket (reference ``losses.py`` ``CL2LLoss``).

    Global terms (no label smoothing), local rows against gathered columns with labels ``B*rank + arange(B)``::

        Lg_img = CE(s z_img z_txt_all^T),  Lg_txt = CE(s z_txt z_img_all^T)

    Local terms over all A x A pairs of augmented views (a image view, a' text view), scale ``h_s`` =
    exp(l2l scale), label smoothing eps::

        Ll_img = mean_{a,a'} CE_eps(h_s h_img[a] h_txt_all[a']^T)
        Ll_txt = mean_{a,a'} CE_eps(h_s h_txt[a] h_img_all[a']^T)

    ``L_img = (Lg_img + A Ll_img) / (1 + A)``, likewise ``L_txt``; ``clip_loss = (L_img + L_txt) / 2``, doubled
    with ``reduction="sum"``. Without views only the global terms remain (``(Lg_img + Lg_txt) / 2``).
    Features are L2-normalised: globals B x D, views A x B x D'. Gradient semantics: :func:`gather_rows`.
    Returns ``{"clip_loss": total, "global_loss", "local_loss" (views only)}``; only ``clip_loss`` is summed.
    """
    if reduction not in ("avg", "sum"):
        raise ValueError(f"reduction must be 'avg' or 'sum', got {reduction!r}")
    z_img, z_txt, s = image_features.float(), text_features.float(), logit_scale.float()
    B = z_img.shape[0]
    labels = torch.arange(B, device=z_img.device) + B * rank
    lg_img = _local_vs_global_ce(z_img, gather_rows(z_txt, rank, world_size, gradient), s, labels)
    lg_txt = _local_vs_global_ce(z_txt, gather_rows(z_img, rank, world_size, gradient), s, labels)
    out: Dict[str, torch.Tensor] = {"global_loss": (0.5 * (lg_img + lg_txt)).detach()}
    if image_views is None or text_views is None:
        loss = 0.5 * (lg_img + lg_txt)
    else:
        h_img, h_txt = image_views.float(), text_views.float()  # A x B x D'
        A = h_img.shape[0]
        hs = (l2l_logit_scale if l2l_logit_scale is not None else logit_scale).float()
        h_img_all = [gather_rows(h_img[a], rank, world_size, gradient) for a in range(A)]
        h_txt_all = [gather_rows(h_txt[a], rank, world_size, gradient) for a in range(A)]
        ll_img = torch.stack(
            [
                _local_vs_global_ce(h_img[a], h_txt_all[b], hs, labels, label_smoothing)
                for a in range(A)
                for b in range(A)
            ]
        ).mean()
        ll_txt = torch.stack(
            [
                _local_vs_global_ce(h_txt[a], h_img_all[b], hs, labels, label_smoothing)
                for a in range(A)
                for b in range(A)
            ]
        ).mean()
        l_img = (lg_img + A * ll_img) / (1 + A)
        l_txt = (lg_txt + A * ll_txt) / (1 + A)
        loss = 0.5 * (l_img + l_txt)
        out["local_loss"] = (0.5 * (ll_img + ll_txt)).detach()
        out["clip_loss_image_local"] = ll_img.detach()
    out["clip_loss"] = 2 * loss if reduction == "sum" else loss
    return out


@full_precision
def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lamb: float = 5e-3,
    scale: float = 0.025,
    world_size: int = 1,
    gradient: str = "full",
) -> torch.Tensor:
    """Barlow Twins redundancy reduction between two batch-standardised embeddings (BarLIP; reference
    ``losses.py`` ``BarLIPLoss``).

    ``C = z1^T z2 / B`` (D x D), averaged over ranks (``all_reduce(C) / W``, i.e. the C of the concatenated batch
    when every rank has the same B); ``scale * [sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2]``. The inputs are
    not normalised here: the heads end in an affine BatchNorm, as in the reference.
    """
    z1, z2 = z1.float(), z2.float()
    c = z1.T @ z2 / z1.shape[0]  # D x D
    c = all_reduce_sum(c, world_size, gradient) / world_size
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return scale * (on_diag + lamb * off_diag)


def simsiam_distance(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``D(p, v) = 2 - 2 <p/|p|, sg(v)/|sg(v)|>`` averaged over the batch (SimSiam / SiamLIP); no gradient to v."""
    return 2 - 2 * F.cosine_similarity(p.float(), v.detach().float(), dim=-1).mean()


def siamlip_loss(
    pred_image: torch.Tensor,
    pred_text: torch.Tensor,
    target_image: torch.Tensor,
    target_text: torch.Tensor,
    pred_image_views: Optional[torch.Tensor] = None,
    pred_text_views: Optional[torch.Tensor] = None,
    target_image_views: Optional[torch.Tensor] = None,
    target_text_views: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SiamLIP (and BYOLIP, whose targets come from the momentum model): the mean of the cross-modal distances
    ``D(p_img, v_txt) + D(p_txt, v_img)`` of the global pair and of every pair (a, a') of augmented views,
    ``D(p_img[a], v_txt[a'])``, ``D(p_txt[a], v_img[a'])``: 2 + 2 A^2 terms. ``p_img`` is the image->text
    predictor's output. Per-sample means over the local batch: rank-averaged, it is the full-batch value."""
    terms = [simsiam_distance(pred_image, target_text), simsiam_distance(pred_text, target_image)]
    if pred_image_views is not None:
        A = pred_image_views.shape[0]
        for a in range(A):
            for b in range(A):
                terms.append(simsiam_distance(pred_image_views[a], target_text_views[b]))
                terms.append(simsiam_distance(pred_text_views[a], target_image_views[b]))
    return torch.stack(terms).mean()


def barlip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_views: Optional[torch.Tensor] = None,
    text_views: Optional[torch.Tensor] = None,
    lamb: float = 5e-3,
    scale: float = 0.025,
    world_size: int = 1,
    gradient: str = "full",
) -> torch.Tensor:
    """BarLIP: the mean of :func:`barlow_twins_loss` over the global image-text pair and every augmented pair
    (image view a, text view a'): 1 + A^2 terms, image-text only."""
    terms = [barlow_twins_loss(image, text, lamb, scale, world_size, gradient)]
    if image_views is not None:
        A = image_views.shape[0]
        terms += [
            barlow_twins_loss(image_views[a], text_views[b], lamb, scale, world_size, gradient)
            for a in range(A)
            for b in range(A)
        ]
    return torch.stack(terms).mean()


@torch.no_grad()
@full_precision
def sinkhorn_knopp(
    scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, world_size: int = 1
) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignments of a B_local x K score matrix (SwAV; clip-rocket ``losses.py`` SK).

    ``Q = exp(S / eps)^T`` normalised to total mass 1, then ``iterations`` rounds of: rows (prototypes) to mass
    1/K, with their sums all-reduced over ranks; columns (samples) to mass 1/B with B the global batch. Returns
    ``B * Q^T``: each sample's row sums to 1. Distributed with equal B per rank it equals single-process SK on the
    concatenated batch. Computed in float64 so that ``exp(1/eps)`` cannot overflow.
    """
    q = torch.exp(scores.double() / epsilon).T  # K x B_local
    k = q.shape[0]
    b = q.shape[1] * world_size
    q /= all_reduce_sum(q.sum(), world_size, "own")
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True), world_size, "own")
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T.to(scores.dtype)


def _soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_k q_bk log softmax(z)_bk``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


@full_precision
def swalip_loss(
    image_views: torch.Tensor,
    text_views: torch.Tensor,
    l2l_logit_scale: torch.Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    rank: int = 0,
    world_size: int = 1,
    gradient: str = "full",
) -> torch.Tensor:
    """SwALIP: swapped prediction between pairs of augmented views, the other modality's gathered embeddings
    acting as prototypes (reference ``losses.py`` ``SwALIPLoss``).

    ``S_img[a][a'] = h_img[a] h_txt_all[a']^T`` (B x N, unscaled); the target of pair (a, a') is the
    Sinkhorn-Knopp assignment of the *other* pair (a+1 mod A, a'+1 mod A), which for the reference's A = 2 is its
    ``(1-a, 1-a')``::

        L = 1/A^2 sum_{a,a'} 1/2 [H(SK(S_img[o]), h_s S_img[a][a']) + H(SK(S_txt[o]), h_s S_txt[a][a'])]

    Inputs: L2-normalised A x B x D views and ``h_s`` = exp(l2l scale).
    """
    h_img, h_txt = image_views.float(), text_views.float()
    A = h_img.shape[0]
    if A < 2:
        raise ValueError(f"SwALIP needs at least 2 augmented views per modality, got {A}")
    hs = l2l_logit_scale.float()
    h_img_all = [gather_rows(h_img[a], rank, world_size, gradient) for a in range(A)]
    h_txt_all = [gather_rows(h_txt[a], rank, world_size, gradient) for a in range(A)]
    s_img = [[h_img[a] @ h_txt_all[b].T for b in range(A)] for a in range(A)]  # B x N each
    s_txt = [[h_txt[a] @ h_img_all[b].T for b in range(A)] for a in range(A)]
    terms = []
    for a in range(A):
        for b in range(A):
            oa, ob = (a + 1) % A, (b + 1) % A
            q_img = sinkhorn_knopp(s_img[oa][ob].detach(), iterations, epsilon, world_size)
            q_txt = sinkhorn_knopp(s_txt[oa][ob].detach(), iterations, epsilon, world_size)
            terms.append(
                0.5 * (_soft_cross_entropy(q_img, hs * s_img[a][b]) + _soft_cross_entropy(q_txt, hs * s_txt[a][b]))
            )
    return torch.stack(terms).mean()
