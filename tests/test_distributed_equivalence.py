"""One update on 2 CPU ranks (gloo, torchrun) x batch B equals one update on 1 rank x batch 2B, through the real
fairseq trainer (issue 7, deliverable 1).

fairseq sums the per-rank gradients (legacy DDP averages them, the trainer multiplies back by the world size) and
divides by the sample size summed over ranks. With plain SGD (no momentum, no warm-up, no clipping) the weights
after one update are ``w0 - lr * g``, so equal weights mean equal gradients; the logged loss is compared too.

* CLIP with ``--local-loss``: each rank computes B x 2B logits of its rows against the gathered columns, labels
  offset by ``B * rank``, and the gather carries gradients back to the owner rank. Its 1-rank reference is the
  plain 2B x 2B loss. (The default N x N path is covered by ``test_train_e2e.py``; the clip-rocket heads keep
  per-rank BatchNorm statistics on gloo, so they are not rank-invariant on CPU by construction.)
* Kosmos-2 (``kosmos2_tiny`` on GRIT TSV shards): ``sample_size`` is the caption-token count of each rank, so the
  2-rank update is the token mean over the whole 2B batch even though the ranks hold different token counts. The
  initial weights are rebuilt in-process with fairseq's seed to check that the update is far larger than the
  tolerance and that the frozen image tower did not move.

Data are split every other sample (``--split-by sample --no-shuffle``), so the 2 ranks together see exactly the
2B samples of the 1-rank batch; augmentations are seeded per sample, not per rank.
"""

import functools
import re
from unittest import mock

import pytest
import torch
from test_kosmos2_train import k2_args
from test_train_e2e import model_state, run, train_args

from unilm_vl.data import build_vocab
from unilm_vl.data.synthetic import generate_world

from conftest import BIN, write_wds

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
]


def one_and_two_ranks(base_args, one_dir, two_dir, batch, port):
    """Train one update on 1 rank with 2 x ``batch`` and on 2 torchrun ranks with ``batch``; return both logs."""
    one = run([f"{BIN}/fairseq-train", *base_args(one_dir), "--batch-size", str(2 * batch)])
    two = run(
        [
            f"{BIN}/torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "unilm_vl.train",
            *base_args(two_dir),
            "--batch-size",
            str(batch),
        ]
    )
    assert "distributed init (rank 1)" in two
    return one, two


def logged(name, log):
    values = re.findall(rf"\| INFO \| train_inner \| .*?\b{name}=([0-9.]+)", log)
    assert len(values) == 1, f"expected one train_inner line with {name}=, got {values}"
    return float(values[0])


def assert_same_weights(one_ckpt, two_ckpt, atol, rtol):
    a, b = model_state(one_ckpt), model_state(two_ckpt)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=rtol, msg=key)
    return a


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eq_clip")
    write_wds(str(root / "train" / "part"), 24, 8)
    return root


@pytest.mark.slow
def test_clip_local_loss_two_ranks_equal_one_rank(clip_data, tmp_path):
    def args(save_dir, local_loss):
        return train_args(
            clip_data, save_dir, *SGD_ONE_UPDATE, "--label-smoothing", "0.1", *(["--local-loss"] if local_loss else [])
        )

    one = run([f"{BIN}/fairseq-train", *args(tmp_path / "one", False), "--batch-size", "8"])
    two = run(
        [
            f"{BIN}/torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29547",
            "-m",
            "unilm_vl.train",
            *args(tmp_path / "two", True),
            "--batch-size",
            "4",
        ]
    )
    assert "distributed init (rank 1)" in two
    assert logged("clip_loss", two) == pytest.approx(logged("clip_loss", one), abs=2e-4)  # log rounds to 4 digits
    assert_same_weights(
        tmp_path / "one" / "checkpoint_last.pt", tmp_path / "two" / "checkpoint_last.pt", atol=2e-6, rtol=1e-4
    )


@pytest.fixture(scope="module")
def k2_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eq_k2")
    generate_world(str(root), seed=4, num_train=48, num_val=4, num_test=4, num_videos=0, workers=1)
    build_vocab.main(
        ["--data", "train/grit/part-*.tsv", "--root", str(root), "--out", str(root / "vocab"), "--vocab-size", "200"]
    )
    return root


def initial_kosmos2_weights(ckpt_path):
    """The weights fairseq built before the update: the saved config, the same seed, the same build order."""
    from fairseq import checkpoint_utils, tasks, utils

    trusted_load = functools.partial(torch.load, weights_only=False)  # our own checkpoint holds a Namespace
    with mock.patch.object(torch, "load", trusted_load):
        cfg = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt_path))["cfg"]
    task = tasks.setup_task(cfg.task)
    utils.set_torch_seed(cfg.common.seed)
    return task.build_model(cfg.model).state_dict()


@pytest.mark.slow
def test_kosmos2_two_ranks_equal_one_rank(k2_world, tmp_path):
    def args(save_dir):
        # grounded captions on every sample with boxes: rows differ in length, so the ranks' token counts differ
        return k2_args(k2_world, save_dir, *SGD_ONE_UPDATE, "--use-object-bbox-prob", "1.0", "--lr", "2.0")

    one, two = one_and_two_ranks(args, tmp_path / "one", tmp_path / "two", batch=4, port=29549)
    assert logged("loss", two) == pytest.approx(logged("loss", one), abs=2e-3)  # bits/token, logged to 3 digits
    final = assert_same_weights(
        tmp_path / "one" / "checkpoint_last.pt", tmp_path / "two" / "checkpoint_last.pt", atol=1e-6, rtol=1e-4
    )
    start = initial_kosmos2_weights(tmp_path / "one" / "checkpoint_last.pt")
    assert start.keys() == final.keys()
    moved = {k: (final[k] - start[k]).abs().max().item() for k in final if final[k].is_floating_point()}
    assert all(v == 0 for k, v in moved.items() if k.startswith("net.vision.")), "the frozen tower moved"
    trained = [v for k, v in moved.items() if not k.startswith("net.vision.")]
    assert max(trained) > 1e-3  # the update is three orders of magnitude above the comparison tolerance
    assert sum(v > 0 for v in trained) > 0.9 * len(trained)
