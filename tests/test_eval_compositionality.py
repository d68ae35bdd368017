"""Compositionality benchmark (SugarCrepe / ARO formats): the pure metric on hand values, the runner with a fake
colour encoder whose scores are known (so the expected accuracies are worked out by hand), and both evaluation CLIs
(compositionality and segmentation) on a 1-update clip_tiny fairseq checkpoint of a tiny synthetic world."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train_e2e import run, train_args

from unilm_vl.eval import common, compositionality
from unilm_vl.eval.compositionality import evaluate_compositionality, load_compositional_set
from unilm_vl.eval.metrics import compositional_accuracy, compositional_correct

from conftest import BIN

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# ---------------------------------------------------------------------------------------------------- the metric
def test_compositional_accuracy_hand_values():
    pos = [0.5, 0.3, 0.2, 0.9]
    neg = [
        [0.4, 0.1],  # 0.5 > 0.4: correct
        [0.3, 0.0],  # tie 0.3 = 0.3: wrong (strict)
        [0.25, float("-inf")],  # 0.2 < 0.25 (second slot is padding): wrong
        [0.1, 0.2],
    ]  # 0.9 > 0.2: correct
    assert compositional_correct(pos, neg).tolist() == [True, False, False, True]
    assert compositional_accuracy(pos, neg) == 50.0
    assert compositional_accuracy([0.2, 0.1], [0.1, 0.3]) == 50.0  # 1-D negatives: one per item
    assert compositional_accuracy(torch.tensor([1.0]), torch.tensor([[0.999999]])) == 100.0


def test_compositional_accuracy_bad_inputs():
    with pytest.raises(ValueError, match="N x K"):
        compositional_accuracy([0.1, 0.2], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="at least one negative"):
        compositional_accuracy([0.1], torch.zeros(1, 0))
    with pytest.raises(ValueError, match="NaN"):
        compositional_accuracy([0.1], [[float("nan")]])
    with pytest.raises(ValueError, match="at least one item"):
        compositional_accuracy([], torch.zeros(0, 1))


# ----------------------------------------------------------------------------------------- fake colour encoder
class ColourEncoder:
    """Sees only colours: an image -> its normalised mean RGB; a text -> the normalised indicator of the colour
    words it contains ("a red square" -> [1, 0, 0]). Cosine scores are therefore 1 (same colour) or 0."""

    logit_scale = 100.0

    def image_transform(self, img):  # a fixed 8 x 8 size, as every real evaluation transform has
        img = img.resize((8, 8), Image.NEAREST)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 3 x 8 x 8

    def encode_images(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)  # B x 3

    def encode_texts(self, texts):
        words = [set(t.lower().split()) for t in texts]
        return F.normalize(torch.tensor([[float(c in w) for c in COLOURS] for w in words]), dim=-1)  # B x 3


def write_images(root):
    root.mkdir(parents=True, exist_ok=True)
    for colour, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(root / f"{colour}.png")
    halves = Image.new("RGB", (8, 4), COLOURS["red"])  # left half red, right half green
    halves.paste(Image.new("RGB", (4, 4), COLOURS["green"]), (4, 0))
    halves.save(root / "halves.png")


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def bench(tmp_path):
    """Two SugarCrepe categories, an ARO VG-Relation file (with crop boxes) and an ARO order file."""
    write_images(tmp_path / "images")
    sugar = tmp_path / "sugar"
    # every positive is the only caption of the image's colour: 100%
    write_json(
        sugar / "replace_att.json",
        {
            "0": {"filename": "red.png", "caption": "a red square", "negative_caption": "a green square"},
            "1": {
                "filename": "green.png",
                "caption": "a green circle",
                "negative_caption": ["a red circle", "a blue circle"],
            },
        },
    )
    # item 0: the negative has the image's colour too -> tie 1 = 1 -> wrong; item 1 right: 50%
    write_json(
        sugar / "swap_obj.json",
        {
            "a": {"filename": "blue.png", "caption": "a blue star", "negative_caption": "a star that is blue"},
            "b": {"filename": "red.png", "caption": "red things", "negative_caption": "green things"},
        },
    )
    # crop (x=4, w=4) keeps the green half: right only if the box is applied. Groups by relation_name.
    write_json(
        tmp_path / "aro" / "visual_genome_relation.json",
        [
            {
                "image_path": "halves.png",
                "true_caption": "the green one",
                "false_caption": "the red one",
                "bbox_x": 4,
                "bbox_y": 0,
                "bbox_w": 4,
                "bbox_h": 4,
                "relation_name": "on",
            },
            {
                "image_path": "halves.png",
                "true_caption": "the red one",
                "false_caption": "the green one",
                "bbox_x": 0,
                "bbox_y": 0,
                "bbox_w": 4,
                "bbox_h": 4,
                "relation_name": "on",
            },
            {
                "image_path": "blue.png",
                "true_caption": "it is red",
                "false_caption": "it is blue",
                "bbox_x": 0,
                "bbox_y": 0,
                "bbox_w": 8,
                "bbox_h": 8,
                "relation_name": "under",
            },
        ],
    )
    # first option is the positive
    write_json(
        tmp_path / "aro" / "coco_order.json",
        [
            {"image": "green.png", "caption_options": ["green grass", "grass red", "blue grass", "red green"]},
            {"image_path": "blue.png", "caption_options": ["blue sky", "red sky"]},
        ],
    )
    return tmp_path


def test_sugarcrepe_and_aro_known_accuracies(bench):
    images = str(bench / "images")
    m = evaluate_compositionality(ColourEncoder(), [str(bench / "sugar"), str(bench / "aro")], image_root=images)
    cats = m["categories"]
    assert list(cats) == ["replace_att", "swap_obj", "coco_order", "visual_genome_relation"]
    assert cats["replace_att"]["accuracy"] == 100.0 and cats["replace_att"]["max_negatives"] == 2
    assert cats["swap_obj"]["accuracy"] == 50.0
    # "red green" scores 1/sqrt(2) on the green image < 1: correct; blue sky 1 > red sky 0: correct
    assert cats["coco_order"]["accuracy"] == 100.0 and cats["coco_order"]["max_negatives"] == 3
    assert cats["coco_order"]["format"] == "aro_order"
    vg = cats["visual_genome_relation"]
    assert vg["format"] == "aro_pairs" and vg["num_items"] == 3
    assert vg["accuracy"] == pytest.approx(200 / 3)
    assert vg["group_accuracy"] == {"on": 100.0, "under": 0.0} and vg["group_macro_accuracy"] == 50.0
    assert [cats[c]["num_items"] for c in cats] == [2, 2, 2, 3] and m["num_items"] == 9
    assert m["macro_accuracy"] == pytest.approx((100 + 50 + 100 + 200 / 3) / 4)
    assert m["num_categories"] == 4


def test_image_root_defaults_to_the_json_directory_and_format_is_checked(bench):
    path = write_json(
        bench / "images" / "cat.json", {"0": {"filename": "red.png", "caption": "red", "negative_caption": "blue"}}
    )
    assert evaluate_compositionality(ColourEncoder(), [path])["categories"]["cat"]["accuracy"] == 100.0
    with pytest.raises(ValueError, match="aro_pairs format but --format sugarcrepe"):
        load_compositional_set(str(bench / "aro" / "visual_genome_relation.json"), fmt="sugarcrepe")
    bad = write_json(bench / "bad.json", [{"image": "red.png", "caption": "red"}])
    with pytest.raises(ValueError, match="unrecognised annotation format"):
        load_compositional_set(bad)
    partial = write_json(
        bench / "partial.json", [{"image_path": "red.png", "true_caption": "a", "false_caption": "b", "bbox_x": 0}]
    )
    with pytest.raises(ValueError, match="bbox_w"):
        load_compositional_set(partial)


def test_missing_image_is_an_error_or_a_counted_skip(bench):
    sugar = bench / "sugar"
    data = json.loads((sugar / "replace_att.json").read_text())
    data["2"] = {"filename": "nowhere.png", "caption": "a red square", "negative_caption": "a blue square"}
    write_json(sugar / "replace_att.json", data)
    images = str(bench / "images")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        evaluate_compositionality(ColourEncoder(), [str(sugar)], image_root=images)
    m = evaluate_compositionality(ColourEncoder(), [str(sugar)], image_root=images, skip_missing=True)
    assert m["categories"]["replace_att"]["num_skipped_missing"] == 1
    assert m["categories"]["replace_att"]["num_items"] == 2 and m["categories"]["replace_att"]["accuracy"] == 100.0


def test_cli_writes_the_report(bench, monkeypatch):
    monkeypatch.setattr(common, "load_encoder", lambda checkpoint, device="cpu", head="clip": ColourEncoder())
    out = bench / "metrics.json"
    compositionality.main(
        [
            "--checkpoint",
            "unused.pt",
            "--data",
            str(bench / "sugar"),
            "--image-root",
            str(bench / "images"),
            "--format",
            "sugarcrepe",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert {c: v["accuracy"] for c, v in report["categories"].items()} == {"replace_att": 100.0, "swap_obj": 50.0}
    assert report["macro_accuracy"] == 75.0


# ------------------------------------------------------------------- both CLIs on a real fairseq checkpoint
@pytest.mark.slow
def test_both_clis_on_a_one_update_clip_tiny_checkpoint(tmp_path):
    """1-update clip_tiny fairseq-train run on a tiny synthetic world, then both eval CLIs through load_encoder:
    the reports cover every SugarCrepe category with the json's item counts, and a valid mIoU."""
    from unilm_vl.data.synthetic import SUGARCREPE_CATEGORIES, generate_world
    from unilm_vl.eval import segmentation

    world = tmp_path / "world"
    generate_world(str(world), seed=0, num_train=20, num_val=4, num_test=12, num_videos=0, image_size=64, workers=1)
    save = tmp_path / "ckpt"
    run(
        [
            f"{BIN}/fairseq-train",
            *train_args(
                world,
                save,
                "--train-data",
                "train/wds/part-*.tar",
                "--valid-data",
                "train/wds/part-00000.tar",
                "--max-update",
                "1",
                "--batch-size",
                "4",
                "--optimizer",
                "adam",
                "--lr",
                "1e-4",
                "--num-workers",
                "0",
            ),
        ]
    )
    ckpt = str(save / "checkpoint_last.pt")

    comp_out = tmp_path / "comp.json"
    compositionality.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(world / "eval" / "sugarcrepe"),
            "--image-root",
            str(world / "eval" / "images"),
            "--output",
            str(comp_out),
        ]
    )
    comp = json.loads(comp_out.read_text())
    assert set(comp["categories"]) == set(SUGARCREPE_CATEGORIES)
    for category, report in comp["categories"].items():
        items = json.loads((world / "eval" / "sugarcrepe" / f"{category}.json").read_text())
        assert report["num_items"] == len(items) > 0 and report["num_skipped_missing"] == 0
        assert 0.0 <= report["accuracy"] <= 100.0
    assert comp["num_items"] == sum(c["num_items"] for c in comp["categories"].values())

    seg_out = tmp_path / "seg.json"
    seg_root = world / "eval" / "segmentation"
    segmentation.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(seg_root),
            "--templates",
            str(world / "eval" / "zeroshot" / "templates.txt"),
            "--output",
            str(seg_out),
        ]
    )
    seg = json.loads(seg_out.read_text())
    classnames = (seg_root / "classnames.txt").read_text().split()
    assert 0.0 <= seg["mIoU"] <= 1.0 and seg["num_images"] == 12
    assert list(seg["per_class_iou"]) == classnames
    valid = [v for v in seg["per_class_iou"].values() if v is not None]
    assert len(valid) == seg["num_valid_classes"] and all(0.0 <= v <= 1.0 for v in valid)
    assert math.isclose(seg["mIoU"], sum(valid) / len(valid), rel_tol=1e-9)
    assert seg["foreground_mIoU"] is None or 0.0 <= seg["foreground_mIoU"] <= 1.0
    assert os.path.getsize(seg_out) > 0
    # the reference's "without background" setting with the CSA last block: class 0 is neither queried nor scored
    segmentation.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(seg_root),
            "--templates",
            str(world / "eval" / "zeroshot" / "templates.txt"),
            "--output",
            str(seg_out),
            "--background",
            "ignore",
            "--prob-thd",
            "0",
            "--area-thd",
            "0",
            "--use-csa",
        ]
    )
    seg = json.loads(seg_out.read_text())
    assert seg["per_class_iou"]["background"] is None and seg["settings"]["csa"] is True
    valid = [v for v in seg["per_class_iou"].values() if v is not None]
    assert math.isclose(seg["mIoU"], sum(valid) / len(valid), rel_tol=1e-9) and seg["mIoU"] == seg["foreground_mIoU"]
