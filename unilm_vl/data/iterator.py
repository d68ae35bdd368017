"""A fairseq ``EpochBatchIterating`` over a :class:`~unilm_vl.data.pipeline.StreamPlan`, resumable exactly.

Contract (the one fairseq's trainer and ``checkpoint_utils`` rely on):

- ``len(itr)``: batches per epoch on this rank (the same on every rank).
- ``next_epoch_itr(shuffle, ...)``: a ``CountingIterator`` over the next epoch, or over the rest of the
  current one after ``load_state_dict``. The finished epoch's loader workers are already gone by then (the
  epoch's :class:`~unilm_vl.data.pipeline.EpochStream` shuts them down with its last batch).
- ``end_of_epoch()``, ``iterations_in_epoch``, ``epoch``, ``next_epoch_idx``: as in ``EpochBatchIterator``.
- ``state_dict()``: ``{"version": 3, "epoch", "iterations_in_epoch", "shuffle", "stream": {"world_size",
  "num_workers", "consumed": [records of its stream each rank consumed], "bad_samples": {"good", "bad" (summed over
  ranks and loader workers), "per_rank": [[good, bad], ...], "reasons" (this rank's, the 32 most common)}}}``.
  fairseq saves it from rank 0 only, so ranks all-gather these few integers after each batch (they iterate in
  lockstep).
- ``load_state_dict(state)``: the next ``next_epoch_itr`` resumes at the first unseen sample of every rank, with
  the bad-sample counts where they were; any number of loader workers replays exactly (batches do not depend on
  it). If the world size changed, exact replay is impossible: the epoch restarts its streams at the saved batch
  index and a warning says so. Version-2 states (one stream per rank x worker) replay when they had one worker.
- ``first_batch``: a real collated batch (fairseq uses it as the dummy batch for padded validation steps); its bad
  samples are counted silently, since the epoch logs them when it reads them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List, Optional

import torch
from fairseq.data.iterators import CountingIterator, EpochBatchIterating

from .pipeline import EpochStream, StreamPlan

logger = logging.getLogger(__name__)

MAX_SAVED_REASONS = 32
"""Bad-sample reasons kept in the state; rarer ones are summed under :data:`OTHER_REASONS`."""
OTHER_REASONS = "(other reasons)"


def _all_gather_ints(values: List[int], world_size: int) -> List[List[int]]:
    """All-gather a short list of ints from every rank (CUDA tensor under NCCL, CPU under gloo)."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    local = torch.tensor(values, dtype=torch.long, device=device)
    out = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


class CheckpointableBatchIterator(EpochBatchIterating):
    def __init__(
        self,
        plan: StreamPlan,
        num_batches: int,
        epoch: int = 1,
        loader_workers: int = 0,
        prefetch_factor: int = 2,
        sync_ranks: Optional[bool] = None,
    ):
        if num_batches <= 0:
            raise ValueError(
                f"{plan.name}: {num_batches} batches per epoch; the data has fewer samples than one global batch"
            )
        self.plan = plan
        self.num_batches = num_batches
        self.loader_workers = loader_workers
        self.prefetch_factor = prefetch_factor
        if sync_ranks is None:
            sync_ranks = plan.train and plan.world_size > 1 and torch.distributed.is_initialized()
        self.sync_ranks = sync_ranks
        self.epoch = max(epoch, 1)
        self.shuffle = plan.shuffle
        self._cur_epoch_itr: Optional[CountingIterator] = None
        self._next_epoch_itr: Optional[CountingIterator] = None
        self._resume: Optional[Dict[str, Any]] = None  # every rank's position and counts (load_state_dict)
        self._first_batch = None

    # ---------------------------------------------------------------------------------------- fairseq API
    def __len__(self) -> int:
        return self.num_batches

    @property
    def n(self) -> int:
        return self.iterations_in_epoch

    @property
    def next_epoch_idx(self) -> int:
        if self._next_epoch_itr is not None:
            return self.epoch
        if self._cur_epoch_itr is not None and self.end_of_epoch():
            return self.epoch + 1
        return self.epoch

    def next_epoch_itr(self, shuffle=True, fix_batches_to_gpus=False, set_dataset_epoch=True):
        self.epoch = self.next_epoch_idx
        self._close(self._cur_epoch_itr)
        if self._next_epoch_itr is not None:
            self._cur_epoch_itr, self._next_epoch_itr = self._next_epoch_itr, None
        else:
            self._cur_epoch_itr = self._epoch_iterator(self.epoch, 0)
        return self._cur_epoch_itr

    def end_of_epoch(self) -> bool:
        return not self._cur_epoch_itr.has_next()

    @property
    def iterations_in_epoch(self) -> int:
        if self._cur_epoch_itr is not None:
            return self._cur_epoch_itr.n
        if self._next_epoch_itr is not None:
            return self._next_epoch_itr.n
        return 0

    def state_dict(self) -> Dict[str, Any]:
        itr = self._cur_epoch_itr if self._cur_epoch_itr is not None else self._next_epoch_itr
        stream: Optional[EpochStream] = getattr(itr, "unilm_stream", None)
        ranks = self._rank_positions(stream)
        if self._cur_epoch_itr is not None and self.end_of_epoch():
            epoch, offset, consumed = self.epoch + 1, 0, [0] * self.plan.world_size
        else:
            epoch, offset, consumed = self.epoch, self.iterations_in_epoch, [r[0] for r in ranks]
        reasons = stream.counter.reasons.most_common() if stream is not None else []
        if len(reasons) > MAX_SAVED_REASONS:  # a reason that names a file would grow the checkpoint without bound
            rest = sum(n for _, n in reasons[MAX_SAVED_REASONS - 1 :])
            reasons = reasons[: MAX_SAVED_REASONS - 1] + [(OTHER_REASONS, rest)]
        return {
            "version": 3,
            "epoch": epoch,
            "iterations_in_epoch": offset,
            "shuffle": self.shuffle,
            "stream": {
                "world_size": self.plan.world_size,
                "num_workers": self.plan.num_workers,
                "consumed": consumed,
                "bad_samples": {
                    "good": sum(r[1] for r in ranks),
                    "bad": sum(r[2] for r in ranks),
                    "per_rank": [r[1:] for r in ranks],
                    "reasons": dict(reasons),
                },
            },
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]
        offset = state_dict.get("iterations_in_epoch", 0)
        stream = state_dict.get("stream")
        self._resume = None
        if offset <= 0:
            self._next_epoch_itr = None
            return
        if offset > self.num_batches:
            raise RuntimeError(
                f"checkpoint is at batch {offset} of an epoch of {self.num_batches} batches; the "
                "data or batch size changed. Relaunch with --reset-dataloader."
            )
        resume = self._replayable(state_dict.get("version", 2), stream)
        if resume is None:
            logger.warning(
                "resuming epoch %d at batch %d without exact replay: the checkpoint's loader layout %s differs from "
                "world_size=%d; some samples of this epoch may repeat or be skipped",
                self.epoch,
                offset,
                None if stream is None else (stream["world_size"], stream.get("num_workers")),
                self.plan.world_size,
            )
        self._resume = resume
        self._next_epoch_itr = self._epoch_iterator(self.epoch, offset)

    @property
    def first_batch(self):
        if self._first_batch is None:
            stream = EpochStream(self.plan, self.epoch, 0, 1, quiet=True)
            self._first_batch = next(stream)
            stream.close()
            if not self._first_batch:
                raise RuntimeError(f"{self.plan.name}: no usable sample to build a first batch")
        return self._first_batch

    # ---------------------------------------------------------------------------------------- internals
    def _replayable(self, version: int, stream: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """This rank's ``{"consumed", "counts"}`` from a saved stream state, or None when it cannot replay."""
        if stream is None or stream["world_size"] != self.plan.world_size:
            return None
        if version < 3:  # one stream per rank x worker: the same stream as now only with one worker
            if stream.get("num_workers", 1) != 1:
                return None
            return {"ranks": [[c[0], 0, 0] for c in stream["consumed"]], "reasons": {}}
        bad = stream.get("bad_samples", {})
        per_rank = bad.get("per_rank") or [[0, 0]] * self.plan.world_size
        return {
            "ranks": [[c, g, b] for c, (g, b) in zip(stream["consumed"], per_rank)],
            "reasons": bad.get("reasons", {}),
        }

    def _rank_positions(self, stream: Optional[EpochStream]) -> List[List[int]]:
        """``[consumed, good, bad]`` of every rank: the last all-gather (or the resumed state) for the others,
        zeros when neither exists; this rank's own live values."""
        out = [[0, 0, 0] for _ in range(self.plan.world_size)]
        if stream is not None:
            if stream.ranks is not None:
                out = [list(r) for r in stream.ranks]
            out[self.plan.rank] = [stream.consumed, stream.counter.good, stream.counter.bad]
        return out

    def _epoch_iterator(self, epoch: int, offset: int) -> CountingIterator:
        resume = self._resume if offset > 0 else None
        gather = functools.partial(_all_gather_ints, world_size=self.plan.world_size) if self.sync_ranks else None
        own = resume["ranks"][self.plan.rank] if resume else [0, 0, 0]
        counts = None
        if resume:  # the saved reasons are rank 0's (the rank fairseq saves from)
            counts = {"good": own[1], "bad": own[2], "reasons": resume["reasons"] if self.plan.rank == 0 else {}}
        stream = EpochStream(
            self.plan,
            epoch,
            offset,
            self.num_batches,
            skip_records=own[0],
            counts=counts,
            loader_workers=self.loader_workers,
            prefetch_factor=self.prefetch_factor,
            gather=gather,
        )
        if resume:
            stream.ranks = [list(r) for r in resume["ranks"]]
        itr = CountingIterator(stream, start=offset, total=self.num_batches)
        itr.unilm_stream = stream  # no reference back to this iterator: a dropped epoch is freed at once
        return itr

    @staticmethod
    def _close(itr: Optional[CountingIterator]) -> None:
        """End an abandoned epoch's loader now (a finished one has already shut its workers down)."""
        stream = getattr(itr, "unilm_stream", None)
        if stream is not None:
            stream.close()
