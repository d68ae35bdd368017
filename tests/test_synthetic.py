"""Tests of the synthetic world (package unilm_vl/data/synthetic): determinism, annotation correctness, layout."""

import ast
import base64
import filecmp
import importlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from unilm_vl.data import synthetic as S
from unilm_vl.data.decode import decode_image
from unilm_vl.data.formats import GRIT_TSV

logger = logging.getLogger(__name__)

SMALL = dict(num_train=60, num_val=20, num_test=24, num_videos=10, image_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    return out, S.generate_world(out, seed=3, workers=2, **SMALL)


@pytest.fixture(scope="module")
def world_one_worker(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world1"))
    return out, S.generate_world(out, seed=3, workers=1, **SMALL)


def all_files(root):
    out = []
    for d, _, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, f), root) for f in files)
    return sorted(out)


def read_tsv_rows(root, manifest, split):
    rows = []
    for shard in manifest["paths"][split]["grit_shards"]:
        with open(os.path.join(root, shard), encoding="utf-8") as fh:
            rows.extend(GRIT_TSV.parse_row(line) for line in fh)
    return rows


def read_wds_meta(root, manifest, split):
    metas = []
    for shard in manifest["paths"][split]["wds_shards"]:
        with tarfile.open(os.path.join(root, shard)) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas.append(json.load(tar.extractfile(member)))
    return metas


def nearest_colour(rgb):
    return min(S.COLOURS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, S.COLOURS[c])))


def load_json(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------- determinism
def test_same_seed_and_any_worker_count_give_identical_bytes(world, world_one_worker):
    (a, ma), (b, mb) = world, world_one_worker
    files = all_files(a)
    assert files == all_files(b)
    assert len(files) > 200
    differing = [
        f for f in files if f != "world.json" and not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
    ]
    assert differing == []
    strip = lambda m: {k: v for k, v in m.items() if k not in ("generation_seconds", "workers")}  # noqa: E731
    assert strip(ma) == strip(mb)
    assert ma["workers"] == 2 and mb["workers"] == 1


def test_different_seed_differs_and_no_heldout(tmp_path, world):
    root, manifest = world
    other = S.generate_world(
        str(tmp_path), seed=4, num_train=20, num_val=5, num_test=5, num_videos=0, heldout=False, workers=1
    )
    assert other["heldout"] == []
    with open(os.path.join(root, "train/grit/part-00000.tsv"), encoding="utf-8") as fh:
        first_a = [fh.readline() for _ in range(20)]
    with open(os.path.join(tmp_path, "train/grit/part-00000.tsv"), encoding="utf-8") as fh:
        first_b = [fh.readline() for _ in range(20)]
    assert sum(x != y for x, y in zip(first_a, first_b)) >= 19
    assert S.heldout_combos(3) != S.heldout_combos(4)
    assert load_json(str(tmp_path), "videos/train.json") == [] and other["counts"]["videos_test"] == 0


# -------------------------------------------------------------------------------------------- shards
def test_tsv_rows_parse_decode_and_sizes_match(world):
    root, manifest = world
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        rows = read_tsv_rows(root, manifest, split)
        assert len(rows) == n == manifest["counts"][split]
        for row in rows:
            img = decode_image(base64.b64decode(row["image"]), row["id"])
            assert img.size == (row["width"], row["height"])
            assert 0.73 <= row["width"] / row["height"] <= 1.36
            assert set(row["annotation"]) == {"phrase", "expression_v1"}
        for kind in ("grit", "wds"):
            sizes = load_json(root, f"{split}/{kind}/sizes.json")
            assert sum(sizes.values()) == n
            assert sorted(sizes) == sorted(os.path.basename(p) for p in manifest["paths"][split][f"{kind}_shards"])
        config = load_json(root, f"{split}/grit.json")
        assert config == [{"source": ["grit/part-00000.tsv"], "source_lang": "grit", "weight": 1.0, "name": "grit"}]
    with open(os.path.join(root, "train/grit/part-00000.tsv"), encoding="utf-8") as fh:
        assert sum(1 for _ in fh) == load_json(root, "train/grit/sizes.json")["part-00000.tsv"]


def test_wds_members_and_meta(world):
    root, manifest = world
    with tarfile.open(os.path.join(root, manifest["paths"]["train"]["wds_shards"][0])) as tar:
        names = tar.getnames()
    keys = {n.split(".", 1)[0] for n in names}
    assert len(keys) == SMALL["num_train"] and len(names) == 3 * len(keys)
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    metas = read_wds_meta(root, manifest, "train")
    rows = {r["id"]: r for r in read_tsv_rows(root, manifest, "train")}
    for meta in metas:
        assert set(meta) == {"key", "caption", "width", "height", "noun_chunks", "ref_exps", "long_caption", "objects"}
        row = rows[meta["key"]]
        assert meta["caption"] == row["caption"]
        assert meta["noun_chunks"] == row["annotation"]["phrase"]
        assert 1 <= len(meta["objects"]) <= 4
        sentences = [s for s in re.split(r"(?<=\.) ", meta["long_caption"]) if s]
        assert 3 <= len(sentences) <= 6 and len(sentences) == len(meta["objects"]) + 2


def test_noun_chunks_match_objects_and_pixels(world):
    root, manifest = world
    rows = {r["id"]: r for r in read_tsv_rows(root, manifest, "train")}
    scores = []
    for meta in read_wds_meta(root, manifest, "train"):
        row = rows[meta["key"]]
        caption, chunks = row["caption"], row["annotation"]["phrase"]
        objects = meta["objects"]
        assert len(chunks) == len(objects)
        img = np.asarray(decode_image(base64.b64decode(row["image"])))
        h, w = img.shape[:2]
        for chunk in chunks:
            start, end, x0, y0, x1, y1, score = chunk
            obj = next(o for o in objects if o["box"] == [x0, y0, x1, y1])
            assert caption[start:end] == f"a {obj['size']} {obj['colour']} {obj['shape']}"
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            cx, cy = int((x0 + x1) / 2 * w), int((y0 + y1) / 2 * h)
            assert nearest_colour(img[cy, cx]) == obj["colour"], (row["id"], obj)
            scores.append(score)
        refs = row["annotation"]["expression_v1"]
        assert len(refs) == len(chunks)
        for chunk, ref in zip(chunks, refs):
            assert ref[0] == chunk[0] and ref[2:] == chunk[2:]
            if ref[1] != chunk[1]:
                relation = caption[chunk[1] : ref[1]]
                assert any(relation.startswith(f" {r} a ") for r in S.RELATIONS), relation
    assert min(scores) >= 0.5 and max(scores) <= 1.0
    assert any(s < 0.65 for s in scores) and any(s >= 0.65 for s in scores)


def test_boxes_are_tight_and_relations_follow_centres():
    for i in range(30):
        rng = np.random.default_rng(i)
        spec = S.sample_scene(rng, 64, S.all_combos())
        rgb, labels, objects = S.render_layers(rng, spec)
        for k, obj in enumerate(objects):
            x0, y0, x1, y1 = obj.box_px
            mask = labels == k + 1
            assert mask[y0:y1, x0:x1].sum() == mask.sum() == obj.area
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
            assert (rgb[mask] == S.COLOURS[obj.colour]).all()
            expected = (x0 / spec.width, y0 / spec.height, x1 / spec.width, y1 / spec.height)
            assert obj.box == pytest.approx(expected, abs=1e-6)
        assert len({o.combo for o in objects}) == len(objects)
    a = S.SceneObject("circle", "red", "small", (0, 0, 0.2, 0.2), (0, 0, 10, 10), 80)
    b = S.SceneObject("square", "blue", "large", (0, 0, 0.2, 0.2), (40, 5, 60, 25), 400)
    assert S.relation(a, b) == "to the left of" and S.relation(b, a) == "to the right of"
    c = S.SceneObject("star", "green", "small", (0, 0, 0.2, 0.2), (0, 40, 10, 50), 50)
    assert S.relation(a, c) == "above" and S.relation(c, a) == "below"
    cap = S.caption_for([a, b], np.random.default_rng(0))
    assert cap.text in (
        "a small red circle to the left of a large blue square",
        "a large blue square to the right of a small red circle",
    )


# -------------------------------------------------------------------------------------------- held-out
def test_heldout_absent_from_train_val_and_in_every_test_image(world):
    root, manifest = world
    held = [tuple(c) for c in manifest["heldout"]]
    assert {s for _, s in held} == set(S.SHAPES)
    assert abs(len(held) - 0.15 * len(S.all_combos())) <= 1
    for split in ("train", "val"):
        for meta in read_wds_meta(root, manifest, split):
            assert not any((o["colour"], o["shape"]) in held for o in meta["objects"])
            assert not any(f"{c} {s}" in meta["caption"] for c, s in held)
    karpathy = load_json(root, "eval/karpathy.json")
    for image in karpathy["images"]:
        assert any(f"{c} {s}" in image["sentences"][0]["raw"] for c, s in held)
    for entry in load_json(root, "videos/train.json"):
        assert not any(f"{c} {s}" in entry["desc"] for c, s in held)
    for entry in load_json(root, "videos/test.json"):
        assert any(f"{c} {s}" in entry["desc"][0] for c, s in held)


# -------------------------------------------------------------------------------------------- eval files
def test_karpathy(world):
    root, manifest = world
    karpathy = load_json(root, "eval/karpathy.json")
    assert karpathy["dataset"] == "synthetic" and len(karpathy["images"]) == SMALL["num_test"]
    sentids = []
    for i, image in enumerate(karpathy["images"]):
        assert image["imgid"] == i and image["split"] == "test"
        assert os.path.isfile(os.path.join(root, "eval", image["filepath"], image["filename"]))
        raws = [s["raw"] for s in image["sentences"]]
        assert len(raws) == 5 == len(set(raws))
        for s in image["sentences"]:
            assert s["imgid"] == i and s["tokens"] == s["raw"].lower().replace(",", "").replace(":", "").split()
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        sentids.extend(image["sentids"])
    assert sentids == list(range(len(sentids)))


def test_zeroshot_imagefolder(world):
    root, manifest = world
    with open(os.path.join(root, "eval/zeroshot/classnames.txt"), encoding="utf-8") as fh:
        classnames = fh.read().splitlines()
    with open(os.path.join(root, "eval/zeroshot/templates.txt"), encoding="utf-8") as fh:
        templates = fh.read().splitlines()
    assert len(classnames) == len(S.COLOURS) * len(S.SHAPES) == len(set(classnames))
    assert all("{}" in t for t in templates) and len(templates) == 6
    folders = sorted(os.listdir(os.path.join(root, "eval/zeroshot/test")))
    assert len(folders) == len(classnames) and folders[0] == "000"
    per_class = manifest["counts"]["zeroshot_per_class"]
    assert per_class == max(1, round(10 * SMALL["num_test"] / 500))
    for index in (0, 17, len(classnames) - 1):
        colour, shape = classnames[index].split()
        files = os.listdir(os.path.join(root, "eval/zeroshot/test", folders[index]))
        assert len(files) == per_class
        img = np.asarray(Image.open(os.path.join(root, "eval/zeroshot/test", folders[index], files[0])).convert("RGB"))
        close = np.abs(img.astype(int) - S.COLOURS[colour]).max(axis=2) < 40
        assert close.sum() > 40, classnames[index]


def test_refcoco(world):
    root, manifest = world
    ref = load_json(root, "eval/refcoco/finetune_refcoco_testA.json")
    assert ref["categories"] == [{"id": 1, "name": "object"}]
    assert len(ref["images"]) == len(ref["annotations"]) == manifest["counts"]["refcoco"] >= SMALL["num_test"]
    per_image = {}
    for entry, ann in zip(ref["images"], ref["annotations"]):
        assert ann["image_id"] == entry["id"] and ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert entry["tokens_positive"] == [[0, len(entry["caption"])]] and entry["dataset_name"] == "refcoco"
        assert entry["caption"].startswith("the ")
        assert entry["file_name"] == f"{entry['original_id']:06d}.jpg"
        img = np.asarray(Image.open(os.path.join(root, "eval/images", entry["file_name"])).convert("RGB"))
        assert img.shape[:2] == (entry["height"], entry["width"])
        x, y, w, h = ann["bbox"]
        assert 0 < ann["area"] <= w * h and x + w <= entry["width"] and y + h <= entry["height"]
        head = entry["caption"].split()[1:3]
        colours = [word for word in head if word in S.COLOURS]
        if colours:
            assert nearest_colour(img[y + h // 2, x + w // 2]) == colours[0]
        per_image.setdefault(entry["original_id"], []).append(entry["caption"])
    assert all(len(v) == len(set(v)) for v in per_image.values())


def test_vqa_and_sugarcrepe(world):
    root, manifest = world
    questions = load_json(root, "eval/vqa/questions.json")["questions"]
    answers = load_json(root, "eval/vqa/annotations.json")["annotations"]
    assert len(questions) == len(answers) == manifest["counts"]["vqa_questions"]
    assert len({q["question_id"] for q in questions}) == len(questions)
    for q, a in zip(questions, answers):
        assert q["question_id"] == a["question_id"] and q["image_id"] == a["image_id"]
        assert len(a["answers"]) == 10 and all(x["answer"] == a["multiple_choice_answer"] for x in a["answers"])
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        if a["answer_type"] == "yes/no":
            assert a["multiple_choice_answer"] in ("yes", "no")
        if q["question"] == "how many shapes are there?":
            assert a["multiple_choice_answer"] in ("1", "2", "3", "4")
    assert {a["answer_type"] for a in answers} == {"yes/no", "number", "other"}
    for category in S.SUGARCREPE_CATEGORIES:
        entries = load_json(root, f"eval/sugarcrepe/{category}.json")
        assert len(entries) == manifest["counts"]["sugarcrepe"][category] > 0
        assert sorted(entries, key=int) == [str(i) for i in range(len(entries))]
        for e in entries.values():
            assert e["caption"] != e["negative_caption"]
            assert os.path.isfile(os.path.join(root, "eval/images", e["filename"]))
            if category.startswith("swap"):
                assert sorted(e["caption"].split()) == sorted(e["negative_caption"].split())
            if category == "add_att":
                assert len(e["negative_caption"].split()) == len(e["caption"].split()) + 1


def test_segmentation(world):
    root, _ = world
    seg = os.path.join(root, "eval/segmentation")
    with open(os.path.join(seg, "classnames.txt"), encoding="utf-8") as fh:
        classnames = fh.read().splitlines()
    assert classnames == ["background", *S.SHAPES]
    with open(os.path.join(seg, "ImageSets/Segmentation/val.txt"), encoding="utf-8") as fh:
        ids = fh.read().splitlines()
    assert len(ids) == SMALL["num_test"]
    seen = set()
    for image_id in ids:
        mask = Image.open(os.path.join(seg, "SegmentationClass", f"{image_id}.png"))
        assert mask.mode == "P"
        img = Image.open(os.path.join(seg, "JPEGImages", f"{image_id}.jpg"))
        assert img.size == mask.size
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(len(classnames))) | {255}
        assert 0 in values and 255 in values and len(values) >= 3
        seen |= values
    assert len(seen) >= 5


def test_segmentation_colour_set_labels_the_same_pixels_by_colour(world):
    """eval/segmentation_colour: the same images, the same object / background / boundary pixels as the shape set,
    each object's pixels labelled 1 + its colour's index; checked against the objects the test split records."""
    root, manifest = world
    shape_root, colour_root = (os.path.join(root, "eval", f) for f in ("segmentation", "segmentation_colour"))
    assert manifest["paths"]["eval"]["segmentation_colour"] == "eval/segmentation_colour"
    with open(os.path.join(colour_root, "classnames.txt"), encoding="utf-8") as fh:
        assert fh.read().splitlines() == ["background", *S.COLOURS]
    with open(os.path.join(colour_root, "ImageSets/Segmentation/val.txt"), encoding="utf-8") as fh:
        ids = fh.read().splitlines()
    assert len(ids) == SMALL["num_test"]
    for image_id in ids:
        assert filecmp.cmp(
            os.path.join(shape_root, "JPEGImages", f"{image_id}.jpg"),
            os.path.join(colour_root, "JPEGImages", f"{image_id}.jpg"),
            shallow=False,
        )
        shape = np.asarray(Image.open(os.path.join(shape_root, "SegmentationClass", f"{image_id}.png")))
        colour = np.asarray(Image.open(os.path.join(colour_root, "SegmentationClass", f"{image_id}.png")))
        assert ((shape == 0) == (colour == 0)).all() and ((shape == 255) == (colour == 255)).all()
        rgb = np.asarray(Image.open(os.path.join(colour_root, "JPEGImages", f"{image_id}.jpg")).convert("RGB"))
        for label in set(np.unique(colour).tolist()) - {0, 255}:
            name = list(S.COLOURS)[label - 1]
            inside = rgb[colour == label].astype(int)  # JPEG q90 without chroma subsampling keeps flat colours
            assert np.abs(np.median(inside, axis=0) - S.COLOURS[name]).max() < 25, (image_id, name)


def test_segmentation_mask_by_colour_and_bad_attribute():
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1:5, 1:5] = 1
    obj = S.SceneObject("star", "purple", "small", (0.1, 0.1, 0.8, 0.8), (1, 1, 5, 5), 16)
    assert S.segmentation_mask(labels, [obj], "colour")[2, 2] == 1 + list(S.COLOURS).index("purple")
    assert S.segmentation_mask(labels, [obj])[2, 2] == 1 + S.SHAPES.index("star")
    with pytest.raises(ValueError, match="'shape' or 'colour'"):
        S.segmentation_mask(labels, [obj], "size")


def test_segmentation_boundary_is_one_pixel():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[2:7, 3:8] = 1
    obj = S.SceneObject("square", "red", "small", (0.3, 0.2, 0.8, 0.7), (3, 2, 8, 7), 25)
    mask = S.segmentation_mask(labels, [obj])
    assert (mask[3:6, 4:7] == 1 + S.SHAPES.index("square")).all()
    assert (mask[2, 3:8] == 255).all() and (mask[6, 3:8] == 255).all() and (mask[2:7, 3] == 255).all()
    assert mask[labels == 0].max() == 0


# -------------------------------------------------------------------------------------------- videos
def shape_centre_x(img, colour):
    close = np.abs(np.asarray(img.convert("RGB")).astype(int) - S.COLOURS[colour]).max(axis=2) < 50
    return float(np.nonzero(close)[1].mean())


def test_video_files(world):
    root, manifest = world
    train, test = load_json(root, "videos/train.json"), load_json(root, "videos/test.json")
    assert len(train) == manifest["counts"]["videos_train"] == 8 and len(test) == 2
    assert all(isinstance(e["desc"], str) for e in train)
    assert all(isinstance(e["desc"], list) and len(e["desc"]) == 2 for e in test)
    counts = []
    for entry in train + test:
        frames = sorted(os.listdir(os.path.join(root, "videos/frames", entry["video_id"])))
        assert 6 <= len(frames) <= 12 and frames[0] == "frame_0001.jpg"
        assert frames[-1] == f"frame_{len(frames):04d}.jpg"
        counts.append(len(frames))
        desc = entry["desc"] if isinstance(entry["desc"], str) else entry["desc"][0]
        assert any(m in desc for m in S.MOTIONS)
        match = re.fullmatch(r"a (small|large) (\w+) (\w+) moves to the right", desc)
        if match:
            first = Image.open(os.path.join(root, "videos/frames", entry["video_id"], frames[0]))
            last = Image.open(os.path.join(root, "videos/frames", entry["video_id"], frames[-1]))
            assert shape_centre_x(last, match.group(2)) > shape_centre_x(first, match.group(2)) + 5


def test_moving_clip_centres_follow_motion():
    found = set()
    for i in range(200):
        clip = S.sample_clip(np.random.default_rng(i), 64, S.all_combos())
        if len(clip.tracks) != 1 or clip.tracks[0].motion in found:
            continue
        track = clip.tracks[0]
        found.add(track.motion)
        frames = [Image.open(io.BytesIO(S.encode_image(f))) for f in S.render_clip(clip)]
        assert len(frames) == clip.num_frames
        close = [np.abs(np.asarray(f).astype(int) - S.COLOURS[track.colour]).max(axis=2) < 50 for f in frames]
        xs = [float(np.nonzero(c)[1].mean()) for c in close]
        ys = [float(np.nonzero(c)[0].mean()) for c in close]
        areas = [int(c.sum()) for c in close]
        series = {
            "moves to the right": xs,
            "moves to the left": [-x for x in xs],
            "moves down": ys,
            "moves up": [-y for y in ys],
            "grows": areas,
            "shrinks": [-a for a in areas],
        }[track.motion]
        assert all(b >= a - 1 for a, b in zip(series, series[1:])), (track.motion, series)
        assert series[-1] > series[0] + 4, (track.motion, series)
        if len(found) == len(S.MOTIONS):
            break
    assert found == set(S.MOTIONS)


# -------------------------------------------------------------------------------------------- ensure_world
def test_ensure_world_reuses_and_regenerates(tmp_path):
    out = str(tmp_path / "w")
    kw = dict(seed=1, num_train=10, num_val=2, num_test=3, num_videos=2, workers=1)
    first = S.ensure_world(out, **kw)
    stamp = os.path.getmtime(os.path.join(out, "world.json"))
    again = S.ensure_world(out, **{**kw, "workers": 2})
    assert again == first and os.path.getmtime(os.path.join(out, "world.json")) == stamp
    changed = S.ensure_world(out, **{**kw, "num_train": 12})
    assert changed["counts"]["train"] == 12
    assert load_json(out, "train/grit/sizes.json") == {"part-00000.tsv": 12}
    os.remove(os.path.join(out, "world.json"))  # an interrupted run leaves no manifest
    assert S.ensure_world(out, **kw)["counts"]["train"] == 10
    os.remove(os.path.join(out, "eval/karpathy.json"))
    assert S.ensure_world(out, **kw)["counts"]["train"] == 10
    assert os.path.isfile(os.path.join(out, "eval/karpathy.json"))


def test_cli(tmp_path):
    manifest = S.main(
        [
            "--out",
            str(tmp_path),
            "--seed",
            "2",
            "--num-train",
            "5",
            "--num-val",
            "1",
            "--num-test",
            "2",
            "--num-videos",
            "0",
            "--no-heldout",
            "--workers",
            "1",
        ]
    )
    assert manifest["args"]["heldout"] is False and manifest["counts"]["train"] == 5
    assert load_json(str(tmp_path), "world.json")["args"] == manifest["args"]


@pytest.mark.slow
def test_ten_thousand_train_images(tmp_path):
    start = time.perf_counter()
    manifest = S.generate_world(str(tmp_path), seed=0, num_train=10000, workers=2)
    seconds = time.perf_counter() - start
    logger.info("10k train images (+ default val/test/videos): %.1f s", seconds)
    assert manifest["counts"]["train"] == 10000
    assert sum(load_json(str(tmp_path), "train/grit/sizes.json").values()) == 10000


# ----------------------------------------------------------------------------------------------- the package
def _imported_modules(path, package):
    """Absolute names of the modules a source file imports (relative imports resolved against ``package``)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # ``from . import synthetic``


def test_the_data_layer_imports_only_the_world_vocabulary():
    """Modules of unilm_vl/data outside the synthetic package import nothing of it but ``vocabulary``, and the
    vocabulary imports nothing of the project (static check of every import statement)."""
    data_dir = os.path.dirname(os.path.dirname(S.__file__))
    offenders = []
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".py"):
            for mod in _imported_modules(os.path.join(data_dir, name), "unilm_vl.data"):
                if mod.startswith("unilm_vl.data.synthetic") and not mod.startswith(
                    "unilm_vl.data.synthetic.vocabulary"
                ):
                    offenders.append((name, mod))
    assert offenders == []
    vocab = os.path.join(os.path.dirname(S.__file__), "vocabulary.py")
    assert {m.split(".")[0] for m in _imported_modules(vocab, "unilm_vl.data.synthetic")} <= {"typing"}


@pytest.mark.slow
def test_importing_the_plugin_loads_no_generator_module():
    """A fresh interpreter that imports unilm_vl (every task, model, criterion, hence data.hard_negatives) has loaded
    the synthetic package and its vocabulary only."""
    code = (
        "import json, sys, unilm_vl, unilm_vl.data.hard_negatives; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('unilm_vl.data.synthetic'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "unilm_vl.data.synthetic",
        "unilm_vl.data.synthetic.vocabulary",
    ]


def test_package_reexports_its_public_names_from_their_modules():
    for name in S.__all__:
        module = importlib.import_module(f"unilm_vl.data.synthetic.{S._MODULE_OF[name]}")
        assert getattr(S, name) is getattr(module, name), name
    assert {"generate_world", "ensure_world", "main", "COLOURS", "SceneObject", "sample_clip"} <= set(dir(S))
    with pytest.raises(AttributeError, match="no_such_name"):
        S.no_such_name


@pytest.mark.slow
def test_python_dash_m_writes_the_same_world_and_no_runpy_warning(tmp_path):
    """``python -m unilm_vl.data.synthetic`` with two worker processes writes the bytes the in-process generator
    writes with one, and neither it nor its workers warn that the module ran twice (runpy's RuntimeWarning)."""
    args = dict(seed=5, num_train=6, num_val=2, num_test=3, num_videos=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    out, ref = tmp_path / "cli", tmp_path / "ref"
    proc = subprocess.run(
        [sys.executable, "-m", "unilm_vl.data.synthetic", "--out", str(out), "--workers", "2", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr and "found in sys.modules" not in proc.stderr
    S.generate_world(str(ref), workers=1, **args)
    files = all_files(str(out))
    assert files == all_files(str(ref)) and len(files) > 20
    assert [f for f in files if f != "world.json" and not filecmp.cmp(out / f, ref / f, shallow=False)] == []
    assert load_json(str(out), "world.json")["workers"] == 2
