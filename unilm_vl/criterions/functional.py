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

import functools
import itertools
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F


def full_precision(fn):
    """Run ``fn`` with autocast disabled on the device of its first tensor argument.

    Under ``torch.autocast`` (fairseq ``--amp``, bf16/fp16 training) matmuls are recast to the low precision even
    when their inputs are float32, so ``s * I @ T^T`` with ``s`` up to 100 would be a bf16 matrix (8-bit mantissa:
    steps of 0.25-0.5 near 100) before any softmax. The losses below upcast their inputs and must compute logits,
    softmaxes, covariance matrices and Sinkhorn in float32 (or float64), so they are wrapped with this.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)),
                      None)
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, rank: int, world_size: int,
                    local_loss: bool = False, gather_with_grad: bool = True):
    """All ranks' features, concatenated in rank order (open_clip semantics, see the module table)."""
    if world_size == 1:
        return image_features, text_features
    from open_clip.loss import gather_features as _open_clip_gather

    return _open_clip_gather(image_features, text_features, local_loss=local_loss,
                             gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)


@full_precision
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
@full_precision
def contrastive_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fraction of local rows whose best match is the paired item, image->text and text->image."""
    sim = image_features.float() @ text_features.float().T
    labels = torch.arange(sim.shape[0], device=sim.device)
    return {"i2t_acc": (sim.argmax(1) == labels).float().mean(), "t2i_acc": (sim.argmax(0) == labels).float().mean()}


# ------------------------------------------------------------------------------------------------- clip-rocket
def gather_rows(x: torch.Tensor, rank: int, world_size: int, gradient: str = "full") -> torch.Tensor:
    """All ranks' rows of ``x`` in rank order.

    ``gradient="full"``: differentiable all-gather (gradients flow back to the owner rank; rank-averaged gradients
    equal the 1-process full-batch ones). ``"reference"``: clip-rocket's plain ``all_gather`` without
    substituting the own slot, so no gradient flows through the gathered side (query-side-only gradients).
    """
    if world_size == 1:
        return x
    import torch.distributed as dist

    if gradient == "full":
        from torch.distributed import nn as dist_nn

        return torch.cat(dist_nn.all_gather(x), dim=0)
    if gradient != "reference":
        raise ValueError(f"gradient must be 'full' or 'reference', got {gradient!r}")
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach())
    return torch.cat(parts, dim=0)


def _local_vs_global_ce(query: torch.Tensor, keys_all: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    logits = scale * query @ keys_all.T  # B_local x N
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


@full_precision
def cl2l_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              image_views: Optional[torch.Tensor] = None, text_views: Optional[torch.Tensor] = None,
              l2l_logit_scale: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
              reduction: str = "avg", rank: int = 0, world_size: int = 1, gradient: str = "full"
              ) -> Dict[str, torch.Tensor]:
    """The CL2L contrastive loss of clip-rocket (reference ``losses.py`` CL2LLoss; contrastive.md 3.4).

    Global terms (no label smoothing), local rows against gathered columns with labels ``B*rank + arange(B)``::

        Lg_img = CE(s z_img z_txt_all^T),  Lg_txt = CE(s z_txt z_img_all^T)

    Local terms over all A x A pairs of augmented views (a image view, a' text view), scale ``h_s`` =
    exp(l2l scale), label smoothing eps::

        Ll_img = mean_{a,a'} CE_eps(h_s h_img[a] h_txt_all[a']^T),  Ll_txt = mean_{a,a'} CE_eps(h_s h_txt[a] h_img_all[a']^T)

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
        ll_img = torch.stack([_local_vs_global_ce(h_img[a], h_txt_all[b], hs, labels, label_smoothing)
                              for a in range(A) for b in range(A)]).mean()
        ll_txt = torch.stack([_local_vs_global_ce(h_txt[a], h_img_all[b], hs, labels, label_smoothing)
                              for a in range(A) for b in range(A)]).mean()
        l_img = (lg_img + A * ll_img) / (1 + A)
        l_txt = (lg_txt + A * ll_txt) / (1 + A)
        loss = 0.5 * (l_img + l_txt)
        out["local_loss"] = (0.5 * (ll_img + ll_txt)).detach()
        out["clip_loss_image_local"] = ll_img.detach()
    out["clip_loss"] = 2 * loss if reduction == "sum" else loss
    return out


def all_reduce_sum(x: torch.Tensor, world_size: int, gradient: str = "full") -> torch.Tensor:
    """Sum of ``x`` over ranks. ``"full"``: differentiable (the backward all-reduces the gradients, so that
    rank-averaged parameter gradients equal the 1-process full-batch ones); ``"reference"``: a plain in-place
    all-reduce that autograd does not see (each rank back-props only its own share, 1/W of the full gradient)."""
    if world_size == 1:
        return x
    import torch.distributed as dist

    if gradient == "full":
        from torch.distributed import nn as dist_nn

        return dist_nn.all_reduce(x)
    if gradient != "reference":
        raise ValueError(f"gradient must be 'full' or 'reference', got {gradient!r}")
    out = x.clone()
    with torch.no_grad():
        dist.all_reduce(out.data)
    return out


@full_precision
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lamb: float = 5e-3, scale: float = 0.025,
                      world_size: int = 1, gradient: str = "full") -> torch.Tensor:
    """Barlow Twins redundancy reduction between two batch-standardised embeddings (BarLIP; contrastive.md 3.5).

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


def siamlip_loss(pred_image: torch.Tensor, pred_text: torch.Tensor, target_image: torch.Tensor,
                 target_text: torch.Tensor, pred_image_views: Optional[torch.Tensor] = None,
                 pred_text_views: Optional[torch.Tensor] = None, target_image_views: Optional[torch.Tensor] = None,
                 target_text_views: Optional[torch.Tensor] = None) -> torch.Tensor:
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


def barlip_loss(image: torch.Tensor, text: torch.Tensor, image_views: Optional[torch.Tensor] = None,
                text_views: Optional[torch.Tensor] = None, lamb: float = 5e-3, scale: float = 0.025,
                world_size: int = 1, gradient: str = "full") -> torch.Tensor:
    """BarLIP: the mean of :func:`barlow_twins_loss` over the global image-text pair and every augmented pair
    (image view a, text view a'): 1 + A^2 terms, image-text only."""
    terms = [barlow_twins_loss(image, text, lamb, scale, world_size, gradient)]
    if image_views is not None:
        A = image_views.shape[0]
        terms += [barlow_twins_loss(image_views[a], text_views[b], lamb, scale, world_size, gradient)
                  for a in range(A) for b in range(A)]
    return torch.stack(terms).mean()


@torch.no_grad()
@full_precision
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, world_size: int = 1
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
    q /= all_reduce_sum(q.sum(), world_size, "reference")
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True), world_size, "reference")
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T.to(scores.dtype)


def _soft_cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_k q_bk log softmax(z)_bk``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


@full_precision
def swalip_loss(image_views: torch.Tensor, text_views: torch.Tensor, l2l_logit_scale: torch.Tensor,
                iterations: int = 3, epsilon: float = 0.05, rank: int = 0, world_size: int = 1,
                gradient: str = "full") -> torch.Tensor:
    """SwALIP: swapped prediction between pairs of augmented views, the other modality's gathered embeddings
    acting as prototypes (contrastive.md 3.5).

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
            terms.append(0.5 * (_soft_cross_entropy(q_img, hs * s_img[a][b])
                                + _soft_cross_entropy(q_txt, hs * s_txt[a][b])))
    return torch.stack(terms).mean()


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], tau: float) -> None:
    """In place ``target <- tau * target + (1 - tau) * online`` for every pair (BYOL momentum update)."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"EMA needs as many target as online tensors, got {len(target)} and {len(online)}")
    for t, o in zip(target, online):
        t.mul_(tau).add_(o.detach().to(t.dtype), alpha=1 - tau)


# ------------------------------------------------------------------------------------------------- language model
@full_precision
def masked_token_nll(lm_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``-log p(target)`` (B x T, float32 log-softmax), zero where ``mask`` is
    False. Sum it and divide by ``mask.sum()`` for the token-mean NLL of the Kosmos-2 criterion."""
    if lm_logits.shape[:2] != target.shape or target.shape != mask.shape:
        raise ValueError(f"logits {tuple(lm_logits.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on B x T")
    lprobs = F.log_softmax(lm_logits.float(), dim=-1)  # B x T x V
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # B x T
    return nll.masked_fill(~mask, 0.0)
