"""COSA end to end through the real fairseq trainer: ``cosa_tiny`` pretrains with ``--task cosa_pretrain`` on tiny
image shards with the released task string ``ret_cret_ccap_cmlm`` (concatenation K = 4), logs the six terms, and
a run stopped and resumed from its checkpoint ends with exactly the weights of an unbroken run (the partner draws,
maskers and ITM negatives are seeded from seed + update number)."""

import math
import re

import pytest
import torch
from test_train_e2e import model_state, run

from conftest import BIN, REPO, write_wds

TERMS = [
    "itc_loss_origin",
    "itm_loss_origin",
    "itc_loss_concatenated",
    "itm_loss_concatenated",
    "caption_loss_concatenated",
    "mlm_loss_concatenated",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from unilm_vl.data.cosa_vocab import build_wordpiece_vocab, write_vocab

    root = tmp_path_factory.mktemp("cosa_train")
    write_wds(str(root / "train" / "part"), 36, 12)
    colours = ("red", "green", "blue", "yellow")
    write_vocab(build_wordpiece_vocab([f"a {c} picture" for c in colours]), str(root / "vocab.txt"))
    return root


def cosa_args(data, save_dir, *extra):
    return [
        "--user-dir",
        f"{REPO}/unilm_vl",
        "--task",
        "cosa_pretrain",
        str(data),
        "--train-data",
        "train/part-*.tar",
        "--valid-data",
        "train/part-00000.tar",
        "--vocab-file",
        str(data / "vocab.txt"),
        "--max-text-tokens",
        "8",
        "--arch",
        "cosa_tiny",
        "--criterion",
        "cosa",
        "--cosa-tasks",
        "ret_cret_ccap_cmlm",
        "--optimizer",
        "adam",
        "--lr",
        "1e-4",
        "--batch-size",
        "6",
        "--num-workers",
        "1",
        "--cpu",
        "--seed",
        "7",
        "--save-dir",
        str(save_dir),
        "--log-format",
        "simple",
        "--log-interval",
        "1",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--save-interval-updates",
        "2",
        *extra,
    ]


@pytest.mark.slow
def test_pretraining_runs_and_resumes_exactly(data, tmp_path):
    out = run([f"{BIN}/fairseq-train", *cosa_args(data, tmp_path / "a", "--max-update", "4")])
    assert "num_updates=4" in out
    for term in TERMS:
        values = [float(v) for v in re.findall(rf"\b{term}=([-0-9.e]+)", out)]
        assert values and all(math.isfinite(v) and v > 0 for v in values), term
    line = next(line for line in out.splitlines() if "train_inner" in line and "num_updates=1," in line)
    total = float(re.search(r"\bloss=([-0-9.e]+)", line).group(1))
    terms = [float(re.search(rf"\b{t}=([-0-9.e]+)", line).group(1)) for t in TERMS]
    assert total == pytest.approx(sum(terms), abs=5e-3)  # the logged total is the sum of the logged terms
    run([f"{BIN}/fairseq-train", *cosa_args(data, tmp_path / "b", "--max-update", "2")])
    out = run([f"{BIN}/fairseq-train", *cosa_args(data, tmp_path / "b", "--max-update", "4")])
    assert "Loaded checkpoint" in out and "@ 2 updates" in out
    a = model_state(tmp_path / "a" / "checkpoint_last.pt")
    b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    assert a.keys() == b.keys() and "net.video_frame_embedding" in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
