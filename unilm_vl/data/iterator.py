"""A fairseq ``EpochBatchIterating`` over a :class:`~unilm_vl.data.pipeline.StreamPlan`, resumable exactly.

Contract (the one fairseq's trainer and ``checkpoint_utils`` rely on):

- ``len(itr)``: batches per epoch on this rank (the same on every rank).
- ``next_epoch_itr(shuffle, ...)``: a ``CountingIterator`` over the next epoch, or over the rest of the
  current one after ``load_state_dict``.
- ``end_of_epoch()``, ``iterations_in_epoch``, ``epoch``, ``next_epoch_idx``: as in ``EpochBatchIterator``.
- ``state_dict()``: ``{"version": 2, "epoch", "iterations_in_epoch", "shuffle", "stream": {...}}`` where
  ``stream`` records, for every rank and loader worker, how many records of its stream were consumed. fairseq
  saves it from rank 0 only, so ranks all-gather these few integers after each batch (they iterate in lockstep).
- ``load_state_dict(state)``: the next ``next_epoch_itr`` resumes at the first unseen sample of every worker.
  If the world size or worker count changed, exact replay is impossible: the epoch restarts its streams at the
  saved batch index and a warning says so.
- ``first_batch``: a real collated batch (fairseq uses it as the dummy batch for padded validation steps).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from fairseq.data.iterators import CountingIterator, EpochBatchIterating

from .pipeline import StreamPlan, WorkerStream, worker_batches

logger = logging.getLogger(__name__)


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
    def __init__(self, plan: StreamPlan, num_batches: int, epoch: int = 1, loader_workers: int = 0,
                 prefetch_factor: int = 2, sync_ranks: Optional[bool] = None):
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
        self._consumed: List[List[int]] = self._zeros()
        self._bad = {"good": 0, "bad": 0}
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
            self._consumed = self._zeros()
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
        if self._cur_epoch_itr is not None and self.end_of_epoch():
            epoch, offset, consumed = self.epoch + 1, 0, self._zeros()
        else:
            epoch, offset, consumed = self.epoch, self.iterations_in_epoch, self._consumed
        return {
            "version": 2,
            "epoch": epoch,
            "iterations_in_epoch": offset,
            "shuffle": self.shuffle,
            "stream": {"world_size": self.plan.world_size, "num_workers": self.plan.num_workers,
                       "consumed": [list(c) for c in consumed], "bad_samples": dict(self._bad)},
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.epoch = state_dict["epoch"]
        offset = state_dict.get("iterations_in_epoch", 0)
        stream = state_dict.get("stream")
        if offset <= 0:
            self._next_epoch_itr = None
            return
        if offset > self.num_batches:
            raise RuntimeError(f"checkpoint is at batch {offset} of an epoch of {self.num_batches} batches; the "
                               "data or batch size changed. Relaunch with --reset-dataloader.")
        if (stream is None or stream["world_size"] != self.plan.world_size
                or stream["num_workers"] != self.plan.num_workers):
            logger.warning(
                "resuming epoch %d at batch %d without exact replay: the checkpoint's loader layout %s differs from "
                "world_size=%d num_workers=%d; some samples of this epoch may repeat or be skipped",
                self.epoch, offset, None if stream is None else (stream["world_size"], stream["num_workers"]),
                self.plan.world_size, self.plan.num_workers)
            self._consumed = self._zeros()
        else:
            self._consumed = [list(c) for c in stream["consumed"]]
            self._bad = dict(stream.get("bad_samples", self._bad))
        self._next_epoch_itr = self._epoch_iterator(self.epoch, offset)

    @property
    def first_batch(self):
        if self._first_batch is None:
            for batch, _ in worker_batches(self.plan, self.epoch, 0, 0, 1, 0):
                self._first_batch = batch
            if not self._first_batch:
                raise RuntimeError(f"{self.plan.name}: no usable sample to build a first batch")
        return self._first_batch

    # ---------------------------------------------------------------------------------------- internals
    def _zeros(self) -> List[List[int]]:
        return [[0] * self.plan.num_workers for _ in range(self.plan.world_size)]

    def _epoch_iterator(self, epoch: int, offset: int) -> CountingIterator:
        skip = self._consumed[self.plan.rank]
        dataset = WorkerStream(self.plan, epoch, offset, self.num_batches, skip)
        if self.loader_workers > 0:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.loader_workers,
                prefetch_factor=self.prefetch_factor, persistent_workers=False)
        else:
            loader = dataset
        source = self._track(loader)
        itr = CountingIterator(source, start=offset, total=self.num_batches)
        itr.unilm_source = source
        return itr

    @staticmethod
    def _close(itr: Optional[CountingIterator]) -> None:
        """End a finished (or abandoned) epoch's loader now. fairseq stops at ``total`` without exhausting the
        source, so its DataLoader workers would live on; workers forked for the next epoch would then inherit the
        old loader iterator and print "AssertionError: can only test a child process" when they collect it."""
        source = getattr(itr, "unilm_source", None)
        if source is not None:
            source.close()  # GeneratorExit in _track drops the DataLoader iterator, which shuts its workers down

    def _track(self, loader):
        for batch, meta in loader:
            self._consumed[self.plan.rank][meta["worker"]] = meta["consumed"]
            if self.sync_ranks:
                gathered = _all_gather_ints(self._consumed[self.plan.rank], self.plan.world_size)
                self._consumed = gathered
            self._bad = {"good": meta["good"], "bad": meta["bad"]}
            yield batch
