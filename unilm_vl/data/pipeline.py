"""The one data pipeline every task uses, as small picklable stages.

Flow for one *slot* (a rank x loader-worker pair; ``slot = rank * W + worker``)::

    shards --(per-pass seeded shard order)--> split by slot (whole shards, or every n-th sample)
           --> read raw records (tsv line / tar member group / annotation entry)        [cheap, replayable]
           --> per-pass shuffle buffer (seeded by seed, epoch, pass, slot, source)
           --> weighted mix of sources (seeded)                                         = the *record stream*
           --> decode --> stages (transform, tokenise, ...) --> batch(B) --> collate
                 \\--> BadSample: skipped, counted by one BadSampleCounter, logged every N

Training streams are infinite (passes repeat with fresh shard orders) and cut to a fixed number of batches per
epoch, so every rank yields the same count and DDP never waits on a rank that ran dry. Validation streams are a
single pass, padded with empty batches (fairseq's dummy batches) to the same count on every rank.

Resume: each batch carries how many records its worker has pulled from the record stream. The position of an
epoch is (batch index, records consumed per worker). Rebuilding the stream and discarding that many records
replays shuffle and mixing exactly without decoding an image, so training continues with the next unseen sample.
Per-sample randomness (augmentations) is seeded from (seed, epoch, shard, position in shard): it replays on resume
and is the same whatever the number of ranks and workers.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from .decode import BadSample, BadSampleCounter
from .shards import count_samples
from .sources import READERS, SourceSpec, count_records, decode_record

logger = logging.getLogger(__name__)

Stage = Callable[[Dict[str, Any]], Dict[str, Any]]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python hash seeds."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class StreamPlan:
    """Everything a loader worker needs to rebuild its stream; picklable."""

    sources: List[SourceSpec]
    stages: List[Stage]
    collate: Callable[[List[Dict[str, Any]]], Dict[str, Any]]
    batch_size: int
    seed: int = 1
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1  # logical workers per rank (>= 1; 1 when loading in the main process)
    shuffle: bool = True
    shuffle_buffer: int = 1000
    split: str = "auto"  # "auto" | "shard" | "sample"
    train: bool = True  # infinite cycling stream (train) or a single pass (validation)
    max_bad_fraction: float = 0.1
    log_every: int = 100
    name: str = "train"
    sizes: Dict[str, int] = field(default_factory=dict)  # source name -> samples, filled by count()
    mix_block: int = 1  # records taken from one source per weighted choice (batch size = one source per batch)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be auto, shard or sample; got {self.split!r}")
        if not self.sources:
            raise ValueError("a stream needs at least one source")

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers

    def slot(self, worker: int) -> int:
        return self.rank * self.num_workers + worker

    def count(self) -> int:
        """Total samples over all sources (declared sizes, else a scan of raw records)."""
        for spec in self.sources:
            if spec.name not in self.sizes:
                n = spec.num_samples
                if n is None:
                    n = count_samples(spec.shards, lambda p, s=spec: count_records(p, s))
                self.sizes[spec.name] = n
        return sum(self.sizes.values())


# ------------------------------------------------------------------------------------------- record stream
def _pass_records(plan: StreamPlan, spec: SourceSpec, shards: List[str], split: str, slot: int
                  ) -> Iterator[Dict[str, Any]]:
    """Raw records of one pass over ``shards`` that belong to ``slot``."""
    read = READERS[spec.kind]
    if split == "shard":
        for path in shards[slot::plan.num_slots]:
            yield from read(path, spec)
        return
    ordinal = 0
    for path in shards:
        for record in read(path, spec):
            if ordinal % plan.num_slots == slot:
                yield record
            ordinal += 1


def _source_records(plan: StreamPlan, spec: SourceSpec, epoch: int, slot: int) -> Iterator[Dict[str, Any]]:
    """Raw records of one source for one slot: passes over the shards (forever when training), each pass with
    its own shard order and its own shuffle buffer, so a pass is a permutation of the slot's records."""
    split = plan.split
    if split == "auto":
        split = "shard" if len(spec.shards) >= plan.num_slots else "sample"
    for pass_index in itertools.count():
        shards = list(spec.shards)
        records = _pass_records(plan, spec, shards, split, slot)
        if plan.shuffle:
            random.Random(derive_seed(plan.seed, epoch, pass_index, spec.name, "shards")).shuffle(shards)
            rng = random.Random(derive_seed(plan.seed, epoch, pass_index, slot, spec.name, "buffer"))
            records = shuffle_buffer(_pass_records(plan, spec, shards, split, slot), plan.shuffle_buffer, rng)
        yielded = 0
        for record in records:
            yielded += 1
            yield record
        if not plan.train:
            return
        if yielded == 0:
            raise RuntimeError(
                f"source {spec.name!r}: slot {slot} of {plan.num_slots} received no records from shards "
                f"{spec.shards[:3]}{'...' if len(spec.shards) > 3 else ''}; check the paths or use fewer workers"
            )


def shuffle_buffer(records: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one, refill. ``size <= 1`` is a no-op."""
    if size <= 1:
        yield from records
        return
    buffer: List[Any] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = record
    rng.shuffle(buffer)
    yield from buffer


def record_stream(plan: StreamPlan, epoch: int, worker: int) -> Iterator[Tuple[SourceSpec, Dict[str, Any]]]:
    """The record stream of one (rank, worker): per-source shuffled, then mixed by weight."""
    slot = plan.slot(worker)
    streams = [(spec, _source_records(plan, spec, epoch, slot)) for spec in plan.sources]
    if len(streams) == 1:
        spec, records = streams[0]
        for record in records:
            yield spec, record
        return
    if not plan.train:  # validation: sources one after another
        for spec, records in streams:
            for record in records:
                yield spec, record
        return
    mix_rng = random.Random(derive_seed(plan.seed, epoch, slot, "mix"))
    weights = [spec.weight for spec, _ in streams]
    while True:
        spec, records = mix_rng.choices(streams, weights=weights)[0]
        for _ in range(plan.mix_block):
            yield spec, next(records)


# ------------------------------------------------------------------------------------------- samples, batches
class _SampleSeed:
    """Seeds torch/random for one sample so augmentations replay on resume; restores the main process RNG."""

    def __init__(self, seed: int, restore: bool):
        self.seed, self.restore = seed, restore

    def __enter__(self):
        if self.restore:
            self._torch = torch.random.get_rng_state()
            self._py = random.getstate()
        # the CPU generator only: torch.manual_seed also queues lazy CUDA/XPU/MTIA seeding with a formatted stack
        # trace per call (0.25-1.5 ms per sample on a CUDA build vs 1 us; a sample costs a few ms at 64 px) and,
        # in the main process of a GPU run, would reseed the CUDA generator without restoring it
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc):
        if self.restore:
            torch.random.set_rng_state(self._torch)
            random.setstate(self._py)


def apply_stages(sample: Dict[str, Any], stages: Sequence[Stage]) -> Dict[str, Any]:
    for stage in stages:
        sample = stage(sample)
    return sample


def worker_batches(plan: StreamPlan, epoch: int, worker: int, start: int, num_batches: int,
                   skip_records: int = 0, in_main_process: bool = True
                   ) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Yield ``(batch, meta)`` for batch indices ``i`` with ``i % W == worker`` and ``start <= i < num_batches``.

    ``skip_records`` records of the stream are discarded first (resume). ``meta`` holds the worker, the batch
    index, the records consumed so far and the bad-sample counts. A validation stream that runs out yields
    ``({}, meta)`` for its remaining indices (fairseq treats an empty sample as a dummy batch).
    """
    W = plan.num_workers
    indices = [i for i in range(start, num_batches) if i % W == worker]
    if not indices:
        return
    counter = BadSampleCounter(f"{plan.name}[rank {plan.rank} worker {worker}]", plan.log_every,
                               plan.max_bad_fraction)
    stream = record_stream(plan, epoch, worker)
    for _ in range(skip_records):
        if next(stream, None) is None:
            break
    consumed = skip_records
    exhausted = False
    for index in indices:
        samples: List[Dict[str, Any]] = []
        while len(samples) < plan.batch_size and not exhausted:
            item = next(stream, None)
            if item is None:
                exhausted = True
                break
            spec, record = item
            consumed += 1
            try:
                # seeded by the sample's identity, so its augmentation does not depend on the rank/worker layout
                sample_seed = derive_seed(plan.seed, epoch, record["__url__"], record["__index__"], "sample")
                with _SampleSeed(sample_seed, in_main_process):
                    decoded = decode_record(record, spec)
                    decoded["__seed__"] = sample_seed  # for stages that keep their own random.Random
                    sample = apply_stages(decoded, plan.stages)
            except BadSample as exc:
                counter.skip(exc)
                continue
            counter.ok()
            samples.append(sample)
        meta = {"worker": worker, "index": index, "consumed": consumed, **counter.state()}
        yield (plan.collate(samples) if samples else {}), meta


class WorkerStream(torch.utils.data.IterableDataset):
    """DataLoader dataset: physical worker ``j`` plays logical worker ``(j + start) % W`` so that the loader's
    round-robin order starts with batch index ``start`` (see :func:`worker_batches`)."""

    def __init__(self, plan: StreamPlan, epoch: int, start: int, num_batches: int, skip: Sequence[int]):
        super().__init__()
        self.plan, self.epoch, self.start, self.num_batches = plan, epoch, start, num_batches
        self.skip = list(skip)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.start) % self.plan.num_workers
        return worker_batches(self.plan, self.epoch, worker, self.start, self.num_batches,
                              self.skip[worker], in_main_process=info is None)
