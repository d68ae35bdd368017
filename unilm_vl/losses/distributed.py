"""Data-parallel position and the cross-rank gathers / all-reduces of the losses, with one vocabulary for their
gradient (``gradient=`` here, ``--gather-gradient`` on every criterion). No fairseq import.

W ranks hold B rows each (N = W x B). A loss either scores all N gathered rows against all N columns ("N x N": CLIP,
COSMOS, NegCLIP, FSC-CLIP by default) or only its own B rows, the *query side*, against the N gathered columns
("local rows": ``--local-loss``, clip-rocket's CL2L / SwALIP, COSA's ITC). ``gradient`` says what the gathered
copies carry:

| value | gathered rows | all-reduced sums | rank-averaged gradient vs 1 process on the global batch |
|---|---|---|---|
| ``full`` (default) | all carry gradient to their owner | differentiable | equal (N x N and local rows) |
| ``own`` | others' constant, own slot live | own summand live | 1/W for N x N and Barlow Twins' C |
| ``query`` | all constant, own slot too, W = 1 too | as ``own`` | equal to the 1-process query-side one |

``full`` uses autograd's ``all_gather`` / ``all_reduce``. Under ``own`` a rank back-props only through its own rows
(its slot of the gathered matrix is the live local tensor): where every rank computes the same global value (the
N x N logits, Barlow Twins' C) the rank-averaged gradient is exactly 1/W of the full one; with local rows it is not
proportional. Under ``query`` every gathered row is a constant, the own slot included and on one process too, and
the loss scores the local rows against them, so only the query side gets a gradient; the rank average equals that
of one process on the global batch in the same mode (not proportional to the full gradient). A summed statistic
has no query side: there ``query`` keeps the own summand live, as ``own`` does.

The loss *value* is the same in every mode. ``query`` implies local rows (scoring the constant N x N matrix would
train nothing). ``--local-loss`` is a separate switch of the CLIP-style criteria: with ``full`` it only changes the
memory (B x N instead of N x N logits), with ``own`` it gives the local rows plus the own columns a gradient.

What the references do, in this vocabulary:

- open_clip ``gather_features`` (``mlfoundations/open_clip`` ``src/open_clip/loss.py``): ``gather_with_grad=True``
  is ``full``; ``gather_with_grad=False`` is ``own`` without ``local_loss`` and ``query`` with it (on >= 2 ranks).
  COSMOS's recipes (``ExplainableML/cosmos``) and FSC-CLIP (``ytaek-oh/fsc-clip``, whose ``_gather_features``
  ignores ``gather_with_grad``) gather as ``own``.
- clip-rocket / SLIP ``utils.all_gather_batch`` (``facebookresearch/clip-rocket``): ``query`` on >= 2 ranks; on one
  process they skip the gather, which is ``full`` there. Their in-place ``all_reduce`` of BarLIP's C is ``own``.
- COSA's ``ddp_allgather`` (``TXH-mercury/COSA`` ``utils/distributed.py``) runs even on one rank: ``query`` at every
  world size.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F

GATHER_GRADIENTS = ("full", "own", "query")


def check_gradient(gradient: str) -> None:
    """A clear error for a value outside :data:`GATHER_GRADIENTS`."""
    if gradient not in GATHER_GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GATHER_GRADIENTS)}; got {gradient!r}")


def data_parallel_rank_world() -> Tuple[int, int]:
    """(rank, world size) of the data-parallel group; (0, 1) when torch.distributed is not initialised.

    Every rank of this package's runs is a data-parallel rank (no model parallelism; FSDP2 shards over a 1-D mesh of
    all ranks), so this is the global rank and world size, the values fairseq's
    ``distributed.utils.get_data_parallel_rank`` / ``get_data_parallel_world_size`` return under its trainer (their
    group is a ``new_group()`` of every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def scores_local_rows(local_loss: bool, world_size: int, gradient: str) -> bool:
    """Whether a CLIP-style loss scores only its local rows (labels offset by ``B * rank``): always under ``query``,
    with ``local_loss`` on more than one rank (on one rank the local rows are all rows)."""
    return gradient == "query" or (local_loss and world_size > 1)


def gather_rows(x: torch.Tensor, rank: int, world_size: int, gradient: str = "full") -> torch.Tensor:
    """All ranks' rows of ``x`` in rank order (W*B x ...), carrying the gradient that ``gradient`` names (module
    table). On one rank: ``x`` itself, detached under ``query``."""
    check_gradient(gradient)
    if world_size == 1:
        return x.detach() if gradient == "query" else x
    if gradient == "full":
        return torch.cat(dist_nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach())
    if gradient == "own":
        parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor, text_features: torch.Tensor, rank: int, world_size: int, gradient: str = "full"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' image and text features (N x D each), gathered as :func:`gather_rows` in that order: the same
    collectives as open_clip's ``gather_features``."""
    return (
        gather_rows(image_features, rank, world_size, gradient),
        gather_rows(text_features, rank, world_size, gradient),
    )


def gather_uneven_rows(
    x: torch.Tensor, rank: int, world_size: int, sizes: Optional[Sequence[int]] = None, gradient: str = "full"
) -> torch.Tensor:
    """:func:`gather_rows` when ranks hold different row counts ``sizes`` (None: all equal): padded to the largest,
    gathered and cropped back."""
    check_gradient(gradient)
    if world_size == 1 or sizes is None or len(set(sizes)) == 1:
        return gather_rows(x, rank, world_size, gradient)
    largest = max(sizes)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, largest - x.shape[0]))  # largest x ...
    rows = gather_rows(padded, rank, world_size, gradient)  # W*largest x ...
    keep = torch.cat([torch.arange(r * largest, r * largest + s, device=x.device) for r, s in enumerate(sizes)])
    return rows.index_select(0, keep)


def all_reduce_sum(x: torch.Tensor, world_size: int, gradient: str = "full") -> torch.Tensor:
    """Sum of ``x`` over ranks. ``full``: differentiable (the backward all-reduces the gradients, so rank-averaged
    parameter gradients equal the one-process ones); ``own`` and ``query``: an in-place all-reduce that autograd does
    not see, so each rank back-props only its own summand (1/W of the full gradient)."""
    check_gradient(gradient)
    if world_size == 1:
        return x
    if gradient == "full":
        return dist_nn.all_reduce(x)
    out = x.clone()
    with torch.no_grad():
        dist.all_reduce(out.data)
    return out
