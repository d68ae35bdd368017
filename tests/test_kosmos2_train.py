"""Kosmos-2 end to end through the real fairseq trainer on a small synthetic world: a vocabulary built with
build_vocab, grounded GRIT TSV shards, training, checkpoint save and exact resume."""

import re

import pytest
import torch
from test_train_e2e import model_state, run

from unilm_vl.data import build_vocab
from unilm_vl.data.synthetic import generate_world

from conftest import BIN, REPO
from trainer_harness import build_trainer, parameters, train_updates


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("k2world")
    generate_world(str(root), seed=2, num_train=120, num_val=16, num_test=8, num_videos=0, workers=1)
    build_vocab.main(
        ["--data", "train/grit/part-*.tsv", "--root", str(root), "--out", str(root / "vocab"), "--vocab-size", "300"]
    )
    return root


def k2_args(world, save_dir, *extra):
    return [
        "--user-dir",
        f"{REPO}/unilm_vl",
        str(world),
        "--task",
        "kosmos2",
        "--train-data",
        "train/grit/part-*.tsv",
        "--valid-data",
        "val/grit/part-*.tsv",
        "--spm-model",
        str(world / "vocab" / "sentencepiece.bpe.model"),
        "--dict-path",
        str(world / "vocab" / "dict.txt"),
        "--location-bin-size",
        "16",
        "--image-token-length",
        "16",
        "--arch",
        "kosmos2_tiny",
        "--criterion",
        "kosmos2_lm",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--num-workers",
        "1",
        "--cpu",
        "--seed",
        "5",
        "--save-dir",
        str(save_dir),
        "--log-format",
        "simple",
        "--log-interval",
        "1",
        "--no-epoch-checkpoints",
        *extra,
    ]


def test_train_validate_and_resume_exactly(world, tmp_path):
    common = ["--save-interval-updates", "3", "--validate-interval-updates", "3", "--disable-validation"]
    run([f"{BIN}/fairseq-train", *k2_args(world, tmp_path / "a", *common, "--max-update", "6")])
    out = run([f"{BIN}/fairseq-train", *k2_args(world, tmp_path / "b", *common, "--max-update", "3")])
    losses = [float(x) for x in re.findall(r"\| INFO \| train_inner \| .* loss=([0-9.]+)", out)]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert re.search(r"grit_loss=[0-9.]+", out)  # the per-source loss
    out = run([f"{BIN}/fairseq-train", *k2_args(world, tmp_path / "b", *common, "--max-update", "6")])
    assert "Loaded checkpoint" in out
    a = model_state(tmp_path / "a" / "checkpoint_last.pt")
    b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    assert a.keys() == b.keys() and any(k.startswith("net.connector.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_validation_reports_caption_token_loss(world, tmp_path):
    out = run(
        [
            f"{BIN}/fairseq-train",
            *k2_args(
                world, tmp_path, "--max-update", "2", "--batch-size-valid", "8", "--validate-interval-updates", "2"
            ),
        ]
    )
    valid = re.search(r"\| valid on 'valid' subset \| loss ([0-9.]+) \| grit_loss ([0-9.]+)", out)
    assert valid and float(valid.group(1)) == pytest.approx(float(valid.group(2)), abs=1e-3)
    total, trained = map(
        int,
        re.search(r"num. shared model params: ([0-9,]+) \(num. trained: ([0-9,]+)\)", out.replace(",", "")).groups(),
    )
    vision = sum(
        v.numel() for k, v in model_state(tmp_path / "checkpoint_last.pt").items() if k.startswith("net.vision.")
    )
    assert trained == total - vision  # the image tower is frozen by default


def test_train_vision_really_trains_the_tower(world, tmp_path):
    """fairseq's trainer in the test process (tests/trainer_harness.py; the CLI runs above): with --train-vision every
    parameter is trained (fairseq-train's "num. trained" count equals the total) and one update moves the tower."""
    args = k2_args(world, tmp_path, "--max-update", "1", "--disable-validation", "--train-vision", "--num-workers", "0")
    trainer, itr = build_trainer(args[2:])  # build_trainer adds the --user-dir pair
    model = trainer.get_model()
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # as fairseq_cli.train counts them
    assert trained == total
    before = {k: v.clone() for k, v in parameters(trainer).items() if k.startswith("net.vision.")}
    train_updates(trainer, itr, 1)
    after = parameters(trainer)
    assert before and any(not torch.equal(after[k], v) for k, v in before.items())
