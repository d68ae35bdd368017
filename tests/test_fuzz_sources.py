"""Bad input at scale (issue 7, deliverable 5): thousands of samples, a third of them corrupted in seeded random
ways, through every source kind (tsv, wds, frames annotation, text) and the real pipeline (:class:`StreamPlan`,
the Kosmos-2 grounding stage that validates GRIT boxes, the image transform). The pass must finish, yield exactly
the good samples, and count exactly the bad ones."""

import base64
import collections
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unilm_vl.data.decode import BadSample
from unilm_vl.data.formats import parse_annotation
from unilm_vl.data.kosmos2_samples import GritGroundedCaption
from unilm_vl.data.pipeline import EpochStream, StreamPlan
from unilm_vl.data.sources import SourceSpec, decode_record, read_tar
from unilm_vl.data.stages import FramesToImage, ImageTransform

CAPTION = "a red picture"
GOOD_BOX = [0, len(CAPTION), 0.1, 0.2, 0.8, 0.9, 0.9]  # the whole caption grounded in a valid box


def jpeg(seed, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, "JPEG")
    return buf.getvalue()


def deep_json(depth=100_000) -> str:
    return "[" * depth + "]" * depth  # valid JSON that the json module cannot parse (RecursionError)


# ------------------------------------------------------------------------------------------- writers
def tsv_line(cells) -> bytes:
    return b"\t".join(c if isinstance(c, bytes) else str(c).encode() for c in cells) + b"\n"


def tsv_good(key, seed):
    return tsv_line(
        [
            key,
            CAPTION,
            base64.b64encode(jpeg(seed)).decode(),
            8,
            8,
            json.dumps({"phrase": [GOOD_BOX], "expression_v1": [GOOD_BOX]}),
        ]
    )


def _tsv_bad(key, seed, kind):
    image = base64.b64encode(jpeg(seed)).decode()
    ann = json.dumps({"phrase": [GOOD_BOX]})
    cells = [key, CAPTION, image, 8, 8, ann]
    if kind == "truncated_image":
        cells[2] = base64.b64encode(jpeg(seed)[:60]).decode()
    elif kind == "zero_length_image":
        cells[2] = ""
    elif kind == "garbage_image":
        cells[2] = base64.b64encode(b"\x00GARBAGE" + jpeg(seed)[8:]).decode()
    elif kind == "not_base64":
        cells[2] = "!!not*base64!!"
    elif kind == "too_few_columns":
        cells = cells[:4]
    elif kind == "too_many_columns":
        cells = cells + ["extra"]
    elif kind == "non_utf8_caption":
        cells[1] = b"a \xff\xfe picture"
    elif kind == "bad_int":
        cells[3] = "wide"
    elif kind == "unparsable_annotation":
        cells[5] = "{not json"
    elif kind == "unhashable_annotation":
        cells[5] = "{[1]: 2}"  # a Python literal that ast.literal_eval rejects with TypeError
    elif kind == "box_out_of_range":
        cells[5] = json.dumps({"phrase": [[0, len(CAPTION), 0.1, 0.2, 1.5, 0.9, 0.9]]})
    elif kind == "inverted_box":
        cells[5] = json.dumps({"phrase": [[0, len(CAPTION), 0.8, 0.2, 0.1, 0.9, 0.9]]})
    elif kind == "span_outside_caption":
        cells[5] = json.dumps({"phrase": [[0, 99, 0.1, 0.2, 0.8, 0.9, 0.9]]})
    elif kind in ABSURD_BOXES:
        cells[5] = '{"phrase": [[0, %d, %s]]}' % (len(CAPTION), ABSURD_BOXES[kind])
    elif kind == "empty_caption":
        cells[1] = " "
    else:
        raise AssertionError(kind)
    return tsv_line(cells)


ABSURD_BOXES = {  # valid JSON where numbers go: x0, y0, x1, y1, score of a grounding entry
    "huge_int_box": "1" + "0" * 400 + ", 0.2, 0.8, 0.9, 0.9",  # float() of it raises OverflowError
    "nan_box": "NaN, 0.2, 0.8, 0.9, 0.9",
    "infinite_score": "0.1, 0.2, 0.8, 0.9, Infinity",
    "nan_score": "0.1, 0.2, 0.8, 0.9, NaN",
    "string_box": '"0.1", 0.2, 0.8, 0.9, 0.9',
    "nested_box": "[0.1], 0.2, 0.8, 0.9, 0.9",
    "bool_box": "true, 0.2, 0.8, 0.9, 0.9",
}

TSV_BAD = [
    "truncated_image",
    "zero_length_image",
    "garbage_image",
    "not_base64",
    "too_few_columns",
    "too_many_columns",
    "non_utf8_caption",
    "bad_int",
    "unparsable_annotation",
    "unhashable_annotation",
    "box_out_of_range",
    "inverted_box",
    "span_outside_caption",
    "empty_caption",
    *ABSURD_BOXES,
]

WDS_BAD = [
    "truncated_image",
    "zero_length_image",
    "missing_image",
    "missing_caption",
    "non_utf8_caption",
    "invalid_json",
    "deep_json",
    "box_out_of_range",
    "empty_caption",
    "huge_int_json",
    "huge_int_box",
    "duplicate_key",
]


def wds_members(key, seed, kind=None):
    members = {"jpg": jpeg(seed), "txt": CAPTION.encode(), "json": json.dumps({"noun_chunks": [GOOD_BOX]}).encode()}
    if kind == "truncated_image":
        members["jpg"] = members["jpg"][:60]
    elif kind == "zero_length_image":
        members["jpg"] = b""
    elif kind == "missing_image":
        del members["jpg"]
    elif kind == "missing_caption":
        del members["txt"]
    elif kind == "non_utf8_caption":
        members["txt"] = b"a \xff picture"
    elif kind == "invalid_json":
        members["json"] = b"{oops"
    elif kind == "deep_json":
        members["json"] = deep_json().encode()
    elif kind == "box_out_of_range":
        members["json"] = json.dumps({"noun_chunks": [[0, len(CAPTION), -0.2, 0.2, 0.8, 0.9, 0.9]]}).encode()
    elif kind == "empty_caption":
        members["txt"] = b""
    elif kind == "huge_int_json":  # more digits than Python's int parsing allows: json raises ValueError
        members["json"] = b'{"noun_chunks": [], "width": ' + b"9" * 5000 + b"}"
    elif kind == "huge_int_box":
        members["json"] = b'{"noun_chunks": [[0, %d, 0.1, 0.2, 0.8, 0.9, 1%s]]}' % (len(CAPTION), b"0" * 400)
    elif kind == "duplicate_key":  # the sample written twice back to back: the first copy is good, the repeat bad
        return [(f"{key}.{ext}", data) for ext, data in members.items()] * 2
    elif kind is not None:
        raise AssertionError(kind)
    return [(f"{key}.{ext}", data) for ext, data in members.items()]


def data_offset(tar: bytes, name: str) -> int:
    """Byte offset of member ``name``'s data in the tar ``tar``."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.getmember(name).offset_data


def tar_bytes(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FRAMES_BAD = [
    "missing_video",
    "empty_video_dir",
    "zero_length_frame",
    "truncated_frame",
    "no_caption",
    "not_an_object",
    "empty_caption_list",
    "parent_video_id",
    "absolute_video_id",
    "list_video_id",
]
TEXT_BAD = ["not_json", "non_utf8", "no_text_field", "empty_text", "json_list", "deep_json"]


class World:
    """Corrupted shards of every kind under ``root``; ``good`` holds the sample keys that must come out and
    ``bad`` how many records must be counted as bad."""

    def __init__(self, root, n_per_source=500, bad_fraction=0.3, seed=0):
        self.root, self.rng = str(root), random.Random(seed)
        self.n, self.bad_fraction = n_per_source, bad_fraction
        self.good, self.bad, self.kinds = set(), 0, collections.Counter()
        self.sources = [self.tsv(), self.wds(), self.frames(), self.text()]

    def pick(self, kinds):
        kind = self.rng.choice(kinds) if self.rng.random() < self.bad_fraction else None
        self.kinds[kind] += 1
        return kind

    def path(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def tsv(self):
        shards = []
        for s in range(4):
            lines = []
            for i in range(self.n // 4):
                key, kind = f"tsv-{s}-{i}", self.pick(TSV_BAD)
                lines.append(tsv_good(key, i) if kind is None else _tsv_bad(key, i, kind))
                if kind is None:
                    self.good.add(key)
                else:
                    self.bad += 1
            shards.append(self.path("tsv", f"part-{s:05d}.tsv"))
            with open(shards[-1], "wb") as fh:
                fh.writelines(lines)
        shards.append(self.path("tsv", "part-00004.tsv"))
        open(shards[-1], "wb").close()  # zero-length shard: one bad record (empty shard)
        self.bad += 1
        return SourceSpec("tsv", "tsv", shards, schema="grit")

    def wds(self):
        shards = []
        for s in range(4):
            samples = []
            for i in range(self.n // 4):
                key, kind = f"wds-{s}-{i:04d}", self.pick(WDS_BAD)
                samples += wds_members(key, i, kind)
                if kind in (None, "duplicate_key"):
                    self.good.add(key)
                if kind is not None:
                    self.bad += 1
            shards.append(self.path("wds", f"part-{s:05d}.tar"))
            with open(shards[-1], "wb") as fh:
                fh.write(tar_bytes(samples))
        # a shard cut half-way through the image of its 7th sample: 6 good samples, one bad record for the cut
        samples = [m for i in range(10) for m in wds_members(f"wds-cut-{i}", i)]
        data = tar_bytes(samples)
        offset = data_offset(data, "wds-cut-6.jpg") + len(jpeg(6)) // 2
        shards.append(self.path("wds", "part-00004.tar"))
        with open(shards[-1], "wb") as fh:
            fh.write(data[:offset])
        self.good |= {f"wds-cut-{i}" for i in range(6)}
        self.bad += 1
        shards.append(self.path("wds", "part-00005.tar"))
        open(shards[-1], "wb").close()  # zero-length tar: one bad record (unreadable shard)
        self.bad += 1
        shards.append(self.path("wds", "part-00006.tar"))
        with open(shards[-1], "wb") as fh:
            fh.write(tar_bytes([]))  # an empty but valid tar: one bad record (empty shard)
        self.bad += 1
        return SourceSpec("wds", "wds", shards)

    def frames(self):
        frames_root, entries = os.path.join(self.root, "videos", "frames"), []
        outside = os.path.join(self.root, "videos", "outside")  # frames a video_id must not reach
        os.makedirs(outside)
        with open(os.path.join(outside, "frame_0000.jpg"), "wb") as fh:
            fh.write(jpeg(0))
        for i in range(self.n):
            vid, kind = f"vid-{i:04d}", self.pick(FRAMES_BAD)
            entry = {"video_id": vid, "caption": CAPTION}
            if kind != "missing_video":
                os.makedirs(os.path.join(frames_root, vid))
            for f in range(2 if kind not in ("missing_video", "empty_video_dir") else 0):
                data = jpeg(i + f)
                if f == 1 and kind == "zero_length_frame":
                    data = b""
                if f == 1 and kind == "truncated_frame":
                    data = data[:50]
                with open(os.path.join(frames_root, vid, f"frame_{f:04d}.jpg"), "wb") as fh:
                    fh.write(data)
            if kind == "no_caption":
                entry = {"video_id": vid}
            elif kind == "not_an_object":
                entry = [vid, CAPTION]
            elif kind == "empty_caption_list":
                entry = {"video_id": vid, "caption": []}
            elif kind == "parent_video_id":
                entry = {"video_id": "../outside", "caption": CAPTION}
            elif kind == "absolute_video_id":
                entry = {"video_id": outside, "caption": CAPTION}
            elif kind == "list_video_id":
                entry = {"video_id": [vid], "caption": CAPTION}
            entries.append(entry)
            if kind is None:
                self.good.add(vid)
            else:
                self.bad += 1
        shards = [self.path("videos", "train.json")]
        with open(shards[0], "w") as fh:
            json.dump(entries, fh)
        for name, data in (
            ("broken.json", b'[{"video_id": "x"'),
            ("latin1.json", b'[{"caption": "caf\xe9"}]'),
            ("empty.json", b""),
            ("object.json", b'{"video_id": "x"}'),
            ("empty_list.json", b"[]"),
            ("huge_int.json", b"[" + b"7" * 5000 + b"]"),
        ):
            shards.append(self.path("videos", name))
            with open(shards[-1], "wb") as fh:
                fh.write(data)
            self.bad += 1  # each unreadable annotation file is one bad record
        return SourceSpec("frames", "frames", shards, frames_root=frames_root)

    def text(self):
        shards = [self.path("text", "docs.jsonl"), self.path("text", "docs.txt"), self.path("text", "empty.txt")]
        lines = []
        for i in range(self.n // 2):
            kind = self.pick(TEXT_BAD)
            line = {
                None: json.dumps({"text": f"document {i}\nsecond line"}).encode(),
                "not_json": b"{text: 1",
                "non_utf8": b'{"text": "caf\xe9"}',
                "no_text_field": b'{"txt": "x"}',
                "empty_text": b'{"text": "  "}',
                "json_list": b'["text"]',
                "deep_json": deep_json().encode(),
            }[kind]
            lines.append(line + b"\n")
            if kind is None:
                self.good.add(f"docs.jsonl:{i}")
            else:
                self.bad += 1
        with open(shards[0], "wb") as fh:
            fh.writelines(lines)
        lines = []
        for i in range(self.n // 2):
            bad = self.rng.random() < self.bad_fraction
            lines.append(b"caf\xe9 \xff\n" if bad else f"plain document {i}\\nline two\n".encode())
            if bad:
                self.bad += 1
            else:
                self.good.add(f"docs.txt:{i}")
        with open(shards[1], "wb") as fh:
            fh.writelines(lines)
        open(shards[2], "wb").close()  # one bad record (empty shard)
        self.bad += 1
        return SourceSpec("text", "text", shards)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from unilm_vl.data.build_vocab import train_vocab
    from unilm_vl.data.grounding import build_kosmos2_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    train_vocab([CAPTION, "document second line", "plain document line two"] * 20, str(root), vocab_size=60)
    return build_kosmos2_tokenizer(str(root / "sentencepiece.bpe.model"), str(root / "dict.txt"), num_bins=4)


def collect_keys(samples):
    return {
        "keys": [s["__key__"] for s in samples],
        "images": torch.stack([s["image"] for s in samples if "image" in s] or [torch.zeros(3, 8, 8)]),
    }


def to_tensor(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype="float32")).permute(2, 0, 1)


def test_fuzzed_sources_yield_exactly_the_good_samples_and_count_every_bad_one(tmp_path, tokenizer):
    world = World(tmp_path, n_per_source=500)
    assert len(world.good) + world.bad > 1900 and world.bad > 500
    stages = [
        FramesToImage(),
        GritGroundedCaption(tokenizer, mode="phrase", num_bins=4, use_object_bbox_prob=1.0, center_crop=False),
        ImageTransform(to_tensor, optional=True),
    ]
    plan = StreamPlan(
        sources=world.sources,
        stages=stages,
        collate=collect_keys,
        batch_size=16,
        seed=0,
        num_workers=2,
        shuffle=False,
        split="sample",
        train=False,
        max_bad_fraction=0.99,
        log_every=500,
        name="fuzz",
    )
    num_batches = plan.count() // 16 + 2  # a single pass; the stream runs out before the last batch indices
    # two loader processes decode; their samples and BadSamples come back to one counter in this process
    stream = EpochStream(plan, 1, 0, num_batches, loader_workers=2)
    seen = [key for batch in stream for key in batch.get("keys", [])]
    assert len(seen) == len(set(seen)) == stream.counter.good
    assert set(seen) == world.good
    assert stream.counter.bad == world.bad
    # reasons survive the trip from the worker processes
    assert stream.counter.reasons["duplicate sample key"] == world.kinds["duplicate_key"] > 0
    assert (
        stream.counter.reasons["unsafe video_id"]
        == world.kinds["parent_video_id"] + world.kinds["absolute_video_id"]
        > 0
    )


# ------------------------------------------------------------------------------------------- regression tests
def test_python_literal_annotation_with_unhashable_key_is_a_value_error():
    with pytest.raises(ValueError, match="not JSON or a Python literal"):
        parse_annotation("{[1]: 2}")


def test_deeply_nested_json_is_a_bad_sample_not_a_crash(tmp_path):
    spec = SourceSpec("t", "text", [str(tmp_path / "d.jsonl")])
    with pytest.raises(BadSample, match="not JSON"):
        decode_record(
            {"__source__": "t", "__url__": spec.shards[0], "__index__": 0, "line": deep_json().encode()}, spec
        )
    wds = SourceSpec("w", "wds", ["x.tar"])
    with pytest.raises(BadSample, match="json member"):
        decode_record(
            {
                "__source__": "w",
                "__url__": "x.tar",
                "__index__": 0,
                "__key__": "k",
                "members": dict((n.split(".", 1)[1], d) for n, d in wds_members("k", 0, "deep_json")),
            },
            wds,
        )


def test_truncated_tar_yields_complete_samples_then_one_bad_record(tmp_path):
    samples = [m for i in range(3) for m in wds_members(f"k{i}", i)]
    data = tar_bytes(samples)
    path = tmp_path / "cut.tar"
    spec = SourceSpec("w", "wds", [str(path)])
    # cut inside the image of k2 (k1 is complete), then inside the caption of k2 (k2 is partial)
    for member in ("k2.jpg", "k2.txt"):
        path.write_bytes(data[: data_offset(data, member) + 10])
        records = list(read_tar(str(path), spec))
        good = [decode_record(r, spec)["__key__"] for r in records[:-1]]
        assert good == ["k0", "k1"]
        with pytest.raises(BadSample, match="truncated shard"):
            decode_record(records[-1], spec)


def test_byte_flipped_images_decode_or_raise_bad_sample():
    """Random byte corruption of JPEG/PNG/WEBP/BMP/GIF and EXIF-rotated JPEG files: every result is an RGB image or
    a :class:`BadSample`; no other exception escapes from the decoder."""
    from unilm_vl.data.decode import decode_image

    rng = random.Random(0)
    originals = []
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, fmt)
        originals.append(buf.getvalue())
    rotated, buf = Image.new("RGB", (8, 4)), io.BytesIO()
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    rotated.save(buf, "JPEG", exif=exif)
    originals.append(buf.getvalue())
    outcomes = {"image": 0, "bad": 0}
    for _ in range(2000):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            assert decode_image(bytes(data)).mode == "RGB"
            outcomes["image"] += 1
        except BadSample:
            outcomes["bad"] += 1
    assert outcomes["image"] > 100 and outcomes["bad"] > 100
