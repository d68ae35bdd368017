"""COSA's objectives (Chen et al. 2023, "COSA: Concatenated Sample Pretrained Vision-Language Foundation Model";
release ``TXH-mercury/COSA``, ``model/pretrain.py``): the task strings naming them, and the ITC, ITM and
masked-token losses. Tensors in, tensors out, rank and world size passed in, no fairseq import.

The ITC term scores the local rows against the gathered batch (labels = global index of each local sample); its
``gradient`` is one of :mod:`unilm_vl.losses.distributed`'s values. ``full`` gives rank-averaged gradients (what
fairseq's DDP applies with sample_size 1 per rank) equal to those of one rank holding the whole global batch;
``query`` is the release's detached ``ddp_allgather`` (query-side-only gradients), which runs under
torch.distributed even on one process, so its gathered copies are detached at every world size, one included.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .distributed import gather_uneven_rows
from .precision import full_precision

IGNORE_INDEX = -100

# ------------------------------------------------------------------------------------------------ task strings
ORIGIN_TASKS = ("ret", "mlm", "cap", "qa")
CONCATENATED_TASKS = {"cret": "ret", "cmlm": "mlm", "ccap": "cap"}


def parse_cosa_tasks(tasks: str) -> Tuple[List[str], List[str]]:
    """Split a task string such as ``ret_cret_ccap_cmlm`` on ``_`` (the release's ``forward_batch`` in
    ``model/pretrain.py``) into the objectives of the origin pass and of the concatenated pass
    (``cret``/``cmlm``/``ccap`` -> ``ret``/``mlm``/``cap``), in string order."""
    origin: List[str] = []
    concatenated: List[str] = []
    for token in tasks.split("_"):
        if token in CONCATENATED_TASKS:
            concatenated.append(CONCATENATED_TASKS[token])
        elif token in ORIGIN_TASKS:
            origin.append(token)
        else:
            raise ValueError(
                f"unknown COSA task {token!r} in {tasks!r}; known: {list(ORIGIN_TASKS) + list(CONCATENATED_TASKS)}"
            )
    if len(set(origin)) != len(origin) or len(set(concatenated)) != len(concatenated):
        raise ValueError(f"repeated task in {tasks!r}")
    return origin, concatenated


# ------------------------------------------------------------------------------------------------------ losses
@full_precision
def itc_loss(
    video_features: torch.Tensor,
    text_features: torch.Tensor,
    temp: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    label_smoothing: float = 0.1,
    gradient: str = "full",
    sizes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """COSA's ITC (release ``forward_ret``): ``0.5 * [CE_ls(v T_all^T / temp, y) + CE_ls(t V_all^T / temp, y)]``
    over the local rows (B x N logits), ``y`` = global index of the local sample, label smoothing
    ``label_smoothing``, mean over the local rows. Features L2-normalised, B x E; ``temp`` is the raw learnable
    temperature; ``sizes`` the per-rank row counts when they differ. ``gradient="query"``: ``T_all`` and ``V_all``
    carry no gradient (at every world size), so only the query side ``v`` / ``t`` of each matrix (and ``temp``)
    receives one; the value is the same in every mode."""
    v, t = video_features.float(), text_features.float()
    b = v.shape[0]
    offset = sum(sizes[:rank]) if sizes is not None else rank * b
    labels = torch.arange(b, device=v.device) + offset
    all_t = gather_uneven_rows(t, rank, world_size, sizes, gradient)  # N x E
    all_v = gather_uneven_rows(v, rank, world_size, sizes, gradient)  # N x E
    logits_i2t = v @ all_t.T / temp.float()  # B x N
    logits_t2i = t @ all_v.T / temp.float()  # B x N
    return 0.5 * (
        F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing)
    )


@full_precision
def itm_loss(logits: torch.Tensor, labels: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """``ratio * CE(logits, labels)`` over the 3n ITM sequences (labels [1]*n + [0]*2n; release ``forward_ret``,
    ITC-guided hard negatives)."""
    return ratio * F.cross_entropy(logits.float(), labels)


@full_precision
def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the masked positions (M x V logits, M labels; MLM, masked-causal captioning and QA, no label
    smoothing). Zero (with a graph) when nothing is masked."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
