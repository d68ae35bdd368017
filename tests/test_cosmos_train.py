"""COSMOS end to end through the real fairseq trainer: cosmos_tiny trains on multi-crop batches with text crops of
the json long caption, the checkpoint carries the EMA teacher and serves the retrieval evaluation, and a run
stopped and resumed continues the teacher exactly."""

import math
import re

import pytest
import torch
from test_train_e2e import model_state, run, train_args

from unilm_vl.data.formats import WdsShardWriter

from conftest import BIN, COLOURS, jpeg_bytes


def write_long_caption_wds(prefix, n, per_shard):
    """n samples whose json carries a 3-sentence ``long_caption`` (as the synthetic world's does)."""
    names = list(COLOURS)
    with WdsShardWriter(prefix, samples_per_shard=per_shard) as writer:
        for i in range(n):
            colour = names[i % len(names)]
            long_caption = (
                f"There is one {colour} picture. The {colour} colour fills the frame. "
                f"Nothing else is in the {colour} picture."
            )
            writer.write(
                f"{i:06d}",
                jpeg_bytes(COLOURS[colour]),
                "jpg",
                f"a {colour} picture",
                {"key": f"{i:06d}", "long_caption": long_caption},
            )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cosmos")
    write_long_caption_wds(str(root / "train" / "part"), 32, 16)
    return root


def cosmos_args(data, save_dir, *extra):
    args = train_args(
        data,
        save_dir,
        "--use-imagecrop-aug",
        "--local-crops-number",
        "2",
        "--local-crop-size",
        "32",
        "--crop-scale",
        "0.4",
        "--caption-sampling-mode",
        "textcrop",
        "--num-sampled-captions",
        "4",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        *extra,
    )
    args[args.index("--arch") + 1] = "cosmos_tiny"
    args[args.index("--criterion") + 1] = "cosmos"
    return args


RESUME = ["--save-interval-updates", "2", "--momentum-teacher", "0.9"]


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    """``(save dir, log)`` of one 5-update fairseq-train run: checked by the training/evaluation test and the
    reference of the resume test."""
    save_dir = tmp_path_factory.mktemp("cosmos_a")
    return save_dir, run([f"{BIN}/fairseq-train", *cosmos_args(data, save_dir, *RESUME, "--max-update", "5")])


def test_cosmos_tiny_trains_and_its_checkpoint_evaluates(unbroken):
    save_dir, out = unbroken
    assert "num_updates=5" in out
    for term in ("distill_loss", "clip_loss"):
        value = float(re.findall(rf"{term}=([-0-9.e]+)", out)[-1])
        assert math.isfinite(value) and value > 0
    state = model_state(save_dir / "checkpoint_last.pt")
    teacher = {k for k in state if k.startswith("net.teacher.")}
    student = {k for k in state if k.startswith("net.student.")}
    assert teacher and {k.replace("teacher", "student", 1) for k in teacher} == student
    key = "net.{}.clip.visual.conv1.weight"
    assert not torch.equal(state[key.format("teacher")], state[key.format("student")])

    from unilm_vl.eval.common import load_encoder

    encoder = load_encoder(str(save_dir / "checkpoint_last.pt"))
    from PIL import Image

    images = torch.stack([encoder.image_transform(Image.new("RGB", (40, 32), c)) for c in COLOURS.values()])
    img, txt = encoder.encode_images(images), encoder.encode_texts([f"a {c} picture" for c in COLOURS])
    assert img.shape == (4, 64) and txt.shape == (4, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    # retrieval encodes with the student, the dense (segmentation) features come from the teacher
    model = encoder.model
    with torch.no_grad():
        torch.testing.assert_close(img, model.net.student.encode_image(images))
        pooled, tokens = model.encode_image_dense(images)
        assert pooled.shape == (4, 64) and tokens.shape == (4, 64, 64)  # 8 x 8 patches, 64-d
        torch.testing.assert_close(tokens, model.net.teacher.encode_image_dense(images)[1])
        assert not torch.allclose(tokens, model.net.student.encode_image_dense(images)[1])


@pytest.mark.slow
def test_resume_continues_the_teacher_exactly(data, unbroken, tmp_path):
    run([f"{BIN}/fairseq-train", *cosmos_args(data, tmp_path / "b", *RESUME, "--max-update", "2")])
    out = run([f"{BIN}/fairseq-train", *cosmos_args(data, tmp_path / "b", *RESUME, "--max-update", "5")])
    assert "Loaded checkpoint" in out
    a = model_state(unbroken[0] / "checkpoint_last.pt")
    b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    assert any(k.startswith("net.teacher.") for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
