"""The clip-rocket family end to end through the real fairseq trainer: every criterion trains with its arch on
multi-view batches, and a BYOLIP run stopped and resumed continues its EMA momentum copy exactly."""

import math

import pytest
import torch
from test_train_e2e import model_state, run, train_args

from conftest import BIN, write_wds
from trainer_harness import build_trainer, parameters, train_updates

RECIPES = [
    ("clip_rocket", "clip_rocket_tiny", "local_loss"),
    ("siamlip", "clip_rocket_siamlip_tiny", "siamlip_loss"),
    ("byolip", "clip_rocket_byolip_tiny", "siamlip_loss"),
    ("barlip", "clip_rocket_barlip_tiny", "barlip_loss"),
    ("swalip", "clip_rocket_swalip_tiny", "swalip_loss"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rocket")
    write_wds(str(root / "train" / "part"), 48, 12)
    return root


def rocket_args(data, save_dir, criterion, arch, *extra):
    args = train_args(
        data,
        save_dir,
        "--num-augs",
        "2",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--num-workers",
        "1",
        *extra,
    )
    args[args.index("--arch") + 1] = arch
    args[args.index("--criterion") + 1] = criterion
    return args


@pytest.mark.parametrize("criterion,arch,term", RECIPES)
def test_each_criterion_trains(data, tmp_path, criterion, arch, term):
    """fairseq's trainer in the test process (tests/trainer_harness.py): the fairseq-train CLI of this family runs in
    test_byolip_resume_continues_the_momentum_copy_exactly."""
    # no loader worker processes forked from the test process (the CLI run below uses one)
    args = rocket_args(data, tmp_path, criterion, arch, "--max-update", "2", "--num-workers", "0")
    trainer, itr = build_trainer(args[2:])  # build_trainer adds the --user-dir pair
    outputs = train_updates(trainer, itr, 2)
    assert trainer.get_num_updates() == 2
    value = outputs[-1][term]  # the term as fairseq logs it (the criterion's reduce_metrics)
    assert math.isfinite(value) and value > 0
    has_momentum = any(k.startswith("net.momentum_net.") for k in parameters(trainer))
    assert has_momentum == (criterion == "byolip")


def test_wrong_arch_for_criterion_names_the_fix(data, tmp_path):
    with pytest.raises(Exception, match="ssl-head siamlip"):
        trainer, itr = build_trainer(
            rocket_args(data, tmp_path, "siamlip", "clip_rocket_tiny", "--max-update", "1", "--num-workers", "0")[2:]
        )
        train_updates(trainer, itr, 1)


def test_byolip_resume_continues_the_momentum_copy_exactly(data, tmp_path):
    common = ["--save-interval-updates", "2", "--momentum-tau", "0.9"]
    args = lambda d, n: rocket_args(
        data, tmp_path / d, "byolip", "clip_rocket_byolip_tiny", *common, "--max-update", str(n)
    )
    run([f"{BIN}/fairseq-train", *args("a", 5)])
    run([f"{BIN}/fairseq-train", *args("b", 2)])
    out = run([f"{BIN}/fairseq-train", *args("b", 5)])
    assert "Loaded checkpoint" in out
    a = model_state(tmp_path / "a" / "checkpoint_last.pt")
    b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    momentum = [k for k in a if k.startswith("net.momentum_net.")]
    assert momentum and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    # the copy moved away from its initial value (= the online model's initial value) towards the online model
    key = "net.momentum_net.image_projector.weight"
    assert not torch.equal(a[key], a["net.image_projector.weight"])
