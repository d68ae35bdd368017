"""Zero-shot segmentation: confusion matrix / mIoU on hand values, the label post-processing (synonyms, prob and
area thresholds), the sliding-window layout, and the whole runner with a fake dense encoder that reads each pixel's
colour, on a hand-made 2-image VOC dataset where the right answer is known (mIoU 1.0). The run on a real fairseq
checkpoint is in tests/test_eval_compositionality.py (one training run serves both CLIs)."""

import io
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unilm_vl.eval import common, segmentation
from unilm_vl.eval.common import FairseqContrastiveEncoder
from unilm_vl.eval.metrics import confusion_matrix, mean_iou
from unilm_vl.eval.segmentation import evaluate_segmentation, logits_to_labels, window_starts


# ------------------------------------------------------------------------------------------------- the metrics
def test_confusion_matrix_and_mean_iou_hand_values():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 0]])
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    # counted pixels (truth, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is left out
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    np.testing.assert_array_equal(conf, expected)
    scores = mean_iou(conf)
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (2 + 3 - 2) = 2/3; IoU2 = 0 / (1 + 0 - 0) = 0 (present, never
    # predicted: counts); class 3 is absent from truth and prediction: zero union -> nan, excluded from the mean
    iou = scores["per_class_iou"]
    assert iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])
    assert scores["mIoU"] == pytest.approx(1 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["num_valid_classes"] == 3 and scores["num_pixels"] == 5


def test_confusion_matrices_add_up_and_predicted_only_class_counts():
    t1, p1 = np.array([0, 1, 1]), np.array([0, 1, 0])
    t2, p2 = np.array([1, 0]), np.array([2, 0])
    total = confusion_matrix(p1, t1, 3) + confusion_matrix(p2, t2, 3)
    np.testing.assert_array_equal(total, confusion_matrix(np.r_[p1, p2], np.r_[t1, t2], 3))
    # class 2 is predicted once but never true: IoU 0 and it is in the mean
    # IoU0 = 2 / (2 + 3 - 2) = 2/3, IoU1 = 1 / (3 + 1 - 1) = 1/3, IoU2 = 0 / 1
    assert mean_iou(total)["mIoU"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    # accumulated over the dataset, not averaged per image: image 2 alone would give IoU0 = 1
    assert mean_iou(total)["per_class_iou"][0] == pytest.approx(2 / 3)


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match=r"target labels must lie in \[0, 2\)"):
        confusion_matrix(np.zeros(2), np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="pred labels"):
        confusion_matrix(np.array([0, 2]), np.zeros(2), 2)
    with pytest.raises(ValueError, match="no counted pixel"):
        mean_iou(confusion_matrix(np.zeros(2), np.full(2, 255), 2))
    with pytest.raises(ValueError, match="square"):
        mean_iou(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------- protocol pieces
def test_window_starts_follow_mmseg_slide_inference():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(96, 64, 32) == [0, 32]
    assert window_starts(100, 64, 32) == [0, 32, 36]  # ceil(36 / 32) + 1 = 3 windows, the last shifted to end at 100
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(60, 64, 32)


def test_logits_to_labels_synonyms_and_prob_threshold():
    # queries: q0 -> class 0, q1 and q2 -> class 1 (synonyms); class 2 has no query. Scale 1, three pixels:
    #   A: [0, ln 3, 0]  -> softmax [.2, .6, .2]  -> class probs [.2, max(.6, .2) = .6, 0] -> 1 (p .6)
    #   B: [ln 4, 0, 0]  -> [4/6, 1/6, 1/6]      -> 0 (p .667)
    #   D: [0, 0, ln 8]  -> [.1, .1, .8]         -> 1 (p .8)
    logits = torch.tensor([[0.0, math.log(4), 0.0], [math.log(3), 0.0, 0.0], [0.0, 0.0, math.log(8)]])[:, None, :]
    labels = logits_to_labels(logits, [0, 1, 1], num_classes=3, logit_scale=1.0)
    assert labels.tolist() == [[1, 0, 1]]
    # prob_thd .65: A (.6) falls back to background, D (.8) stays
    assert logits_to_labels(logits, [0, 1, 1], 3, logit_scale=1.0, prob_thd=0.65).tolist() == [[0, 0, 1]]
    # a larger scale sharpens: A becomes [~0, ~1, ~0] and passes the threshold
    assert logits_to_labels(logits, [0, 1, 1], 3, logit_scale=20.0, prob_thd=0.65).tolist() == [[1, 0, 1]]


def test_logits_to_labels_area_threshold():
    # classes 0, 1, 2 one query each; 5 pixels: four won by class 1, one (probs .3, .2, .5) won by class 2.
    probs = torch.tensor([[0.1, 0.8, 0.1]] * 4 + [[0.3, 0.2, 0.5]]).T[:, None, :]  # 3 x 1 x 5
    logits = probs.log()  # softmax at scale 1 gives back probs
    assert logits_to_labels(logits, [0, 1, 2], 3, logit_scale=1.0).tolist() == [[1, 1, 1, 1, 2]]
    # class 2 covers 1 of 5 foreground pixels: 1 <= .2 * 5 -> suppressed, its pixel goes to argmax(.3, .2, 0) = 0
    assert logits_to_labels(logits, [0, 1, 2], 3, logit_scale=1.0, area_thd=0.2).tolist() == [[1, 1, 1, 1, 0]]
    assert logits_to_labels(logits, [0, 1, 2], 3, logit_scale=1.0, area_thd=0.19).tolist() == [[1, 1, 1, 1, 2]]


# ------------------------------------------------------------------------------------ fake dense encoder
NAMES = ["background", "red", "green", "blue"]


class PixelColourEncoder:
    """A fake dense encoder with 1-pixel patches on an 8 x 8 window: patch feature = [1 - max(r, g, b), r, g, b];
    a text is the indicator of the words background / red / green / blue it contains. Each pixel's best query is
    its colour (black = background), so a correct pipeline scores mIoU 1.0."""

    image_size = 8
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)
    logit_scale = 100.0

    def __init__(self):
        self.windows = 0

    def encode_texts(self, texts):
        words = [set(re.findall(r"[a-z]+", t.lower())) for t in texts]
        vecs = torch.tensor([[float(n in w or (n == "red" and "crimson" in w)) for n in NAMES] for w in words])
        return F.normalize(vecs, dim=-1)  # B x 4

    def encode_image_dense(self, images):
        assert images.shape[1:] == (3, 8, 8)
        self.windows += images.shape[0]
        rgb = images.permute(0, 2, 3, 1).reshape(images.shape[0], 64, 3)  # B x P x 3, row-major patches
        return torch.cat([1.0 - rgb.max(-1, keepdim=True).values, rgb], dim=-1)  # B x P x 4


PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]


def write_voc(root):
    """Two images, 8 x 12 (landscape) and 12 x 8 (portrait), black with a red and a green block; class 3 (blue)
    appears nowhere. Some white pixels are labelled 255 (ignore); a pipeline that counted them would lose IoU."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    layouts = {"a": (8, 12), "b": (12, 8)}
    for name, (h, w) in layouts.items():
        labels = np.zeros((h, w), dtype=np.uint8)
        labels[1:4, 1:5] = 1
        labels[h - 4 : h - 1, w - 3 : w] = 2
        rgb = np.zeros((h, w, 3), dtype=np.uint8)
        rgb[labels == 1] = (255, 0, 0)
        rgb[labels == 2] = (0, 255, 0)
        rgb[0, w - 1] = rgb[h - 1, 0] = (255, 255, 255)
        labels[0, w - 1] = labels[h - 1, 0] = 255
        # lossless bytes under the VOC .jpg name: images are decoded by content, and JPEG would blur the edges
        buf = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
        (root / "JPEGImages" / f"{name}.jpg").write_bytes(buf.getvalue())
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(PALETTE + [0] * (768 - len(PALETTE)))
        mask.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    (root / "classnames.txt").write_text("background\nred, crimson\ngreen\nblue\n")
    (root / "templates.txt").write_text("a {} region\nsomething {}\n")
    return root


def test_oracle_encoder_scores_miou_one(tmp_path):
    root = write_voc(tmp_path / "voc")
    encoder = PixelColourEncoder()
    m = evaluate_segmentation(encoder, str(root), templates=str(root / "templates.txt"), short_side=8, stride=4)
    assert m["mIoU"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["foreground_mIoU"] == 1.0
    # red and its synonym crimson both query class 1; blue is in no image and never predicted: undefined IoU
    assert m["per_class_iou"] == {"background": 1.0, "red, crimson": 1.0, "green": 1.0, "blue": None}
    assert m["num_valid_classes"] == 3 and m["num_images"] == 2
    assert m["num_pixels"] == 2 * (8 * 12 - 2)  # the 255 pixels are not counted
    assert encoder.windows == 2 * 2  # one axis of 12 with window 8 and stride 4: offsets 0 and 4


def test_threshold_background_and_wrong_answers_are_scored(tmp_path):
    root = write_voc(tmp_path / "voc")
    # background not queried: black pixels score 0 with all 4 colour queries (red, crimson, green, blue), the
    # softmax is flat (1/4 < .4) -> 0; a red pixel splits ~1/2 + ~1/2 between red and crimson: class 1 at ~.5.
    # area_thd off: the area test runs before prob_thd (as in the reference), where the black pixels still count
    # for a colour class and would dwarf the green block (9 of 96 pixels <= .1 * 96).
    m = evaluate_segmentation(
        PixelColourEncoder(),
        str(root),
        templates=["{}"],
        background="threshold",
        short_side=8,
        stride=4,
        prob_thd=0.4,
        area_thd=0.0,
    )
    assert m["mIoU"] == 1.0
    # without the threshold, black pixels go to a colour class: background is never predicted
    m = evaluate_segmentation(
        PixelColourEncoder(),
        str(root),
        templates=["{}"],
        background="threshold",
        short_side=8,
        stride=4,
        prob_thd=0.0,
        area_thd=0.0,
    )
    assert m["per_class_iou"]["background"] == 0.0 and m["mIoU"] < 1.0
    # foreground_mIoU leaves class 0 out: mean over red and green; m["mIoU"] = (0 + red + green) / 3
    iou = m["per_class_iou"]
    assert m["foreground_mIoU"] == pytest.approx((iou["red, crimson"] + iou["green"]) / 2)
    assert m["mIoU"] == pytest.approx((iou["red, crimson"] + iou["green"]) / 3)


def test_ignore_background_scores_object_pixels_only(tmp_path):
    # VOC-20 style: black (label 0) pixels are neither queried nor counted; red / green pixels are classified by the
    # colour queries alone, so the oracle is perfect and background has no IoU
    root = write_voc(tmp_path / "voc")
    m = evaluate_segmentation(
        PixelColourEncoder(),
        str(root),
        templates=["{}"],
        background="ignore",
        short_side=8,
        stride=4,
        prob_thd=0.0,
        area_thd=0.0,
    )
    assert m["mIoU"] == 1.0 and m["foreground_mIoU"] == 1.0 and m["pixel_accuracy"] == 1.0
    assert m["per_class_iou"] == {"background": None, "red, crimson": 1.0, "green": 1.0, "blue": None}
    assert m["num_valid_classes"] == 2
    assert m["num_pixels"] == 2 * (3 * 4 + 3 * 3)  # the red and green blocks of both images only
    # a threshold that sends every (two-way split, ~.5) red pixel to 0 makes them misses: red IoU 0
    m = evaluate_segmentation(
        PixelColourEncoder(),
        str(root),
        templates=["{}"],
        background="ignore",
        short_side=8,
        stride=4,
        prob_thd=0.6,
        area_thd=0.0,
    )
    assert m["per_class_iou"]["red, crimson"] == 0.0 and m["per_class_iou"]["background"] is None
    assert m["mIoU"] == pytest.approx(0.5)  # (red 0 + green 1) / 2


def test_resize_and_default_templates_keep_a_clean_answer(tmp_path):
    # short side 16: images are upsampled x2, windows see half the picture, logits go back to the mask size.
    # Interpolation blurs block edges, so only the interiors are guaranteed; mIoU stays high, not exactly 1.
    root = write_voc(tmp_path / "voc")
    m = evaluate_segmentation(PixelColourEncoder(), str(root), short_side=16)
    assert m["settings"]["num_templates"] == 80 and m["settings"]["stride"] == 4
    assert m["mIoU"] > 0.8


def test_cli_and_errors(tmp_path, monkeypatch):
    root = write_voc(tmp_path / "voc")
    monkeypatch.setattr(common, "load_encoder", lambda checkpoint, device="cpu", head="clip": PixelColourEncoder())
    out = tmp_path / "seg.json"
    segmentation.main(
        [
            "--checkpoint",
            "unused.pt",
            "--data",
            str(root),
            "--templates",
            str(root / "templates.txt"),
            "--short-side",
            "8",
            "--stride",
            "4",
            "--output",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["mIoU"] == 1.0 and report["per_class_iou"]["blue"] is None
    (root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        evaluate_segmentation(PixelColourEncoder(), str(root))


def test_model_without_dense_output_is_a_clear_error():
    class Task:
        image_size, image_mean, image_std = 8, (0.0,) * 3, (1.0,) * 3

        def image_transform(self, train):
            return None

    class GlobalOnly(torch.nn.Module):
        def logit_scale_value(self):
            return 1.0

        def encode_image(self, image):
            return image.flatten(1)

        def encode_text(self, text):
            return text

    encoder = FairseqContrastiveEncoder(GlobalOnly(), Task())
    assert encoder.image_size == 8
    with pytest.raises(TypeError, match="GlobalOnly has no dense image output"):
        encoder.encode_image_dense(torch.zeros(1, 3, 8, 8))
