"""The checkpointable iterator: fairseq's contract, exact resume, rank/worker splits, padding, mixing."""

import collections
import logging
import multiprocessing
import subprocess
import sys
import tarfile

import pytest

from unilm_vl.data.iterator import CheckpointableBatchIterator
from unilm_vl.data.pipeline import StreamPlan, derive_seed, shuffle_buffer
from unilm_vl.data.sources import SourceSpec, parse_data_spec

from conftest import write_tsv, write_wds


def collect_keys(samples):
    return [s["__key__"] for s in samples]


def make_iterator(sources, batch_size=4, num_batches=None, workers=0, rank=0, world=1, train=True, epoch=1, **kw):
    plan = StreamPlan(
        sources=sources,
        stages=[],
        collate=collect_keys,
        batch_size=batch_size,
        seed=7,
        rank=rank,
        world_size=world,
        num_workers=max(1, workers),
        train=train,
        shuffle_buffer=kw.pop("buf", 16),
        **kw,
    )
    if num_batches is None:
        num_batches = plan.count() // (batch_size * world)
    return CheckpointableBatchIterator(plan, num_batches, epoch=epoch, loader_workers=workers)


def run_epoch(itr, limit=None):
    out = []
    epoch_itr = itr.next_epoch_itr()
    for batch in epoch_itr:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def test_shuffle_buffer_is_a_permutation_and_seeded():
    import random

    a = list(shuffle_buffer(iter(range(50)), 8, random.Random(1)))
    b = list(shuffle_buffer(iter(range(50)), 8, random.Random(1)))
    assert sorted(a) == list(range(50)) and a == b and a != list(range(50))
    assert derive_seed(1, "x") == derive_seed(1, "x") != derive_seed(2, "x")


def test_a_moved_dataset_draws_the_same_augmentations(wds_dir, tmp_path):
    """Sample seeds name the shard relative to the plan's shard root, not by its absolute path, so a copy of the
    dataset elsewhere gives every sample the same seed (and the same torch draw), while other shards and positions
    get other seeds."""
    import shutil

    import torch

    from unilm_vl.data.pipeline import decode_sample
    from unilm_vl.data.sources import READERS

    def draws(root):
        plan = StreamPlan(parse_data_spec(str(root / "part-*.tar")), [], collect_keys, 4, seed=7)
        plan.stages = [lambda s: {**s, "draw": torch.rand(()).item()}]
        spec = plan.sources[0]
        records = [(0, r) for path in spec.shards for r in READERS["wds"](path, spec)]
        samples = [decode_sample(plan, 1, source, record) for source, record in records]
        return plan, {s["__key__"]: (s["__seed__"], s["draw"]) for s in samples}

    plan, here = draws(wds_dir)
    moved = shutil.copytree(wds_dir, tmp_path / "elsewhere" / "deeper" / "wds")
    moved_plan, there = draws(moved)
    assert plan.shard_root == str(wds_dir) and moved_plan.shard_root == str(moved)
    assert len(here) == 60 and here == there
    assert len({seed for seed, _ in here.values()}) == 60  # 4 shards x 15 positions: all distinct


def test_epoch_contract_and_reshuffle(wds_dir):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    itr = make_iterator(sources)  # 60 samples, B=4 -> 15 batches
    assert len(itr) == 15 and itr.next_epoch_idx == 1
    first = run_epoch(itr)
    assert len(first) == 15 and itr.end_of_epoch() and itr.next_epoch_idx == 2
    flat = [k for b in first for k in b]
    assert sorted(flat) == [f"{i:06d}" for i in range(60)]  # one epoch = one pass over all samples here
    assert itr.state_dict()["epoch"] == 2 and itr.state_dict()["iterations_in_epoch"] == 0
    second = run_epoch(itr)
    assert itr.epoch == 2 and second != first and sorted(sum(second, [])) == sorted(flat)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [1, 6, 7])
def test_resume_continues_with_the_next_unseen_sample(wds_dir, workers, stop_at):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    unbroken = run_epoch(make_iterator(sources, workers=workers))
    itr = make_iterator(sources, workers=workers)
    head = run_epoch(itr, limit=stop_at)
    state = itr.state_dict()
    assert state["iterations_in_epoch"] == stop_at
    resumed = make_iterator(sources, workers=workers)
    resumed.load_state_dict(state)
    assert resumed.iterations_in_epoch == stop_at
    tail = list(resumed.next_epoch_itr())
    assert head + tail == unbroken
    assert resumed.end_of_epoch() and resumed.next_epoch_idx == 2


def test_resume_skips_bad_samples_the_same_way(tmp_path):
    write_tsv(str(tmp_path / "t" / "part"), 40, 20)
    shard = tmp_path / "t" / "part-00000.tsv"
    lines = shard.read_text().splitlines(keepends=True)
    lines.insert(3, "broken\trow\n")
    lines.insert(9, "another\tbroken\trow\n")
    shard.write_text("".join(lines))
    sources = parse_data_spec(str(tmp_path / "t" / "part-*.tsv"))
    kw = dict(num_batches=9, max_bad_fraction=0.5)
    unbroken = run_epoch(make_iterator(sources, **kw))
    itr = make_iterator(sources, **kw)
    head = run_epoch(itr, limit=4)
    resumed = make_iterator(sources, **kw)
    resumed.load_state_dict(itr.state_dict())
    assert head + list(resumed.next_epoch_itr()) == unbroken
    assert itr.state_dict()["stream"]["consumed"] == [4 * 4 + 1]  # the skipped row counts as consumed


def test_training_stream_cycles_to_fill_the_epoch(wds_dir):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    batches = run_epoch(make_iterator(sources, num_batches=40))  # 160 samples from 60: passes repeat
    counts = collections.Counter(k for b in batches for k in b)
    assert len(batches) == 40 and len(counts) == 60 and max(counts.values()) <= 3


@pytest.mark.parametrize("split", ["sample", "shard"])
def test_ranks_and_workers_see_disjoint_data(wds_dir, split):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))  # 4 shards of 15
    seen = []
    for rank in range(2):
        itr = make_iterator(
            sources, world=2, rank=rank, workers=2, split=split, num_batches=6, batch_size=2, shuffle=False
        )
        seen.append([k for b in run_epoch(itr) for k in b])
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])


def test_validation_pads_ranks_to_the_same_count(tmp_path):
    write_wds(str(tmp_path / "v" / "part"), 9, 9)
    sources = parse_data_spec(str(tmp_path / "v" / "part-*.tar"))
    # 9 samples over 2 ranks -> 5 and 4 samples -> ceil(5/2) = 3 batches on both ranks
    per_rank = []
    for rank in range(2):
        itr = make_iterator(
            sources, world=2, rank=rank, train=False, shuffle=False, split="sample", num_batches=3, batch_size=2
        )
        per_rank.append(run_epoch(itr))
    assert [len(b) for b in per_rank[0]] == [2, 2, 1]
    assert [len(b) for b in per_rank[1]] == [2, 2, 0]  # an empty batch = fairseq dummy batch
    assert sorted(k for r in per_rank for b in r for k in b) == [f"{i:06d}" for i in range(9)]


def test_weighted_mixing_and_its_resume(tmp_path):
    write_wds(str(tmp_path / "a" / "part"), 40, 40)
    write_tsv(str(tmp_path / "b" / "part"), 40, 40)
    sources = [
        SourceSpec(name="a", kind="wds", shards=[str(tmp_path / "a" / "part-00000.tar")], weight=3.0),
        SourceSpec(name="b", kind="tsv", shards=[str(tmp_path / "b" / "part-00000.tsv")], weight=1.0),
    ]
    plan_kw = dict(num_batches=50, batch_size=8)

    def source_of(samples):
        return [s["__source__"] for s in samples]

    itr = make_iterator(sources, **plan_kw)
    itr.plan.collate = source_of
    counts = collections.Counter(s for b in run_epoch(itr) for s in b)
    assert counts["a"] + counts["b"] == 400
    assert 0.70 < counts["a"] / 400 < 0.80  # weight 3:1 -> 75%
    unbroken = run_epoch(make_iterator(sources, **plan_kw))
    head_itr = make_iterator(sources, **plan_kw)
    head = run_epoch(head_itr, limit=13)
    resumed = make_iterator(sources, **plan_kw)
    resumed.load_state_dict(head_itr.state_dict())
    assert head + list(resumed.next_epoch_itr()) == unbroken


def test_changed_worker_count_resumes_exactly_and_changed_world_size_warns(wds_dir, caplog):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    unbroken = run_epoch(make_iterator(sources, workers=0))
    itr = make_iterator(sources, workers=0)
    head = run_epoch(itr, limit=3)
    state = itr.state_dict()
    other = make_iterator(sources, workers=2)  # the batches do not depend on the loader workers
    other.load_state_dict(state)
    assert head + list(other.next_epoch_itr()) == unbroken
    assert "without exact replay" not in caplog.text
    two_ranks = make_iterator(sources, world=2, num_batches=7)
    two_ranks.load_state_dict(state)
    assert "without exact replay" in caplog.text
    assert len(list(two_ranks.next_epoch_itr())) == len(two_ranks) - 3


def test_version_2_state_of_one_worker_still_replays(wds_dir):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    unbroken = run_epoch(make_iterator(sources))
    itr = make_iterator(sources)
    head = run_epoch(itr, limit=5)
    state = itr.state_dict()
    state["version"] = 2  # the layout before the worker-independent stream: one consumed count per rank x worker
    state["stream"] = {
        "world_size": 1,
        "num_workers": 1,
        "consumed": [state["stream"]["consumed"]],
        "bad_samples": {"good": 20, "bad": 0},
    }
    resumed = make_iterator(sources, workers=2)
    resumed.load_state_dict(state)
    assert head + list(resumed.next_epoch_itr()) == unbroken


def test_first_batch_is_real(wds_dir):
    itr = make_iterator(parse_data_spec(str(wds_dir / "part-*.tar")))
    assert len(itr.first_batch) == 4


def test_last_batch_shuts_the_epochs_loader_workers(wds_dir):
    """fairseq stops at ``total`` without exhausting the source, so the epoch's DataLoader (2 workers) is shut down
    with its last batch: its worker processes are gone before anything else runs (workers forked for the next epoch
    would otherwise inherit the old loader and print "can only test a child process" when they collect it)."""
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    itr = make_iterator(sources, workers=2)
    before = set(multiprocessing.active_children())  # loaders that earlier tests left behind
    first = itr.next_epoch_itr()
    next(first)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    assert len(list(first)) == 14 and itr.end_of_epoch()
    assert not any(w.is_alive() for w in workers)  # joined by the shutdown, not left to the garbage collector
    abandoned = itr.next_epoch_itr()  # an epoch stopped early (max-update) is shut down by the next one
    next(abandoned)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    itr.load_state_dict(itr.state_dict())
    itr.next_epoch_itr()
    assert not any(w.is_alive() for w in workers)


# ------------------------------------------------------------------------------------------- epoch contents
def write_tsv_with_bad_rows(root, bad_at=((10, 15), (2, 9, 14))):
    """Two TSV shards of 20 good rows each with malformed rows inserted at the given line positions; returns the
    good keys and the number of bad rows."""
    write_tsv(str(root / "part"), 40, 20)
    (root / "sizes.json").unlink()  # it counts the good rows; a scan counts every record
    for shard, positions in enumerate(bad_at):
        path = root / f"part-{shard:05d}.tsv"
        lines = path.read_text().splitlines(keepends=True)
        for position in positions:
            lines.insert(position, "broken\trow\n")
        path.write_text("".join(lines))
    return {f"{i:06d}" for i in range(40)}, sum(len(p) for p in bad_at)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_holds_every_good_sample_and_repeats_only_to_fill(tmp_path, workers):
    """45 raw records (5 malformed) in batches of 4: the epoch is ceil(45 / 4) = 12 batches = 48 samples, so it
    holds each of the 40 good samples and repeats exactly 8 of them; the same with 0 and 2 loader workers."""
    good, bad = write_tsv_with_bad_rows(tmp_path)
    sources = parse_data_spec(str(tmp_path / "part-*.tsv"))
    itr = make_iterator(sources, workers=workers, num_batches=12, max_bad_fraction=0.5)
    assert itr.plan.count() == len(good) + bad == 45
    batches = run_epoch(itr)
    counts = collections.Counter(k for b in batches for k in b)
    assert set(counts) == good
    assert sum(counts.values()) == 48 and sum(n - 1 for n in counts.values()) == 48 - len(good)
    assert batches == run_epoch(make_iterator(sources, workers=0, num_batches=12, max_bad_fraction=0.5))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_counts_in_the_state_cover_every_worker(tmp_path, workers):
    """In order (no shuffle), 3 batches use good rows 0-11 of shard 0 and skip its bad row 10; the whole epoch
    (40 good + 8 refills from the start of shard 0, which holds no bad row there) skips all 5 bad rows. The
    counts come from every worker's samples, and a resumed epoch continues them."""
    write_tsv_with_bad_rows(tmp_path)
    sources = parse_data_spec(str(tmp_path / "part-*.tsv"))
    kw = dict(workers=workers, num_batches=12, max_bad_fraction=0.5, shuffle=False)
    itr = make_iterator(sources, **kw)
    run_epoch(itr, limit=3)
    state = itr.state_dict()
    assert state["stream"]["consumed"] == [13]
    assert state["stream"]["bad_samples"] == {
        "good": 12,
        "bad": 1,
        "per_rank": [[12, 1]],
        "reasons": {"malformed row": 1},
    }
    resumed = make_iterator(sources, **kw)
    resumed.load_state_dict(state)
    list(resumed.next_epoch_itr())
    assert resumed.state_dict()["stream"]["bad_samples"] == {
        "good": 48,
        "bad": 5,
        "per_rank": [[48, 5]],
        "reasons": {"malformed row": 5},
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_first_bad_sample_is_logged_once(tmp_path, caplog, workers):
    """The first batch that fairseq takes as its dummy batch reads the same records as the epoch; only the epoch
    logs their skips."""
    write_tsv_with_bad_rows(tmp_path, bad_at=((1,), ()))
    sources = parse_data_spec(str(tmp_path / "part-*.tsv"))
    itr = make_iterator(sources, workers=workers, num_batches=10, max_bad_fraction=0.5, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="unilm_vl.data.decode"):
        assert len(itr.first_batch) == 4
        run_epoch(itr)
    assert caplog.text.count("skipped 1 bad samples") == 1


def test_empty_tar_among_shards_is_counted_and_the_others_train(tmp_path, caplog):
    """A valid but empty tar beside a good shard, 2 loader workers: one bad record ("empty shard"), logged, and the
    epoch of ceil(31 / 4) = 8 batches holds all 30 good samples."""
    keys = write_wds(str(tmp_path / "w" / "part"), 30, 30)
    with tarfile.open(tmp_path / "w" / "part-00001.tar", "w"):
        pass
    sources = parse_data_spec(str(tmp_path / "w" / "part-*.tar"))
    itr = make_iterator(sources, workers=2, num_batches=8, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="unilm_vl.data.decode"):
        batches = run_epoch(itr)
    assert set(k for b in batches for k in b) == set(keys) and len(batches) == 8
    assert itr.state_dict()["stream"]["bad_samples"]["reasons"] == {"empty shard": 1}
    assert "empty shard" in caplog.text and "part-00001.tar" in caplog.text


EPOCHS_SCRIPT = """
import gc
import sys

from unilm_vl.data.iterator import CheckpointableBatchIterator
from unilm_vl.data.pipeline import StreamPlan
from unilm_vl.data.sources import parse_data_spec


class CollectGarbage:
    # a stage: run the cyclic garbage collector once in each loader worker, where a loader of an earlier epoch that
    # the worker inherited would be collected (and complain that it cannot test a child process)
    collected = False

    def __call__(self, sample):
        if not CollectGarbage.collected:
            CollectGarbage.collected = True
            gc.collect()
        return sample


def keys(samples):
    return [s["__key__"] for s in samples]


gc.disable()  # the main process collects nothing: earlier epochs' objects live on, as between two collections
sources = parse_data_spec(sys.argv[1])
for epoch in (1, 2, 3):
    plan = StreamPlan(sources=sources, stages=[CollectGarbage()], collate=keys, batch_size=4, num_workers=2)
    itr = CheckpointableBatchIterator(plan, 5, epoch=epoch, loader_workers=2)  # fairseq builds one per epoch
    assert len(list(itr.next_epoch_itr())) == 5
print("epochs done")
"""


@pytest.mark.slow
def test_no_stray_traceback_from_an_earlier_epochs_loader(wds_dir, tmp_path):
    """Three epochs with 2 loader workers, a new iterator per epoch (as fairseq-train's get_train_iterator): no
    "Exception ignored ... AssertionError: can only test a child process" on stderr."""
    script = tmp_path / "epochs.py"
    script.write_text(EPOCHS_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(wds_dir / "part-*.tar")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "epochs done" in run.stdout
    assert "can only test a child process" not in run.stderr
    assert "Exception ignored" not in run.stderr


def test_pack_samples_round_trip():
    """Worker results travel as one stacked tensor per field that all samples share in shape and dtype."""
    import torch

    from unilm_vl.data.decode import BadSample
    from unilm_vl.data.pipeline import pack_samples, unpack_samples

    def samples():
        return [
            {"__key__": "a", "image": torch.full((3, 2, 2), 1.0), "tokens": torch.tensor([1, 2])},
            BadSample("undecodable image", "x.tar#b", "jpg"),
            {"__key__": "c", "image": torch.full((3, 2, 2), 3.0), "tokens": torch.tensor([3, 4, 5])},
        ]

    outcomes, stacked = pack_samples(samples())
    assert list(stacked) == ["image"] and stacked["image"].shape == (2, 3, 2, 2)  # token rows differ in length
    assert "image" not in outcomes[0] and isinstance(outcomes[1], BadSample)
    for got, want in zip(unpack_samples((outcomes, stacked)), samples()):
        if isinstance(want, BadSample):
            assert (got.reason, got.source, got.field) == (want.reason, want.source, want.field)
            continue
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in ("image", "tokens"))


def test_saved_reasons_are_capped(tmp_path):
    """Reasons that name a file (one per missing video) must not grow the checkpoint: the 31 most common are kept,
    the rest summed."""
    from unilm_vl.data.decode import BadSample
    from unilm_vl.data.iterator import MAX_SAVED_REASONS, OTHER_REASONS

    write_tsv_with_bad_rows(tmp_path)
    itr = make_iterator(
        parse_data_spec(str(tmp_path / "part-*.tsv")), num_batches=12, max_bad_fraction=0.5, shuffle=False
    )
    run_epoch(itr, limit=1)  # rows 0-3 of shard 0: no bad one
    counter = itr._cur_epoch_itr.unilm_stream.counter
    counter.quiet = True
    for i in range(40):
        counter.skip(BadSample(f"reason {i:02d}", "x", "y"))
    reasons = itr.state_dict()["stream"]["bad_samples"]["reasons"]
    assert counter.bad == 40 and len(reasons) == MAX_SAVED_REASONS == 32
    assert reasons[OTHER_REASONS] == 40 - 31 and sum(reasons.values()) == 40
