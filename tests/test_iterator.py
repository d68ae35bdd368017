"""The checkpointable iterator: fairseq's contract, exact resume, rank/worker splits, padding, mixing."""
import collections
import multiprocessing

import pytest

from unilm_vl.data.iterator import CheckpointableBatchIterator
from unilm_vl.data.pipeline import StreamPlan, derive_seed, shuffle_buffer
from unilm_vl.data.sources import SourceSpec, parse_data_spec

from conftest import write_tsv, write_wds


def collect_keys(samples):
    return [s["__key__"] for s in samples]


def make_iterator(sources, batch_size=4, num_batches=None, workers=0, rank=0, world=1, train=True, epoch=1,
                  **kw):
    plan = StreamPlan(sources=sources, stages=[], collate=collect_keys, batch_size=batch_size, seed=7, rank=rank,
                      world_size=world, num_workers=max(1, workers), train=train, shuffle_buffer=kw.pop("buf", 16),
                      **kw)
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
    assert sum(itr.state_dict()["stream"]["consumed"][0]) > 4 * 4  # the skipped rows count as consumed


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
        itr = make_iterator(sources, world=2, rank=rank, workers=2, split=split, num_batches=6, batch_size=2,
                            shuffle=False)
        seen.append([k for b in run_epoch(itr) for k in b])
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])


def test_validation_pads_ranks_to_the_same_count(tmp_path):
    write_wds(str(tmp_path / "v" / "part"), 9, 9)
    sources = parse_data_spec(str(tmp_path / "v" / "part-*.tar"))
    # 9 samples over 2 ranks -> 5 and 4 samples -> ceil(5/2) = 3 batches on both ranks
    per_rank = []
    for rank in range(2):
        itr = make_iterator(sources, world=2, rank=rank, train=False, shuffle=False, split="sample",
                            num_batches=3, batch_size=2)
        per_rank.append(run_epoch(itr))
    assert [len(b) for b in per_rank[0]] == [2, 2, 1]
    assert [len(b) for b in per_rank[1]] == [2, 2, 0]  # an empty batch = fairseq dummy batch
    assert sorted(k for r in per_rank for b in r for k in b) == [f"{i:06d}" for i in range(9)]


def test_weighted_mixing_and_its_resume(tmp_path):
    write_wds(str(tmp_path / "a" / "part"), 40, 40)
    write_tsv(str(tmp_path / "b" / "part"), 40, 40)
    sources = [SourceSpec(name="a", kind="wds", shards=[str(tmp_path / "a" / "part-00000.tar")], weight=3.0),
               SourceSpec(name="b", kind="tsv", shards=[str(tmp_path / "b" / "part-00000.tsv")], weight=1.0)]
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


def test_changed_layout_warns_and_restarts_streams(wds_dir, caplog):
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    itr = make_iterator(sources, workers=0)
    run_epoch(itr, limit=3)
    state = itr.state_dict()
    other = make_iterator(sources, workers=2)
    other.load_state_dict(state)
    assert "without exact replay" in caplog.text
    assert len(list(other.next_epoch_itr())) == len(other) - 3


def test_first_batch_is_real(wds_dir):
    itr = make_iterator(parse_data_spec(str(wds_dir / "part-*.tar")))
    assert len(itr.first_batch) == 4


def test_next_epoch_shuts_the_finished_epochs_loader_workers(wds_dir):
    """fairseq stops at ``total`` without exhausting the source, so the finished epoch's DataLoader (2 workers) must
    be ended when the next epoch starts: its worker processes are gone before the new ones fork (otherwise the new
    workers inherit the old loader and print "can only test a child process" when they collect it)."""
    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    itr = make_iterator(sources, workers=2)
    before = set(multiprocessing.active_children())  # loaders that earlier tests left behind
    first = itr.next_epoch_itr()
    assert len(list(first)) == 15
    workers = set(multiprocessing.active_children()) - before  # the epoch-1 loader's, still alive after `total`
    assert len(workers) == 2
    itr.next_epoch_itr()  # the epoch-2 loader starts its workers only on its first batch
    assert first.unilm_source.gi_frame is None  # the epoch-1 source generator is closed
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
