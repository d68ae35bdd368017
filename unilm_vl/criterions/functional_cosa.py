"""Pure loss maths of COSA (Chen et al. 2023; release ``TXH-mercury/COSA``, ``model/pretrain.py``): tensors in,
tensors out, rank and world size passed in, no fairseq import.

Gradient semantics of the ITC term (W ranks, local rows against the gathered columns, labels = global index):
``gradient="full"`` gathers with a differentiable all-gather, so that the rank-averaged gradients (what fairseq's
DDP applies with sample_size 1 per rank) equal those of one rank holding the whole global batch;
``gradient="reference"`` is the release's detached ``ddp_allgather`` (query-side-only gradients). The release
always runs under torch.distributed, so its gathered copies are detached at every world size, one process
included; here too: with ``"reference"`` the gathered side is detached at world size 1 as well, so that a mode
means the same thing whatever the number of ranks (``"full"`` at world size 1 is the plain single-batch loss).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .functional import full_precision, gather_rows

IGNORE_INDEX = -100


def gather_uneven_rows(x: torch.Tensor, rank: int, world_size: int, sizes: Optional[Sequence[int]] = None,
                       gradient: str = "full") -> torch.Tensor:
    """All ranks' rows of ``x`` in rank order when ranks hold different row counts ``sizes`` (None: all equal):
    padded to the largest, gathered (see :func:`unilm_vl.criterions.functional.gather_rows` for ``gradient``) and
    cropped back. ``gradient="reference"`` returns detached rows at every world size, 1 included (the release's
    ``ddp_allgather``, ``utils/distributed.py`` of ``TXH-mercury/COSA``, is a plain ``all_gather`` even on one
    rank)."""
    if gradient not in ("full", "reference"):
        raise ValueError(f"gradient must be 'full' or 'reference', got {gradient!r}")
    if world_size == 1:
        return x.detach() if gradient == "reference" else x
    if sizes is None or len(set(sizes)) == 1:
        return gather_rows(x, rank, world_size, gradient)
    largest = max(sizes)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, largest - x.shape[0]))  # largest x ...
    rows = gather_rows(padded, rank, world_size, gradient)  # W*largest x ...
    keep = torch.cat([torch.arange(r * largest, r * largest + s, device=x.device) for r, s in enumerate(sizes)])
    return rows.index_select(0, keep)


@full_precision
def itc_loss(video_features: torch.Tensor, text_features: torch.Tensor, temp: torch.Tensor, rank: int = 0,
             world_size: int = 1, label_smoothing: float = 0.1, gradient: str = "full",
             sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """COSA's ITC (reference 3.1): ``0.5 * [CE_ls(v T_all^T / temp, y) + CE_ls(t V_all^T / temp, y)]`` over the
    local rows (B x N logits), ``y`` = global index of the local sample, label smoothing ``label_smoothing``, mean
    over the local rows. Features L2-normalised, B x E; ``temp`` is the raw learnable temperature.
    ``gradient="reference"``: ``T_all`` and ``V_all`` carry no gradient (at every world size), so only the query
    side ``v`` / ``t`` of each matrix (and ``temp``) receives one; the value is the same in both modes."""
    v, t = video_features.float(), text_features.float()
    b = v.shape[0]
    offset = sum(sizes[:rank]) if sizes is not None else rank * b
    labels = torch.arange(b, device=v.device) + offset
    all_t = gather_uneven_rows(t, rank, world_size, sizes, gradient)  # N x E
    all_v = gather_uneven_rows(v, rank, world_size, sizes, gradient)  # N x E
    logits_i2t = v @ all_t.T / temp.float()  # B x N
    logits_t2i = t @ all_v.T / temp.float()  # B x N
    return 0.5 * (F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing))


@full_precision
def itm_loss(logits: torch.Tensor, labels: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """``ratio * CE(logits, labels)`` over the 3n ITM sequences (labels [1]*n + [0]*2n), reference 3.2."""
    return ratio * F.cross_entropy(logits.float(), labels)


@full_precision
def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the masked positions (M x V logits, M labels; MLM, masked-causal captioning and QA, no label
    smoothing). Zero (with a graph) when nothing is masked."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
