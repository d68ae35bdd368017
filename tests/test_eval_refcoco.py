"""RefCOCO evaluation pieces: MDETR json reading, the release prompt, entity -> pixel boxes, centre baseline."""
import json

import pytest
from PIL import Image

from unilm_vl.eval.metrics import rec_accuracy
from unilm_vl.eval.refcoco import centre_baseline, load_refexp, predicted_boxes, rec_prompt


def write_refexp(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (100, 50)).save(tmp_path / name)
    data = {"images": [{"id": 7, "file_name": "a.jpg", "caption": "the red circle", "width": 100, "height": 50,
                        "dataset_name": "refcoco"},
                       {"id": 8, "file_name": "b.jpg", "caption": "the cross", "width": 100, "height": 50}],
            "annotations": [{"image_id": 8, "bbox": [0, 0, 50, 25]}, {"image_id": 7, "bbox": [25, 12.5, 50, 25]}]}
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
    record = {"entities": [(" the red circle", (0, 14), [(0.25, 0.25, 0.75, 0.75)]),
                           (" a star", (15, 21), [(0.0, 0.0, 0.1, 0.1)])]}
    assert predicted_boxes(record, items[0], "squash") == [[25, 12, 75, 37]]
    assert predicted_boxes(record, items[1], "squash") == []  # no entity named like the expression: a miss


def test_missing_image_is_named(tmp_path):
    path = write_refexp(tmp_path)
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        load_refexp(str(path))
