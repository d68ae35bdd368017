"""RefCOCO evaluation pieces: MDETR json reading, the release prompt, entity -> pixel boxes (float, as the
release scores), centre baseline."""

import json

import pytest
from PIL import Image

from unilm_vl.eval.flickr_entities import predicted_boxes as flickr_predicted_boxes
from unilm_vl.eval.metrics import rec_accuracy
from unilm_vl.eval.refcoco import centre_baseline, load_refexp, predicted_boxes, rec_prompt


def write_refexp(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (100, 50)).save(tmp_path / name)
    data = {
        "images": [
            {
                "id": 7,
                "file_name": "a.jpg",
                "caption": "the red circle",
                "width": 100,
                "height": 50,
                "dataset_name": "refcoco",
            },
            {"id": 8, "file_name": "b.jpg", "caption": "the cross", "width": 100, "height": 50},
        ],
        "annotations": [{"image_id": 8, "bbox": [0, 0, 50, 25]}, {"image_id": 7, "bbox": [25, 12.5, 50, 25]}],
    }
    (tmp_path / "refs.json").write_text(json.dumps(data))
    return tmp_path / "refs.json"


def test_load_and_score(tmp_path):
    items = load_refexp(str(write_refexp(tmp_path)))
    assert [it["gt_xyxy"] for it in items] == [[25, 12.5, 75, 37.5], [0, 0, 50, 25]]  # matched by image_id
    assert [it["group"] for it in items] == ["refcoco", "refexp"]
    assert rec_prompt(" the red circle ") == "<grounding><phrase> the red circle</phrase>"
    # centre box of the mean relative size (0.5 x 0.5): exact for the first, IoU 0 with the second
    base = centre_baseline(items)
    assert base[7] == pytest.approx([25, 12.5, 75, 37.5])
    acc = rec_accuracy({k: [v] for k, v in base.items()}, {it["id"]: it["gt_xyxy"] for it in items})
    assert acc["acc@1"] == pytest.approx(50.0)
    record = {
        "entities": [
            (" the red circle", (0, 14), [(0.25, 0.25, 0.75, 0.75)]),
            (" a star", (15, 21), [(0.0, 0.0, 0.1, 0.1)]),
        ]
    }
    assert predicted_boxes(record, items[0], "squash") == [[25.0, 12.5, 75.0, 37.5]]  # float, as the release
    assert predicted_boxes(record, items[1], "squash") == []  # no entity named like the expression: a miss


def test_small_box_is_scored_in_float_not_truncated():
    """A 10 x 10 image, GT [1, 1, 2, 2] (xywh) = [1, 1, 3, 3]; the model's box (0.05, 0.05, 0.29, 0.29) is
    (0.5, 0.5, 2.9, 2.9) px: IoU = 1.9^2 / (2.4^2 + 4 - 1.9^2) = 3.61 / 6.15 = 0.587, a hit. Truncated to int it
    would be (0, 0, 2, 2): IoU = 1 / 7 = 0.143, a miss."""
    item = {"id": 0, "expression": "the dot", "width": 10, "height": 10, "gt_xyxy": [1.0, 1.0, 3.0, 3.0]}
    record = {"entities": [("the dot", (0, 7), [(0.05, 0.05, 0.29, 0.29)])]}
    boxes = predicted_boxes(record, item, "squash")
    assert boxes == [pytest.approx([0.5, 0.5, 2.9, 2.9])]
    assert rec_accuracy({0: boxes}, {0: item["gt_xyxy"]})["acc@1"] == 100.0
    assert rec_accuracy({0: [[0, 0, 2, 2]]}, {0: item["gt_xyxy"]})["acc@1"] == 0.0  # what truncation scored
    # Flickr30k Entities goes through the same conversion
    flickr_item = {"phrase": "the dot", "width": 10, "height": 10}
    text = "<phrase>the dot</phrase><object><patch_index_0000><patch_index_0165></object>"  # P = 16: (0,0)-(5,10)
    assert flickr_predicted_boxes(text, flickr_item, "squash", num_bins=16) == [
        pytest.approx([10 * 0.5 / 16, 10 * 0.5 / 16, 10 * 5.5 / 16, 10 * 10.5 / 16])
    ]


def test_missing_image_is_named(tmp_path):
    path = write_refexp(tmp_path)
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        load_refexp(str(path))
