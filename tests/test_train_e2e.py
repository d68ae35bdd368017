"""End to end through the real fairseq trainer: train, save, resume exactly; 2 CPU ranks equal 1 rank."""

import os
import re
import subprocess

import pytest
import torch

from conftest import BIN, REPO, write_wds


def run(cmd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def train_args(data, save_dir, *extra):
    return [
        "--user-dir",
        os.path.join(REPO, "unilm_vl"),
        "--task",
        "image_text_contrastive",
        str(data),
        "--train-data",
        "train/part-*.tar",
        "--valid-data",
        "train/part-00000.tar",
        "--arch",
        "clip_tiny",
        "--criterion",
        "clip",
        "--cpu",
        "--seed",
        "3",
        "--save-dir",
        str(save_dir),
        "--log-format",
        "simple",
        "--log-interval",
        "1",
        "--no-epoch-checkpoints",
        "--disable-validation",
        *extra,
    ]


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_wds(str(root / "train" / "part"), 56, 14)  # 4 shards
    return root


def test_resume_after_interruption_matches_unbroken_run(data, tmp_path):
    common = [
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--num-workers",
        "2",
        "--save-interval-updates",
        "2",
    ]
    # 56 samples / 8 = 7 batches per epoch: the checkpoint at update 4 is mid-epoch, 9 crosses into epoch 2. The
    # interrupted run is the unbroken run's checkpoint at update 4 (what a kill after that save leaves), resumed
    import shutil

    run([f"{BIN}/fairseq-train", *train_args(data, tmp_path / "a", *common, "--max-update", "9")])
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "checkpoint_1_4.pt", tmp_path / "b" / "checkpoint_last.pt")
    out = run([f"{BIN}/fairseq-train", *train_args(data, tmp_path / "b", *common, "--max-update", "9")])
    assert "Loaded checkpoint" in out and "(epoch 1 @ 4 updates)" in out
    a = model_state(tmp_path / "a" / "checkpoint_last.pt")
    b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_two_cpu_ranks_equal_one_rank_with_twice_the_batch(data, tmp_path):
    common = [
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
    ]
    one = run([f"{BIN}/fairseq-train", *train_args(data, tmp_path / "one", *common, "--batch-size", "8")])
    two = run(
        [
            f"{BIN}/torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            "-m",
            "unilm_vl.train",
            *train_args(data, tmp_path / "two", *common, "--batch-size", "4"),
        ]
    )
    assert "distributed init (rank 1)" in two
    loss_one = re.search(r"clip_loss=([0-9.]+)", one).group(1)
    loss_two = re.search(r"clip_loss=([0-9.]+)", two).group(1)
    assert float(loss_two) == pytest.approx(float(loss_one), abs=1e-4)
    a = model_state(tmp_path / "one" / "checkpoint_last.pt")
    b = model_state(tmp_path / "two" / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    for key in a:  # after one SGD step the parameters agree: same loss, same gradients
        torch.testing.assert_close(b[key], a[key], atol=2e-6, rtol=1e-4, msg=key)


def test_fully_sharded_on_cpu_stops_with_a_clear_message():
    from unilm_vl.train import check_cpu_backend, with_torchrun_cpu

    for argv in (
        ["train", "--cpu", "--ddp-backend", "fully_sharded"],
        ["train", "--ddp-backend=fully_sharded", "--cpu"],
    ):
        with pytest.raises(ValueError, match="fully_sharded .*needs CUDA GPUs"):
            check_cpu_backend(argv)
    check_cpu_backend(["train", "--cpu", "--ddp-backend", "legacy_ddp"])  # fine
    check_cpu_backend(["train", "--ddp-backend", "fully_sharded"])  # GPUs: fairscale's business
    # the torchrun-on-CPU flags: added when missing, an explicit choice wins
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    out = with_torchrun_cpu(["train", "--cpu"], env)
    assert out[out.index("--ddp-backend") + 1] == "legacy_ddp" and out[out.index("--distributed-rank") + 1] == "1"
    assert "--distributed-no-spawn" in out and out[out.index("--distributed-backend") + 1] == "gloo"
    out = with_torchrun_cpu(["train", "--cpu", "--ddp-backend", "pytorch_ddp"], env)
    assert out.count("--ddp-backend") == 1 and out[out.index("--ddp-backend") + 1] == "pytorch_ddp"
    assert with_torchrun_cpu(["train", "--cpu"], {"RANK": "0", "WORLD_SIZE": "1"}) == ["train", "--cpu"]
