"""Pure loss maths of hard-negative fine-tuning: NegCLIP and FSC-CLIP (Oh et al., EMNLP 2024, "Preserving
Multi-Modal Capabilities of Pre-trained VLMs for Improving Vision-Linguistic Compositionality"; reference
``ytaek-oh/fsc-clip`` ``src/training/losses/loss.py``). Tensors in, tensors out, rank and world size passed in, no
fairseq import.

Layout of the hard negatives (the batch contract of ``--hard-negatives``): ``T`` negative types per sample,
stored **type-major**, row ``t * B + b`` = negative of type ``t`` for sample ``b``; ``neg_mask`` ((T*B,) 0/1) marks
the negatives that exist. Missing negatives are zero feature vectors (so their logit is exactly 0) and zero local
scores, as the reference's ``_fill_empty_negatives`` makes them.

Reference quirks and what these functions do (``mask_missing`` / ``sim_eps`` are the fixes, off by default):

- missing negatives stay in every softmax as logit-0 columns (NegCLIP's image->text softmax, the global and the
  local HN losses). ``mask_missing=True`` drops them from the softmax instead (logit -inf, target 0).
- the min-max token->patch normalisation divides by ``max - min``: NaN when a token's similarities to all
  patches are equal. ``sim_eps > 0`` clamps the range to at least ``sim_eps`` and gives such a token uniform weights
  over the patches.
- NegCLIP on a batch where no sample of any rank has a valid negative: the reference appends no negative column
  (its text batch holds only the B positives) and computes plain CLIP; so does :func:`negclip_loss` (it returns
  :func:`unilm_vl.losses.clip.clip_loss`). When one rank has negatives and another has none, the
  reference's ``all_gather`` receives text tensors of different sizes (B + T*B rows against B; with gloo the rank
  without negatives aborts on the size mismatch). Here the ranks gather their counts first, so that every rank
  takes the same branch: the empty rank contributes T*B zero columns, as a partially filled batch does.
- FSC-CLIP on a batch without any valid negative: the reference's HN losses read a variable it never assigned
  (``neg_text_features``, set only when the text batch holds negatives) and fail; here the HN losses are 0 (with a
  graph, so that backward works).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .clip import clip_loss
from .distributed import gather_features, gather_rows, scores_local_rows
from .precision import full_precision


def split_type_major(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(T*B) x ... type-major rows -> B x T x ... (row ``t*B + b`` goes to ``[b, t]``)."""
    if x.shape[0] % batch_size:
        raise ValueError(f"{x.shape[0]} negative rows is not a multiple of the batch size {batch_size}")
    num_types = x.shape[0] // batch_size
    return x.reshape(num_types, batch_size, *x.shape[1:]).transpose(0, 1)  # B x T x ...


def fill_missing(values: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
    """Scatter the rows of the valid negatives (``values``: M x ... with M = neg_mask.sum(), in type-major order)
    into a (T*B) x ... tensor of zeros (the reference's ``_fill_empty_negatives``)."""
    valid = neg_mask > 0
    if int(valid.sum()) != values.shape[0]:
        raise ValueError(f"{values.shape[0]} negative rows for {int(valid.sum())} valid entries of neg_mask")
    out = values.new_zeros((neg_mask.shape[0], *values.shape[1:]))  # (T*B) x ...
    out[valid] = values
    return out


def _negatives_anywhere(
    neg_text_features: Optional[torch.Tensor],
    neg_mask: Optional[torch.Tensor],
    rank: int,
    world_size: int,
    device: torch.device,
) -> bool:
    """Whether any rank holds a valid negative; the same answer on every rank.

    Each rank contributes ``(negative rows, valid negatives)`` (``neg_mask = None``: every row valid; no negatives:
    ``(0, 0)``); with ``world_size > 1`` these are all-gathered (one collective, called by every rank whatever its
    batch holds, so that no rank waits alone). Ranks with different row counts cannot gather their negatives:
    refused on every rank with the same error.
    """
    rows = 0 if neg_text_features is None else int(neg_text_features.shape[0])
    if rows and neg_mask is not None and neg_mask.shape[0] != rows:
        raise ValueError(f"neg_mask has {neg_mask.shape[0]} entries for {rows} negative rows")
    valid = rows if neg_mask is None or rows == 0 else int((neg_mask > 0).sum())
    counts = torch.tensor([[rows, valid]], dtype=torch.long, device=device)  # 1 x 2
    counts = gather_rows(counts, rank, world_size, "query").tolist()  # W x 2
    if len({r for r, _ in counts}) > 1:
        raise ValueError(
            f"negative rows per rank {[r for r, _ in counts]}: every rank must hold T*B rows with the "
            "same T and B (zero rows where a negative is missing), or no rank any"
        )
    return sum(v for _, v in counts) > 0


@full_precision
def negclip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    neg_text_features: Optional[torch.Tensor] = None,
    neg_mask: Optional[torch.Tensor] = None,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gradient: str = "full",
    label_smoothing: float = 0.0,
    mask_missing: bool = False,
) -> Dict[str, torch.Tensor]:
    """CLIP loss with hard-negative captions added to the image->text softmax (NegCLIP; reference ``ClipLoss``
    under ``--loss-name clip`` with negatives, ``ytaek-oh/fsc-clip`` ``src/training/losses/loss.py``).

    ``logits_per_image = s I_all [T_pos_all; T_neg_all]^T`` (N x (N + T*N): every image against all positives and
    all negatives of every rank), ``logits_per_text = s T_pos_all I_all^T`` (positives only), labels ``arange(N)``;
    ``0.5 * [CE(image->text) + CE(text->image)]``. ``neg_text_features``: (T*B) x D, L2-normalised, zero rows for
    missing negatives (they stay in the softmax as logit-0 columns unless ``mask_missing``, as long as some rank
    has a valid negative). Without a valid negative on any rank (None, 0 rows, or ``neg_mask`` all 0 everywhere) it
    returns :func:`unilm_vl.losses.clip.clip_loss`, as the reference does: no zero column is appended.
    That decision gathers the per-rank counts (every rank must call this function at every step). Positives and
    negatives are gathered as :func:`unilm_vl.losses.distributed.gather_rows` with ``gradient``; with ``local_loss``
    (on more than one rank) or ``gradient="query"`` only the local rows are scored (B x (N + T*N)), as in
    :func:`unilm_vl.losses.clip.clip_loss`.
    """
    if not _negatives_anywhere(neg_text_features, neg_mask, rank, world_size, image_features.device):
        return clip_loss(
            image_features,
            text_features,
            logit_scale,
            rank,
            world_size,
            local_loss,
            gradient,
            label_smoothing=label_smoothing,
        )
    image_features, text_features, scale = image_features.float(), text_features.float(), logit_scale.float()
    all_image, all_text = gather_features(image_features, text_features, rank, world_size, gradient)
    local_rows = scores_local_rows(local_loss, world_size, gradient)
    rows_image = image_features if local_rows else all_image
    rows_text = text_features if local_rows else all_text
    offset = image_features.shape[0] * rank if local_rows else 0
    labels = torch.arange(rows_image.shape[0], device=image_features.device) + offset
    columns = all_text  # N x D
    column_valid = None
    if neg_text_features is not None and neg_text_features.shape[0] > 0:  # this rank's T*B rows (zeros if none valid)
        negatives = gather_rows(neg_text_features.float(), rank, world_size, gradient)  # T*N x D
        columns = torch.cat([all_text, negatives], dim=0)  # (N + T*N) x D
        if mask_missing:
            if neg_mask is None:
                raise ValueError("mask_missing needs neg_mask")
            valid = gather_rows(neg_mask.to(torch.float32), rank, world_size, "query") > 0  # T*N
            column_valid = torch.cat([valid.new_ones(all_text.shape[0]), valid])
    logits_per_image = scale * rows_image @ columns.T  # R x (N + T*N)
    if column_valid is not None:
        logits_per_image = logits_per_image.masked_fill(~column_valid, float("-inf"))
    logits_per_text = scale * rows_text @ all_image.T  # R x N
    loss = 0.5 * (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    )
    return {"clip_loss": loss}


@full_precision
def selective_calibrated_loss(
    logits: torch.Tensor,
    valid: torch.Tensor,
    gamma: float = 0.0,
    label_smoothing: Optional[float] = None,
    mask_missing: bool = False,
) -> torch.Tensor:
    """SCR, the hard-negative loss of FSC-CLIP (reference ``_focal_loss_with_nsr`` / ``_cross_entropy_loss_with_nsr``):
    a (1+T)-way classification of the positive (column 0) against the negatives.

    ``logits``: B x (1+T); ``valid``: B x T (1 = the negative exists). With ``K_b = 1 + #valid_b`` and
    ``eps = label_smoothing`` the targets are ``y_0 = 1 - eps + eps/K_b``, ``y_j = eps/K_b * valid_bj`` (calibrated,
    negative-side label smoothing; no smoothing = hard label 0), ``p_b = softmax(logits_b)`` over all 1+T columns
    (missing negatives included, unless ``mask_missing``) and the per-row loss is
    ``sum_j y_bj * -(1 - p_bj)^gamma * log p_bj`` (focal modulation; gamma = 0 is cross-entropy). Rows without
    any valid negative are dropped; the mean runs over the kept rows (0 when none is kept).
    """
    logits = logits.float()
    valid = valid > 0  # B x T
    if logits.shape[1] != valid.shape[1] + 1 or logits.shape[0] != valid.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} must be B x (1+T) for a B x T mask {tuple(valid.shape)}")
    keep = valid.any(dim=1)  # B
    logits, valid = logits[keep], valid[keep]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    column_valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)  # B' x (1+T)
    if mask_missing:
        logits = logits.masked_fill(~column_valid, float("-inf"))
    # missing columns have target 0: zeroing their log p (-inf with mask_missing) keeps forward and backward finite
    log_p = F.log_softmax(logits, dim=-1).masked_fill(~column_valid, 0.0)  # B' x (1+T)
    per_entry = -log_p
    if gamma != 0:
        per_entry = per_entry * (1.0 - log_p.exp()).pow(gamma)
    eps = float(label_smoothing or 0.0)
    k = column_valid.sum(dim=1, keepdim=True).to(logits.dtype)  # B' x 1
    targets = column_valid.to(logits.dtype) * (eps / k)  # B' x (1+T)
    targets[:, 0] += 1.0 - eps
    return (targets * per_entry).sum(dim=1).mean()


@full_precision
def global_hn_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    neg_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """``z_b = s [<i_b, t_b>, <i_b, n_b1>, ..., <i_b, n_bT>]`` (B x (1+T)) for the local batch; negatives (T*B) x D
    type-major, zero rows for missing ones (logit 0)."""
    image_features, text_features = image_features.float(), text_features.float()
    negatives = split_type_major(neg_text_features.float(), image_features.shape[0])  # B x T x D
    candidates = torch.cat([text_features.unsqueeze(1), negatives], dim=1)  # B x (1+T) x D
    return logit_scale.float() * torch.einsum("bd,bkd->bk", image_features, candidates)  # B x (1+T)


@full_precision
def global_hn_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    neg_text_features: torch.Tensor,
    neg_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    gamma: float = 0.0,
    label_smoothing: Optional[float] = None,
    mask_missing: bool = False,
) -> torch.Tensor:
    """FSC-CLIP's global hard-negative loss (reference ``Global_HNLoss``): :func:`selective_calibrated_loss` of
    :func:`global_hn_logits`, per local sample (no gather), rows without valid negatives dropped. Unweighted."""
    logits = global_hn_logits(image_features, text_features, neg_text_features, logit_scale)  # B x (1+T)
    valid = split_type_major(neg_mask, image_features.shape[0])  # B x T
    return selective_calibrated_loss(logits, valid, gamma, label_smoothing, mask_missing)


@full_precision
def token_patch_weights(
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    normalizer: str = "minmax",
    sparsify: bool = False,
    sim_eps: float = 0.0,
) -> torch.Tensor:
    """Detached weights ``w`` (B x L x P) of each text token over the image patches (reference
    ``get_per_token_visual_patches``).

    ``S = X P^T`` (raw dot products of the un-normalised tokens, no gradient). ``minmax``: per token
    ``S_hat = (S - min_p S) / (max_p S - min_p S)``, with ``sparsify`` entries below 1/P set to 0, then
    ``w = S_hat / sum_p S_hat``. ``softmax``: ``w = softmax_p(S)`` (``sparsify`` is not defined for it). A token whose
    similarities are all equal gives NaN weights (the reference's behaviour) unless ``sim_eps > 0``: then the range is
    clamped to at least ``sim_eps`` and a token whose normalised weights sum to 0 gets uniform weights 1/P.
    """
    with torch.no_grad():
        sim = torch.einsum("bld,bpd->blp", text_tokens.float(), image_tokens.float())  # B x L x P
        if normalizer == "softmax":
            if sparsify:
                raise ValueError("sim_sparsify applies to the minmax normaliser only (as in the reference)")
            return sim.softmax(dim=-1)
        if normalizer != "minmax":
            raise ValueError(f"normalizer must be 'minmax' or 'softmax', got {normalizer!r}")
        num_patches = sim.shape[-1]
        low = sim.min(dim=-1, keepdim=True).values  # B x L x 1
        span = sim.max(dim=-1, keepdim=True).values - low  # B x L x 1
        if sim_eps > 0:
            span = span.clamp_min(sim_eps)
        sim = (sim - low) / span  # B x L x P
        if sparsify:
            sim = sim.masked_fill(sim < 1.0 / num_patches, 0.0)
        total = sim.sum(dim=-1, keepdim=True)  # B x L x 1
        if sim_eps > 0:
            return torch.where(
                total > 0, sim / total.clamp_min(torch.finfo(sim.dtype).tiny), torch.full_like(sim, 1.0 / num_patches)
            )
        return sim / total


def token_grouped_visual_features(image_tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``v_t = || sum_p w_tp P_p ||`` (B x L x D): the patches regrouped per text token, L2-normalised."""
    return F.normalize(torch.einsum("blp,bpd->bld", weights, image_tokens.float()), dim=-1)  # B x L x D


@full_precision
def local_alignment_score(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    token_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    normalizer: str = "minmax",
    sparsify: bool = False,
    sim_eps: float = 0.0,
) -> torch.Tensor:
    """``sigma(I, X) = logsumexp_{t: m_t = 1} s <v_t, ||x_t||>`` per pair (B,), reference
    ``get_aggregated_local_score``.

    ``image_tokens``: B x P x D projected patch tokens, ``text_tokens``: B x L x D projected token outputs (both
    un-normalised), ``token_mask``: B x L, 1 for the tokens that count (the caller excludes padding and SOT).
    Gradients reach both token sets, not the weights (:func:`token_patch_weights`).
    """
    weights = token_patch_weights(text_tokens, image_tokens, normalizer, sparsify, sim_eps)  # B x L x P
    grouped = token_grouped_visual_features(image_tokens, weights)  # B x L x D
    scores = logit_scale.float() * (grouped * F.normalize(text_tokens.float(), dim=-1)).sum(dim=-1)  # B x L
    scores = scores.masked_fill(token_mask <= 0, float("-inf"))
    return torch.logsumexp(scores, dim=1)  # B


@full_precision
def local_hn_logits(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    token_mask: torch.Tensor,
    neg_text_tokens: torch.Tensor,
    neg_token_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    normalizer: str = "minmax",
    sparsify: bool = False,
    sim_eps: float = 0.0,
) -> torch.Tensor:
    """``[sigma(I_b, X_b), sigma(I_b, N_b1), ..., sigma(I_b, N_bT)]`` (B x (1+T)).

    Negatives: ``neg_text_tokens`` (T*B) x L x D and ``neg_token_mask`` (T*B) x L type-major; only the rows with
    ``neg_mask`` = 1 are scored (each against its own sample's patches), missing ones score 0.
    """
    batch = image_tokens.shape[0]
    positive = local_alignment_score(
        image_tokens, text_tokens, token_mask, logit_scale, normalizer, sparsify, sim_eps
    )  # B
    valid = neg_mask > 0  # T*B
    owner = torch.arange(neg_mask.shape[0], device=neg_mask.device) % batch  # T*B: the sample of each row
    negative = local_alignment_score(
        image_tokens[owner[valid]],
        neg_text_tokens[valid],
        neg_token_mask[valid],
        logit_scale,
        normalizer,
        sparsify,
        sim_eps,
    )  # M
    negative = fill_missing(negative, neg_mask)  # T*B
    return torch.cat([positive.unsqueeze(1), split_type_major(negative, batch)], dim=1)  # B x (1+T)


@full_precision
def local_hn_loss(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    token_mask: torch.Tensor,
    neg_text_tokens: torch.Tensor,
    neg_token_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    gamma: float = 0.0,
    label_smoothing: Optional[float] = None,
    normalizer: str = "minmax",
    sparsify: bool = False,
    sim_eps: float = 0.0,
    mask_missing: bool = False,
) -> torch.Tensor:
    """FSC-CLIP's local hard-negative loss (reference ``Local_HNLoss``): :func:`selective_calibrated_loss` of
    :func:`local_hn_logits`, per local sample, rows without valid negatives dropped. Unweighted."""
    logits = local_hn_logits(
        image_tokens,
        text_tokens,
        token_mask,
        neg_text_tokens,
        neg_token_mask,
        neg_mask,
        logit_scale,
        normalizer,
        sparsify,
        sim_eps,
    )  # B x (1+T)
    valid = split_type_major(neg_mask, image_tokens.shape[0])  # B x T
    return selective_calibrated_loss(logits, valid, gamma, label_smoothing, mask_missing)


def dense_token_mask(text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """B x L mask of the tokens the local loss aggregates: not padding, and never position 0 (SOT), as the
    reference's ``(text > 0)`` with column 0 zeroed."""
    mask = (text != pad_id).long()  # B x L
    mask[:, 0] = 0
    return mask
