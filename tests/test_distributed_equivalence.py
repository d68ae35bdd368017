"""One update on 2 CPU ranks x batch B equals one update on 1 rank x batch 2B, through the real fairseq trainer
(issue 7, deliverable 1). The ranks are gloo processes forked by :func:`trainer_harness.run_ranks` with the flags
``torchrun ... -m unilm_vl.train --cpu`` adds (legacy DDP); the torchrun command line itself is run by
``test_train_e2e.py`` (the same equality for the default loss), ``test_fsdp2.py`` and ``test_fault_tolerance.py``.

fairseq sums the per-rank gradients (legacy DDP averages them, the trainer multiplies back by the world size) and
divides by the sample size summed over ranks. With plain SGD (no momentum, no warm-up, no clipping) the weights
after one update are ``w0 - lr * g``, so equal weights mean equal gradients; the update's loss is compared too.

* CLIP with ``--local-loss``: each rank computes B x 2B logits of its rows against the gathered columns, labels
  offset by ``B * rank``, and the gather carries gradients back to the owner rank. Its 1-rank reference is the
  plain 2B x 2B loss. (The default N x N path is covered by ``test_train_e2e.py``; the clip-rocket heads keep
  per-rank BatchNorm statistics on gloo, so they are not rank-invariant on CPU by construction.)
* Kosmos-2 (``kosmos2_tiny`` on GRIT TSV shards): ``sample_size`` is the caption-token count of each rank, so the
  2-rank update is the token mean over the whole 2B batch even though the ranks hold different token counts. The
  weights before the update show that it is far larger than the tolerance and that the frozen image tower did not
  move.

Data are split every other sample (``--split-by sample --no-shuffle``), so the 2 ranks together see exactly the
2B samples of the 1-rank batch; augmentations are seeded per sample, not per rank.
"""

import pytest
import torch
from test_kosmos2_train import k2_args
from test_train_e2e import train_args

from unilm_vl.data import build_vocab
from unilm_vl.data.synthetic import generate_world

from conftest import write_wds
from trainer_harness import build_trainer, end_process_group, parameters, run_ranks, train_on_ranks, train_updates

SGD_ONE_UPDATE = [
    "--optimizer",
    "sgd",
    "--lr",
    "0.5",
    "--max-update",
    "1",
    "--no-shuffle",
    "--split-by",
    "sample",
    "--clip-norm",
    "0",
    "--disable-validation",
    "--num-workers",
    "0",
]


def one_and_two_ranks(one_argv, two_argv, batch, tmp_path):
    """One update of ``one_argv`` on 1 rank with 2 x ``batch`` (in this process) and of ``two_argv`` on 2 forked
    gloo ranks with ``batch`` and legacy DDP (what ``torchrun ... -m unilm_vl.train --cpu`` sets up). Returns the
    1-rank run's ``(loss, weights before, weights after)`` and the 2-rank run's ``{"losses", "state"}`` (rank 0's,
    full tensors)."""
    one, itr = build_trainer([*one_argv, "--batch-size", str(2 * batch)])
    start = parameters(one)
    loss = train_updates(one, itr, 1)[0]["loss"]
    after = parameters(one)
    end_process_group()
    out = tmp_path / "two.pt"
    run_ranks(train_on_ranks, ([*two_argv, "--batch-size", str(batch), "--ddp-backend", "legacy_ddp"], 1, str(out)))
    return (loss, start, after), torch.load(out, weights_only=False)


def assert_same_weights(a, b, atol, rtol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eq_clip")
    write_wds(str(root / "train" / "part"), 24, 8)
    return root


@pytest.mark.slow
def test_clip_local_loss_two_ranks_equal_one_rank(clip_data, tmp_path):
    def args(save_dir, *extra):
        return train_args(clip_data, save_dir, *SGD_ONE_UPDATE, "--label-smoothing", "0.1", *extra)

    one_argv, two_argv = args(tmp_path / "one"), args(tmp_path / "two", "--local-loss")
    (loss, _, after), two = one_and_two_ranks(one_argv, two_argv, 4, tmp_path)
    assert two["losses"] == pytest.approx([loss], abs=2e-4)  # the logging output rounds to 4 digits
    assert_same_weights(after, two["state"], atol=2e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def k2_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eq_k2")
    generate_world(str(root), seed=4, num_train=48, num_val=4, num_test=4, num_videos=0, workers=1)
    build_vocab.main(
        ["--data", "train/grit/part-*.tsv", "--root", str(root), "--out", str(root / "vocab"), "--vocab-size", "200"]
    )
    return root


@pytest.mark.slow
def test_kosmos2_two_ranks_equal_one_rank(k2_world, tmp_path):
    def args(save_dir):
        # grounded captions on every sample with boxes: rows differ in length, so the ranks' token counts differ
        return k2_args(k2_world, save_dir, *SGD_ONE_UPDATE, "--use-object-bbox-prob", "1.0", "--lr", "2.0")

    (loss, start, final), two = one_and_two_ranks(args(tmp_path / "one"), args(tmp_path / "two"), 4, tmp_path)
    assert two["losses"] == pytest.approx([loss], abs=2e-3)  # bits/token, rounded to 3 digits
    assert_same_weights(final, two["state"], atol=1e-6, rtol=1e-4)
    assert start.keys() == final.keys()
    moved = {k: (final[k] - start[k]).abs().max().item() for k in final if final[k].is_floating_point()}
    assert all(v == 0 for k, v in moved.items() if k.startswith("net.vision.")), "the frozen tower moved"
    trained = [v for k, v in moved.items() if not k.startswith("net.vision.")]
    assert max(trained) > 1e-3  # the update is three orders of magnitude above the comparison tolerance
    assert sum(v > 0 for v in trained) > 0.9 * len(trained)
