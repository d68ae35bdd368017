"""The one data pipeline every task uses, as small picklable stages.

Flow for one rank (``--num-workers`` loader processes only decode; the batches do not depend on their number)::

    shards --(per-pass seeded shard order)--> split by rank (whole shards, or every n-th sample)
           --> read raw records (tsv line / tar member group / annotation entry)        [cheap, replayable]
           --> per-pass shuffle buffer (seeded by seed, epoch, pass, rank, source)
           --> weighted mix of sources (seeded)                                         = the *record stream*
           --> chunks of B records --> decode + stages (transform, tokenise, ...)      [loader workers, in order]
           --> the next B good samples, in stream order --> collate                     = batch i
                 \\--> BadSample: skipped, counted by the rank's one BadSampleCounter, logged every N

The main process reads the record stream and assembles the batches; loader workers decode chunks of records and
return the samples (or the :class:`~unilm_vl.data.decode.BadSample` of each bad record) in order. Batch ``i`` is
therefore the same sequence of good samples whatever the number of workers, and one counter sees every bad sample
of the rank.

Epoch contents: training streams are infinite (passes repeat with fresh shard orders and shuffles) and cut to a
fixed number of batches per epoch, the same on every rank, so DDP never waits on a rank that ran dry. That length
(``ceil(samples / (B x ranks))``, set by the task) comes from the declared sizes or a scan of raw records, bad ones
included (which records are bad is known only after decoding). A rank's epoch therefore holds every good sample of
its first pass once, in the pass's shuffled order, and then repeats samples of the next pass only to fill the fixed
length: with ``n`` bad records a single-source epoch repeats ``n`` good samples (plus the padding of its last
batch). With several ranks this holds per rank when each rank's share of the records
fits its ``num_batches x B`` samples (always with ``--split-by sample``; with whole-shard splits when the shards
divide evenly); a weighted mixture draws sources by weight, not pass by pass. Validation streams are a single pass,
padded with empty batches (fairseq's dummy batches) to the same count on every rank.

Resume: the position of an epoch is (batch index, records of the rank's stream consumed). Rebuilding the stream and
discarding that many records replays shuffle and mixing exactly without decoding an image, so training continues
with the next unseen sample, with any number of loader workers. Per-sample randomness (augmentations) is seeded from
(seed, epoch, shard, position in shard), the shard named relative to the folder holding all shards of the plan: it
replays on resume, is the same whatever the number of ranks and workers, and survives moving the dataset.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .decode import BadSample, BadSampleCounter
from .shards import count_samples
from .sources import READERS, SourceSpec, count_records, decode_record
from .tokenizers import TextTokenizer

logger = logging.getLogger(__name__)

Stage = Callable[[Dict[str, Any]], Dict[str, Any]]
Record = Tuple[int, Dict[str, Any]]
"""``(index of the source in plan.sources, raw record)``: what the record stream yields."""


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python hash seeds."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class StreamPlan:
    """Everything needed to rebuild a rank's stream; picklable."""

    sources: List[SourceSpec]
    stages: List[Stage]
    collate: Callable[[List[Dict[str, Any]]], Dict[str, Any]]
    batch_size: int
    seed: int = 1
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1  # loader processes decoding for this rank (>= 1); the batches do not depend on it
    shuffle: bool = True
    shuffle_buffer: int = 1000
    split: str = "auto"  # "auto" | "shard" | "sample"
    train: bool = True  # infinite cycling stream (train) or a single pass (validation)
    max_bad_fraction: float = 0.1
    log_every: int = 100
    name: str = "train"
    sizes: Dict[str, int] = field(default_factory=dict)  # source name -> samples, filled by count()
    mix_block: int = 1  # records taken from one source per weighted choice (batch size = one source per batch)
    defer_jpeg: bool = False  # JPEGs reach the stages undecoded: the image transform decodes them (draft decoding)
    shard_root: str = field(init=False, default="")  # set from the sources: see __post_init__

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be auto, shard or sample; got {self.split!r}")
        if not self.sources:
            raise ValueError("a stream needs at least one source")
        # the deepest folder holding every shard of every source: a sample's seed names its shard relative to it
        dirs = [os.path.dirname(os.path.abspath(p)) for spec in self.sources for p in spec.shards]
        self.shard_root = os.path.commonpath(dirs) if dirs else ""

    @property
    def num_slots(self) -> int:
        """Ways the records are split: one part per rank (loader workers share their rank's part)."""
        return self.world_size

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
def _pass_records(plan: StreamPlan, spec: SourceSpec, shards: List[str], split: str) -> Iterator[Dict[str, Any]]:
    """Raw records of one pass over ``shards`` that belong to this rank."""
    read = READERS[spec.kind]
    if split == "shard":
        for path in shards[plan.rank :: plan.num_slots]:
            yield from read(path, spec)
        return
    ordinal = 0
    for path in shards:
        for record in read(path, spec):
            if ordinal % plan.num_slots == plan.rank:
                yield record
            ordinal += 1


def _source_records(plan: StreamPlan, spec: SourceSpec, epoch: int) -> Iterator[Dict[str, Any]]:
    """Raw records of one source for this rank: passes over the shards (forever when training), each pass with
    its own shard order and its own shuffle buffer, so a pass is a permutation of the rank's records."""
    split = plan.split
    if split == "auto":
        split = "shard" if len(spec.shards) >= plan.num_slots else "sample"
    for pass_index in itertools.count():
        shards = list(spec.shards)
        records = _pass_records(plan, spec, shards, split)
        if plan.shuffle:
            random.Random(derive_seed(plan.seed, epoch, pass_index, spec.name, "shards")).shuffle(shards)
            rng = random.Random(derive_seed(plan.seed, epoch, pass_index, plan.rank, spec.name, "buffer"))
            records = shuffle_buffer(_pass_records(plan, spec, shards, split), plan.shuffle_buffer, rng)
        yielded = 0
        for record in records:
            yielded += 1
            yield record
        if not plan.train:
            return
        if yielded == 0:
            raise RuntimeError(
                f"source {spec.name!r}: rank {plan.rank} of {plan.num_slots} received no records from shards "
                f"{spec.shards[:3]}{'...' if len(spec.shards) > 3 else ''}; check the paths or use fewer ranks"
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


def record_stream(plan: StreamPlan, epoch: int) -> Iterator[Record]:
    """The record stream of this rank: per-source shuffled, then mixed by weight; ``(source index, record)``."""
    streams = [(i, _source_records(plan, spec, epoch)) for i, spec in enumerate(plan.sources)]
    if len(streams) == 1:
        i, records = streams[0]
        for record in records:
            yield i, record
        return
    if not plan.train:  # validation: sources one after another
        for i, records in streams:
            for record in records:
                yield i, record
        return
    mix_rng = random.Random(derive_seed(plan.seed, epoch, plan.rank, "mix"))
    weights = [spec.weight for spec in plan.sources]
    while True:
        i, records = mix_rng.choices(streams, weights=weights)[0]
        for _ in range(plan.mix_block):
            yield i, next(records)


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


@functools.lru_cache(maxsize=4096)
def shard_name(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators: the location-free name of a shard in sample seeds."""
    return os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")


def apply_stages(sample: Dict[str, Any], stages: Sequence[Stage]) -> Dict[str, Any]:
    for stage in stages:
        sample = stage(sample)
    return sample


def decode_sample(plan: StreamPlan, epoch: int, source: int, record: Dict[str, Any], in_main_process: bool = True):
    """Decode one raw record and run the stages: the sample, or the :class:`BadSample` that rejected it."""
    # seeded by the sample's identity, so its augmentation does not depend on the rank/worker layout, nor on where
    # the dataset lies: the shard is named relative to the plan's shard root
    shard = shard_name(record["__url__"], plan.shard_root)
    sample_seed = derive_seed(plan.seed, epoch, shard, record["__index__"], "sample")
    try:
        with _SampleSeed(sample_seed, in_main_process):
            decoded = decode_record(record, plan.sources[source], plan.defer_jpeg)
            decoded["__seed__"] = sample_seed  # for stages that keep their own random.Random
            return apply_stages(decoded, plan.stages)
    except BadSample as exc:
        return exc


class DecodeChunks(torch.utils.data.Dataset):
    """Loader dataset of the worker processes: item = a chunk of ``(source, record)``; value = their decoded samples
    or :class:`BadSample` s, in order, packed by :func:`pack_samples`. The main process reads the records and
    assembles batches (:class:`EpochStream`)."""

    def __init__(self, plan: StreamPlan, epoch: int):
        self.plan, self.epoch = plan, epoch

    def __getitem__(self, chunk: List[Record]) -> Tuple[List[Any], Dict[str, torch.Tensor]]:
        return pack_samples(
            [decode_sample(self.plan, self.epoch, source, record, in_main_process=False) for source, record in chunk]
        )


def pack_samples(outcomes: List[Any]) -> Tuple[List[Any], Dict[str, torch.Tensor]]:
    """Move each top-level tensor field that all samples of ``outcomes`` hold with one shape and dtype into one
    stacked tensor: ``(outcomes without those fields, {field: N x ...})``. A worker hands tensors to the main process
    through shared memory, one segment and file descriptor per tensor; one per field instead of one per sample and
    field makes that cost per chunk, not per sample. :func:`unpack_samples` undoes it (rows are views)."""
    samples = [o for o in outcomes if not isinstance(o, BadSample)]
    stacked: Dict[str, torch.Tensor] = {}
    if samples:
        for key, value in list(samples[0].items()):
            if torch.is_tensor(value) and all(
                torch.is_tensor(s.get(key)) and s[key].shape == value.shape and s[key].dtype == value.dtype
                for s in samples
            ):
                stacked[key] = torch.stack([s.pop(key) for s in samples])  # N x ...
    return outcomes, stacked


def unpack_samples(packed: Tuple[List[Any], Dict[str, torch.Tensor]]) -> List[Any]:
    """The outcomes of :func:`pack_samples` with their tensor fields back (row ``i`` of the ``i``-th sample)."""
    outcomes, stacked = packed
    if stacked:
        samples = [o for o in outcomes if not isinstance(o, BadSample)]
        for key, rows in stacked.items():
            for sample, row in zip(samples, rows):
                sample[key] = row
    return outcomes


def stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, without the copy when the tensors are, in order, all the rows of one contiguous
    tensor: a worker's packed chunk (:func:`unpack_samples`) that makes up a whole batch, the usual case since the
    chunks are batch-sized. The packed tensor lives in the shared memory the worker handed over, and a copy of it
    touches every page of that mapping, which costs far more per byte than a copy in private memory (on the
    real-size world, 224 px, batch 50: 35 ms of the main process's time per batch, benchmarks/README.md)."""
    first = tensors[0]
    base = first._base
    if (
        base is not None
        and base.is_contiguous()
        and base.dim() == first.dim() + 1
        and base.shape[0] == len(tensors)
        and base.shape[1:] == first.shape
        and all(
            t._base is base and t.storage_offset() == base.storage_offset() + i * base.stride(0)
            for i, t in enumerate(tensors)
        )
    ):
        return base
    return torch.stack(list(tensors))


def load_tokenizers(stages: Sequence[Stage]) -> None:
    """Build the tokenisers the stages hold (``stage.tokenizer.load()``) in this process. Called before the loader
    forks its workers: they inherit the built vocabularies instead of each rebuilding them. The workers are fresh
    each pass, and rebuilding open_clip's BPE tables took about 8% of a worker's time on the real-size world's CLIP
    pass (benchmarks/README.md)."""
    for stage in stages:
        tokenizer = getattr(stage, "tokenizer", None)
        if isinstance(tokenizer, TextTokenizer):
            tokenizer.load()


def _as_is(packed: Any) -> Any:
    """The loader's collate function: keep the worker's value (batches are collated by :class:`EpochStream`)."""
    return packed


def _chunks(records: Iterator[Record], size: int) -> Iterator[List[Record]]:
    while True:
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
        yield chunk


class EpochStream:
    """Batches ``start .. num_batches - 1`` of one rank's epoch: batch ``i`` collates the next ``batch_size`` good
    samples of the record stream, after ``skip_records`` records were discarded (resume).

    With ``loader_workers > 0`` the records go in chunks of ``batch_size`` to a ``DataLoader`` whose workers decode
    them; the batches are the same as with none. After the last batch the loader's workers are shut down at once
    (fairseq stops at the epoch's length without exhausting its iterator; workers that lived on would be inherited by
    the next epoch's forked workers, which then print "can only test a child process" when they collect them).
    ``close()`` does the same for an epoch abandoned early. The stream keeps no reference to its owner, so a dropped
    stream is freed at once rather than by the cyclic garbage collector.

    Position (for ``state_dict``): ``index`` (next batch), ``consumed`` (records taken from the stream) and
    ``counter`` (this rank's good/bad counts, every worker's samples included). ``gather``, when given, all-gathers
    ``[consumed, good, bad]`` from every rank after each batch into ``ranks``. A validation stream that runs out
    yields ``{}`` (fairseq's dummy batch) for its remaining indices.
    """

    def __init__(
        self,
        plan: StreamPlan,
        epoch: int,
        start: int,
        num_batches: int,
        skip_records: int = 0,
        counts: Optional[Dict[str, Any]] = None,
        loader_workers: int = 0,
        prefetch_factor: int = 2,
        gather: Optional[Callable[[List[int]], List[List[int]]]] = None,
        quiet: bool = False,
    ):
        self.plan, self.epoch, self.index, self.num_batches = plan, epoch, start, num_batches
        self.consumed = skip_records
        self.counter = BadSampleCounter(
            f"{plan.name}[rank {plan.rank}]", plan.log_every, plan.max_bad_fraction, quiet=quiet
        )
        if counts:
            self.counter.load_state(counts)
        self.gather = gather
        self.ranks: Optional[List[List[int]]] = None
        self.loader_workers, self.prefetch_factor = loader_workers, prefetch_factor
        self._records: Optional[Iterator[Record]] = None
        self._outcomes: Optional[Iterator[Any]] = None
        self._loader_iter = None

    def _start(self) -> None:
        """Open the record stream, skip the consumed records and start the loader (on the first batch, so no
        worker forks before the previous epoch is closed)."""
        plan = self.plan
        self._records = record_stream(plan, self.epoch)
        for _ in range(self.consumed):
            if next(self._records, None) is None:
                break
        if self.loader_workers > 0:
            load_tokenizers(plan.stages)
            loader = torch.utils.data.DataLoader(
                DecodeChunks(plan, self.epoch),
                sampler=_chunks(self._records, plan.batch_size),
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.loader_workers,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
            self._loader_iter = iter(loader)
            self._outcomes = itertools.chain.from_iterable(map(unpack_samples, self._loader_iter))
        else:
            self._outcomes = (decode_sample(plan, self.epoch, source, record) for source, record in self._records)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        if self.index >= self.num_batches:
            self.close()
            raise StopIteration
        if self._outcomes is None:
            self._start()
        samples: List[Dict[str, Any]] = []
        while len(samples) < self.plan.batch_size:
            outcome = next(self._outcomes, None)
            if outcome is None:  # a validation pass ran out
                break
            self.consumed += 1
            if isinstance(outcome, BadSample):
                self.counter.skip(outcome)
                continue
            self.counter.ok()
            samples.append(outcome)
        self.index += 1
        if self.index >= self.num_batches:
            self.close()
        if self.gather is not None:
            self.ranks = self.gather([self.consumed, self.counter.good, self.counter.bad])
        return self.plan.collate(samples) if samples else {}

    def take(self, n: int) -> None:
        """Stop after ``n`` more batches (fairseq's ``CountingIterator.take``)."""
        self.num_batches = min(self.num_batches, self.index + n)
        if self.index >= self.num_batches:
            self.close()

    def close(self) -> None:
        """Shut the loader's workers down and close the shards; idempotent."""
        if self._loader_iter is not None:
            shutdown = getattr(self._loader_iter, "_shutdown_workers", None)  # what the loader's __del__ calls
            if shutdown is not None:
                shutdown()
            self._loader_iter = None
        self._outcomes = iter(())
        if self._records is not None:
            self._records.close()

    def state(self) -> Dict[str, Any]:
        return {"index": self.index, "consumed": self.consumed, **self.counter.state()}


def worker_batches(
    plan: StreamPlan, epoch: int, worker: int, start: int, num_batches: int, skip_records: int = 0
) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """``(batch, meta)`` for the batch indices ``i`` of :class:`EpochStream` with ``i % plan.num_workers == worker``,
    decoded in this process (tests and tools: the batches of all ``worker`` values together are the epoch).

    ``meta`` holds the worker, the batch index, the records consumed and the rank's bad-sample counts so far."""
    stream = EpochStream(plan, epoch, start, num_batches, skip_records)
    try:
        while stream.index < stream.num_batches:
            index = stream.index
            batch = next(stream)
            if index % plan.num_workers == worker:
                yield batch, {"worker": worker, **stream.state(), "index": index}
    finally:
        stream.close()
