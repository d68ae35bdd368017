"""End-to-end tests of the retrieval and zero-shot classification benchmarks with a fake colour encoder.

Images are solid colours; the fake encoder maps an image to its normalised mean RGB (pure red -> [1, 0, 0]) and a
text to the normalised indicator of the colour words it contains ("a red square" -> [1, 0, 0]), so every
similarity is 0 or 1 and every metric can be worked out by hand.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unilm_vl.eval.common as common
from unilm_vl.eval import retrieval, zeroshot_classification
from unilm_vl.eval.retrieval import evaluate_retrieval, load_retrieval_set
from unilm_vl.eval.zeroshot_classification import evaluate_zeroshot

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourEncoder:
    """A fake :class:`~unilm_vl.eval.common.ImageTextEncoder` that sees only colours."""

    logit_scale = 100.0

    def image_transform(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 3 x H x W

    def encode_images(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)  # B x 3

    def encode_texts(self, texts):
        words = [set(t.lower().replace(".", " ").split()) for t in texts]
        vecs = torch.tensor([[float(c in w) for c in COLOURS] for w in words])
        return F.normalize(vecs, dim=-1)  # B x 3


def write_image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[colour]).save(path)


@pytest.fixture
def colour_images(tmp_path):
    for colour in COLOURS:
        write_image(tmp_path / "images" / f"{colour}.png", colour)
    return tmp_path


# Per image (in order red, green, blue): its captions.
PERFECT = {
    "red": ["a red square", "a red patch"],
    "green": ["a green square", "green."],
    "blue": ["a blue square", "something blue"],
}
# The red image has one wrong caption ("blue"), the blue image only a wrong one ("red"). With texts
# t0 "red"->img0, t1 "blue"->img0, t2 "green"->img1, t3 "red"->img2, sim (images x texts) is
#   red   [1, 0, 0, 1]
#   green [0, 0, 1, 0]
#   blue  [0, 1, 0, 0]
# Ties count against the ground truth (unilm_vl.eval.metrics):
# i2t ranks: red 1 (best GT 1, tied by t3), green 0, blue 3 (its GT t3 scores 0: t1 above, t0 and t2 tie) -> R@1 = 100/3
# t2i ranks: t0 0, t1 2 (blue image 1 above, green ties at 0), t2 0, t3 2 (red 1 above, green ties) -> R@1 = 50
SHUFFLED = {"red": ["a red square", "a blue square"], "green": ["a green square"], "blue": ["a red thing"]}
SHUFFLED_EXPECTED = {
    "i2t_R@1": 100 / 3,
    "i2t_R@5": 100.0,
    "i2t_R@10": 100.0,
    "t2i_R@1": 50.0,
    "t2i_R@5": 100.0,
    "t2i_R@10": 100.0,
    "i2t_mean_rank": 7 / 3,
    "i2t_median_rank": 2.0,  # 1-based [2, 1, 4]
    "t2i_mean_rank": 2.0,
    "t2i_median_rank": 1.0,  # 1-based [1, 3, 1, 3], lower median
    "rsum": 100 / 3 + 450.0,
    "num_images": 3,
    "num_texts": 4,
}


def write_karpathy(path, captions, extra=()):
    images = [
        {
            "filepath": "images",
            "filename": f"{colour}.png",
            "split": "test",
            "imgid": i,
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
        }
        for i, (colour, caps) in enumerate(captions.items())
    ]
    path.write_text(json.dumps({"images": images + list(extra), "dataset": "coco"}))
    return str(path)


# An entry of another split whose image does not exist: it must be ignored, not reported missing.
TRAIN_ENTRY = {
    "filepath": "images",
    "filename": "not_there.png",
    "split": "train",
    "sentences": [{"raw": "a red thing"}],
}


def test_retrieval_perfect(colour_images):
    ann = write_karpathy(colour_images / "karpathy.json", PERFECT, extra=[TRAIN_ENTRY])
    m = evaluate_retrieval(ColourEncoder(), ann, batch_size=2)
    assert m["num_images"] == 3 and m["num_texts"] == 6
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert m[key] == 100.0
    assert m["rsum"] == 600.0
    assert m["i2t_mean_rank"] == m["t2i_mean_rank"] == m["i2t_median_rank"] == m["t2i_median_rank"] == 1.0


def test_retrieval_shuffled_known_values(colour_images):
    ann = write_karpathy(colour_images / "karpathy.json", SHUFFLED, extra=[TRAIN_ENTRY])
    assert evaluate_retrieval(ColourEncoder(), ann, batch_size=2) == pytest.approx(SHUFFLED_EXPECTED)


def test_retrieval_coco_and_flickr_formats_agree(colour_images, tmp_path_factory):
    ann_dir = tmp_path_factory.mktemp("annotations")  # not the image root: --image-root is needed
    coco = {
        "images": [{"id": 10 + i, "file_name": f"images/{c}.png"} for i, c in enumerate(SHUFFLED)],
        "annotations": [
            {"id": k, "image_id": 10 + i, "caption": cap}
            for k, (i, cap) in enumerate((i, cap) for i, caps in enumerate(SHUFFLED.values()) for cap in caps)
        ],
    }
    (ann_dir / "captions_val.json").write_text(json.dumps(coco))
    flickr = [{"image": f"images/{c}.png", "caption": caps} for c, caps in SHUFFLED.items()]
    (ann_dir / "flickr_test.json").write_text(json.dumps(flickr))

    for name, fmt in (("captions_val.json", "coco_captions"), ("flickr_test.json", "flickr_list")):
        path = str(ann_dir / name)
        assert load_retrieval_set(path, image_root=str(colour_images)).format == fmt
        m = evaluate_retrieval(ColourEncoder(), path, image_root=str(colour_images), batch_size=3)
        assert m == pytest.approx(SHUFFLED_EXPECTED), name


def test_retrieval_missing_image_names_the_path(colour_images):
    captions = dict(PERFECT, purple=["a purple square"])
    ann = write_karpathy(colour_images / "karpathy.json", captions)
    with pytest.raises(FileNotFoundError, match="purple.png"):
        evaluate_retrieval(ColourEncoder(), ann)


def test_retrieval_bad_inputs(colour_images):
    ann = write_karpathy(colour_images / "karpathy.json", PERFECT)
    with pytest.raises(ValueError, match=r"no image has split 'val'.*\['test'\]"):
        evaluate_retrieval(ColourEncoder(), ann, split="val")
    other = colour_images / "other.json"
    other.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="unrecognised annotation format"):
        evaluate_retrieval(ColourEncoder(), str(other))


def test_retrieval_cli(colour_images, monkeypatch, capsys):
    monkeypatch.setattr(
        common, "load_encoder", lambda checkpoint, device="cpu", head="clip": ColourEncoder(), raising=False
    )
    ann = write_karpathy(colour_images / "karpathy.json", SHUFFLED)
    out = colour_images / "metrics.json"
    retrieval.main(["--checkpoint", "unused.pt", "--data", ann, "--batch-size", "2", "--output", str(out)])
    assert json.loads(out.read_text()) == pytest.approx(SHUFFLED_EXPECTED)
    printed = capsys.readouterr().out
    assert "image->text" in printed and "text->image" in printed and "rsum 483.33" in printed


def make_folder(root, layout):
    """layout: {folder name: [colour of each image]}."""
    for folder, colours in layout.items():
        for k, colour in enumerate(colours):
            write_image(root / folder / f"{k}_{colour}.png", colour)
    return str(root)


CLASSNAMES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "a {} square."]


def test_zeroshot_perfect(tmp_path):
    root = make_folder(tmp_path / "test", {"000": ["red", "red"], "001": ["green", "green"], "002": ["blue"] * 2})
    m = evaluate_zeroshot(ColourEncoder(), root, CLASSNAMES, TEMPLATES, batch_size=4)
    assert m == {"top1": 100.0, "top5": 100.0, "mean_per_class_accuracy": 100.0, "num_images": 6, "num_classes": 3}


def test_zeroshot_mislabelled_known_values_from_files(tmp_path):
    # A blue image filed under class 0 (red): it is predicted blue -> top-1 4/5; per class 2/3, 1, 1.
    root = make_folder(tmp_path / "test", {"000": ["red", "red", "blue"], "001": ["green"], "002": ["blue"]})
    (tmp_path / "classnames.txt").write_text("red\ngreen\n\nblue\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    m = evaluate_zeroshot(
        ColourEncoder(),
        root,
        str(tmp_path / "classnames.txt"),
        str(tmp_path / "templates.txt"),
        batch_size=2,
        per_class=True,
    )
    assert m["top1"] == pytest.approx(80.0)
    assert m["top5"] == 100.0  # 3 classes: always in the top 5
    assert m["mean_per_class_accuracy"] == pytest.approx(800 / 9)
    assert m["per_class_top1"] == pytest.approx({"red": 200 / 3, "green": 100.0, "blue": 100.0})
    assert (m["num_images"], m["num_classes"]) == (5, 3)


def test_zeroshot_folder_classname_mismatch(tmp_path):
    root = make_folder(tmp_path / "test", {"a": ["red"], "b": ["green"], "c": ["blue"], "d": ["blue"]})
    with pytest.raises(ValueError, match="4 class folders but 3 class names"):
        evaluate_zeroshot(ColourEncoder(), root, CLASSNAMES, TEMPLATES)
    with pytest.raises(ValueError, match="must contain"):
        evaluate_zeroshot(ColourEncoder(), root, CLASSNAMES + ["blue"], ["a photo"])


def test_zeroshot_cli_with_linear_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        common, "load_encoder", lambda checkpoint, device="cpu", head="clip": ColourEncoder(), raising=False
    )
    test_root = make_folder(tmp_path / "test", {"000": ["red", "red", "blue"], "001": ["green"], "002": ["blue"]})
    train_root = make_folder(tmp_path / "train", {"000": ["red"] * 3, "001": ["green"] * 3, "002": ["blue"] * 3})
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    args = [
        "--checkpoint",
        "unused.pt",
        "--root",
        test_root,
        "--classnames",
        str(tmp_path / "classnames.txt"),
        "--templates",
        str(tmp_path / "templates.txt"),
        "--batch-size",
        "4",
    ]
    with pytest.raises(SystemExit):
        zeroshot_classification.main(args + ["--linear-probe"])  # no --train-root
    out = tmp_path / "metrics.json"
    m = zeroshot_classification.main(args + ["--linear-probe", "--train-root", train_root, "--output", str(out)])
    # The probe learns colours too, so it also misses only the mislabelled blue image.
    assert m["linear_probe_top1"] == pytest.approx(80.0)
    assert m["num_train_images"] == 9
    assert json.loads(out.read_text()) == pytest.approx(m)
    assert "linear probe top-1" in capsys.readouterr().out


class ShiftedColourEncoder(ColourEncoder):
    """A second 'head' whose image side sees red as green, green as blue and blue as red."""

    def encode_images(self, images):
        return torch.roll(super().encode_images(images), 1, dims=-1)


def test_zeroshot_l2l_head_and_ensembles(tmp_path):
    root = make_folder(tmp_path / "test", {"000": ["red", "red", "blue"], "001": ["green"], "002": ["blue"]})
    same = evaluate_zeroshot(ColourEncoder(), root, CLASSNAMES, TEMPLATES, l2l_encoder=ColourEncoder())
    assert same["top1_h"] == pytest.approx(80.0)
    assert same["ensemble_top1"] == pytest.approx({f"0.{w}": 80.0 for w in range(1, 10)})
    shifted = evaluate_zeroshot(ColourEncoder(), root, CLASSNAMES, TEMPLATES, l2l_encoder=ShiftedColourEncoder())
    assert shifted["top1"] == pytest.approx(80.0)  # the CLIP head's numbers do not change
    assert shifted["top1_h"] == pytest.approx(20.0)  # only the blue image filed under red is 'right'
    assert list(shifted["ensemble_top1"]) == [f"0.{w}" for w in range(1, 10)]
