"""Sources and decoding: every format reads, and every kind of bad input is skipped, counted and named."""

import gzip
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from unilm_vl.data.decode import BadSample, BadSampleCounter, TooManyBadSamples, decode_image, load_image
from unilm_vl.data.formats import GRIT_TSV, escape_field, parse_annotation, unescape_field
from unilm_vl.data.pipeline import StreamPlan, worker_batches
from unilm_vl.data.shards import expand_urls
from unilm_vl.data.sources import FileSpan, SourceSpec, decode_record, parse_data_spec, read_tar, read_tsv

from conftest import jpeg_bytes, tsv_row, write_tsv, write_wds


def keys_of(plan, epoch=1, num_batches=1000):
    """All keys a single-worker validation-style pass yields, plus the counter state of the last batch."""
    out, meta = [], None
    for batch, meta in worker_batches(plan, epoch, 0, 0, num_batches):
        if batch:
            out.extend(batch)
    return out, meta


def collect_keys(samples):
    return [s["__key__"] for s in samples]


def plan_for(sources, batch_size=4, **kw):
    kw.setdefault("train", False)
    kw.setdefault("shuffle", False)
    return StreamPlan(sources=sources, stages=[], collate=collect_keys, batch_size=batch_size, **kw)


# ------------------------------------------------------------------------------------------- formats
def test_escape_roundtrip_and_annotation_forms():
    text = "tab\there\nnew line \\ back\\slash\r"
    assert "\t" not in escape_field(text) and "\n" not in escape_field(text)
    assert unescape_field(escape_field(text)) == text
    assert parse_annotation('{"phrase": [[0, 5, 0.1, 0.2, 0.3, 0.4, 0.9]]}') == {
        "phrase": [[0, 5, 0.1, 0.2, 0.3, 0.4, 0.9]]
    }
    # the original GRIT writer's str(dict) form
    assert parse_annotation("{'phrase': [[0, 5, 0.1, 0.2, 0.3, 0.4, 0.9]], 'expression_v1': []}")["expression_v1"] == []
    with pytest.raises(ValueError, match="annotation"):
        parse_annotation("{not valid")


def test_tsv_caption_with_tab_and_newline_roundtrips(tmp_path):
    row = tsv_row(0, "red")
    row["caption"] = "a red\tpicture\nwith two lines"
    parsed = GRIT_TSV.parse_row(GRIT_TSV.format_row(row))
    assert parsed["caption"] == row["caption"]
    assert parsed["width"] == 40 and parsed["annotation"] == {"phrase": [], "expression_v1": []}


def test_expand_urls_braces_globs_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    assert [os.path.basename(p) for p in expand_urls(str(tmp_path / "s-{000..002}.tar"))] == [
        "s-000.tar",
        "s-001.tar",
        "s-002.tar",
    ]
    assert len(expand_urls(f"{tmp_path}/s-000.tar::{tmp_path}/s-00[12].tar")) == 3
    with pytest.raises(FileNotFoundError, match="s-003.tar"):
        expand_urls(str(tmp_path / "s-{000..003}.tar"))


# ------------------------------------------------------------------------------------------- decoding
def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_decode_modes_to_rgb():
    gray = decode_image(_png(Image.new("L", (4, 3), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    cmyk = io.BytesIO()
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(cmyk, "JPEG")
    r, g, b = decode_image(cmyk.getvalue()).getpixel((1, 1))
    assert r > 200 and g < 40 and b < 40  # CMYK (0,255,255,0) is red
    # palette PNG with a fully transparent index: composited on white, not black
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([0, 0, 0] * 256)
    assert decode_image(_png(pal, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))
    assert decode_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 3), (0, 0, 0, 128))
    assert decode_image(_png(half)).getpixel((0, 0)) == (127, 127, 127)
    deep = Image.new("I;16", (4, 3), 65535)
    assert decode_image(_png(deep)).getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_rotation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 4))  # the left strip is now at the top
    assert b > 200 and r < 60


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty image"),
        (b"not an image at all", "undecodable"),
        (jpeg_bytes((1, 2, 3))[:60], "undecodable"),  # truncated JPEG
    ],
)
def test_decode_bad_bytes_raise_badsample(data, reason):
    with pytest.raises(BadSample, match=reason):
        decode_image(data, source="x.tar#k")


def test_load_image_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(str(tmp_path / "nope.jpg"))


def test_counter_stops_with_message_naming_file_and_column():
    counter = BadSampleCounter("demo", log_every=1000, max_bad_fraction=0.15, min_samples=10)
    for _ in range(8):
        counter.ok()
    counter.skip(BadSample("undecodable image", "shard-7.tsv:3", "image"))
    with pytest.raises(TooManyBadSamples, match=r"shard-7.tsv:4.*'image'"):
        counter.skip(BadSample("undecodable image", "shard-7.tsv:4", "image"))
    assert counter.state()["bad"] == 2


# ------------------------------------------------------------------------------------------- TSV and tar shards
def test_tsv_bad_rows_are_skipped_and_counted(tmp_path):
    write_tsv(str(tmp_path / "tsv" / "part"), 12, 6)
    shard = tmp_path / "tsv" / "part-00000.tsv"
    good_lines = shard.read_bytes().splitlines(keepends=True)
    bad_lines = [
        b"only\ttwo\n",  # wrong column count
        GRIT_TSV.format_row({**tsv_row(100, "red"), "image": "@@@notbase64"}).encode() + b"\n",
        GRIT_TSV.format_row(tsv_row(101, "red", jpeg_bytes((9, 9, 9))[:50])).encode() + b"\n",  # truncated JPEG
        GRIT_TSV.format_row({**tsv_row(102, "red"), "width": "wide"}).encode() + b"\n",  # non-integer
        GRIT_TSV.format_row({**tsv_row(103, "red"), "caption": "   "}).encode() + b"\n",  # empty caption
        b"\xff\xfe\tnot utf8\n",
        GRIT_TSV.format_row({**tsv_row(104, "red"), "annotation": "{broken"}).encode() + b"\n",
    ]
    shard.write_bytes(b"".join(good_lines[:3] + bad_lines + good_lines[3:]))
    spec = parse_data_spec(str(tmp_path / "tsv" / "part-*.tsv"))[0]
    assert spec.kind == "tsv"
    plan = plan_for([spec], max_bad_fraction=0.9)
    keys, meta = keys_of(plan)
    assert keys == [f"{i:06d}" for i in range(12)]  # every good sample, in order
    assert meta["bad"] == 7 and meta["good"] == 12
    assert meta["reasons"]["malformed row"] == 3 and meta["reasons"]["undecodable image"] == 1


def test_tar_corrupt_members_and_truncation_are_counted(tmp_path):
    write_wds(str(tmp_path / "wds" / "part"), 10, 10)
    src = tmp_path / "wds" / "part-00000.tar"
    fixed = tmp_path / "bad" / "part-00000.tar"
    fixed.parent.mkdir()
    with tarfile.open(src) as tin, tarfile.open(fixed, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            key, ext = info.name.split(".", 1)
            if key == "000002" and ext == "jpg":
                data = b"garbage"
            if key == "000004" and ext == "txt":
                continue  # missing caption member
            if key == "000005" and ext == "txt":
                data = b"\xff\xfe\xfa"  # non-UTF-8 caption
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    spec = SourceSpec(name="bad", kind="wds", shards=[str(fixed)])
    keys, meta = keys_of(plan_for([spec], max_bad_fraction=0.9))
    assert keys == ["000000", "000001", "000003", "000006", "000007", "000008", "000009"]
    assert meta["bad"] == 3
    # truncate the tar in the middle of the 8th sample: the first 7 samples survive, the damage is one counted record
    data = fixed.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * 0.75)])
    records = list(read_tar(str(cut), SourceSpec(name="cut", kind="wds", shards=[str(cut)])))
    assert "__error__" in records[-1]
    keys, meta = keys_of(plan_for([SourceSpec(name="cut", kind="wds", shards=[str(cut)])], max_bad_fraction=0.9))
    assert len(keys) + meta["bad"] == len(records)
    # an empty (zero-length) tar is one counted bad record, not a crash
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    keys, meta = keys_of(plan_for([SourceSpec(name="e", kind="wds", shards=[str(empty)])], max_bad_fraction=1.0))
    assert keys == [] and meta["bad"] == 1


def test_too_many_bad_samples_stops_with_clear_error(tmp_path):
    shard = tmp_path / "junk.tsv"
    shard.write_text("".join(f"row{i}\tonly two\n" for i in range(200)))
    plan = plan_for([SourceSpec(name="junk", kind="tsv", shards=[str(shard)])], max_bad_fraction=0.1)
    with pytest.raises(TooManyBadSamples, match=r"junk.tsv:\d+.*'row'"):
        keys_of(plan)


def test_caption_key_from_json(tmp_path):
    from unilm_vl.data.formats import WdsShardWriter

    with WdsShardWriter(str(tmp_path / "p"), 10) as w:
        w.write("k0", jpeg_bytes((1, 1, 1)), "jpg", "txt caption", {"coca": "json caption"})
        w.write("k1", jpeg_bytes((1, 1, 1)), "jpg", "txt caption", {"other": 1})
    spec = SourceSpec(name="c", kind="wds", shards=[str(tmp_path / "p-00000.tar")], caption_key="coca")
    plan = plan_for([spec], max_bad_fraction=1.0)
    plan.collate = lambda samples: [s["caption"] for s in samples]
    caps, meta = keys_of(plan)
    assert caps == ["json caption"] and meta["bad"] == 1


# ------------------------------------------------------------------------------------------- frames and configs
def test_frames_source_counts_missing_and_empty_videos(tmp_path):
    frames = tmp_path / "frames"
    for vid, n in (("v0", 3), ("v2", 2)):
        (frames / vid).mkdir(parents=True)
        for j in range(n):
            Image.new("RGB", (8, 8), (j * 50, 0, 0)).save(frames / vid / f"frame_{j + 1:04d}.jpg")
    (frames / "v1").mkdir()  # empty directory
    ann = tmp_path / "train.json"
    ann.write_text(
        json.dumps(
            [
                {"video_id": "v0", "desc": "a clip"},
                {"video_id": "v1", "desc": "empty"},
                {"video_id": "v9", "caption": "missing"},
                {"video_id": "v2", "desc": ["x", "y"]},
            ]
        )
    )
    spec = parse_data_spec(str(ann))[0]
    assert spec.kind == "frames" and spec.frames_root == str(frames)
    plan = plan_for([spec], max_bad_fraction=1.0)
    plan.collate = lambda samples: [(s["__key__"], len(s["frames"]), s["caption"]) for s in samples]
    out, meta = keys_of(plan)
    assert out == [("v0", 3, "a clip"), ("v2", 2, "x")]
    assert meta["bad"] == 2 and meta["reasons"] == {"missing video directory": 1, "empty frame directory": 1}


def test_json_config_mixture_paths_relative_to_config(tmp_path):
    write_wds(str(tmp_path / "a" / "part"), 20, 10)
    write_tsv(str(tmp_path / "b" / "part"), 20, 10)
    cfg = tmp_path / "json" / "train.json"
    cfg.parent.mkdir()
    cfg.write_text(
        json.dumps(
            [
                {"source": ["../a/part-{00000..00001}.tar"], "name": "a", "weight": 3.0},
                {
                    "source": ["../b/part-00000.tsv", "../b/part-00001.tsv"],
                    "name": "b",
                    "weight": 1.0,
                    "source_lang": "grit",
                },
            ]
        )
    )
    specs = parse_data_spec("json/train.json", root=str(tmp_path))
    assert [(s.name, s.kind, len(s.shards), s.weight) for s in specs] == [("a", "wds", 2, 3.0), ("b", "tsv", 2, 1.0)]


def test_tar_cut_at_a_header_boundary_is_counted(tmp_path):
    write_wds(str(tmp_path / "w" / "part"), 6, 6)
    full = (tmp_path / "w" / "part-00000.tar").read_bytes()
    with tarfile.open(tmp_path / "w" / "part-00000.tar") as tar:
        members = tar.getmembers()
    cut_at = members[9].offset  # the header of the 4th sample's first member: a clean block boundary
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[:cut_at])
    spec = SourceSpec(name="cut", kind="wds", shards=[str(cut)])
    records = list(read_tar(str(cut), spec))
    # the third sample is complete; the cut itself is one more record, counted as bad when decoded
    assert [r["__key__"] for r in records] == ["000000", "000001", "000002", None]
    assert "truncated" in records[-1]["__error__"] and "__error__" not in records[2]


def write_members(path, names):
    """A tar of ``names`` (``key.ext``): ``jpg`` members hold a JPEG, ``txt`` members the caption 'a <key>'."""
    with tarfile.open(path, "w") as tar:
        for name in names:
            key, ext = name.split(".")
            data = jpeg_bytes((200, 10, 10)) if ext == "jpg" else f"a {key}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_sample_repeated_back_to_back_is_a_counted_duplicate(tmp_path):
    """x written twice in a row is not one merged sample: the first copy is good, the repeat one bad record."""
    path = tmp_path / "dup.tar"
    write_members(path, ["x.jpg", "x.txt", "x.jpg", "x.txt", "y.jpg", "y.txt"])
    spec = SourceSpec(name="d", kind="wds", shards=[str(path)])
    assert [r["__key__"] for r in read_tar(str(path), spec)] == ["x", "x", "y"]
    keys, meta = keys_of(plan_for([spec], max_bad_fraction=1.0))
    assert keys == ["x", "y"] and meta["bad"] == 1 and meta["reasons"] == {"duplicate sample key": 1}
    bad = []
    for record in read_tar(str(path), spec):
        try:
            decode_record(record, spec)
        except BadSample as exc:
            bad.append(exc)
    assert [exc.source for exc in bad] == [f"{path}#x"]  # named by shard and key


def test_empty_shards_are_one_counted_bad_record_each(tmp_path):
    """A valid but empty tar, an empty TSV and an empty annotation list: one "empty shard" record each, so the
    shard is counted and logged (and a rank whose only shard is empty does not stop the run at start-up)."""
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    (tmp_path / "empty.tsv").write_bytes(b"\n\n")
    (tmp_path / "frames").mkdir()
    (tmp_path / "empty.json").write_text("[]")
    specs = [
        SourceSpec(name="w", kind="wds", shards=[str(tmp_path / "empty.tar")]),
        SourceSpec(name="t", kind="tsv", shards=[str(tmp_path / "empty.tsv")]),
        SourceSpec(
            name="f", kind="frames", shards=[str(tmp_path / "empty.json")], frames_root=str(tmp_path / "frames")
        ),
    ]
    for spec in specs:
        keys, meta = keys_of(plan_for([spec], max_bad_fraction=1.0))
        assert keys == [] and meta["bad"] == 1 and meta["reasons"] == {"empty shard": 1}, spec.kind


@pytest.mark.parametrize(
    "video_id, reason",
    [
        ("../outside", "unsafe video_id"),
        ("a/../../outside", "unsafe video_id"),
        ("..", "unsafe video_id"),
        (".", "unsafe video_id"),
        ("", "unsafe video_id"),
        ("/abs/outside", "unsafe video_id"),
        (["v0"], "video_id must be a string or an integer"),
        (True, "video_id must be a string or an integer"),
    ],
)
def test_video_ids_outside_the_frames_root_are_refused(tmp_path, video_id, reason):
    """The frames of ``../outside`` exist, but a video_id may only name a folder inside the frames root."""
    for vid in ("frames/v0", "outside"):
        (tmp_path / vid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / vid / "frame_0001.jpg")
    if video_id == "/abs/outside":
        video_id = str(tmp_path / "outside")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"video_id": video_id, "desc": "escape"}, {"video_id": "v0", "desc": "a clip"}]))
    plan = plan_for(parse_data_spec(str(ann)), max_bad_fraction=1.0)
    keys, meta = keys_of(plan)
    assert keys == ["v0"] and meta["bad"] == 1 and meta["reasons"] == {reason: 1}


def test_a_megabyte_caption_is_cut_before_tokenising():
    """encode_batch tokenises at most context_length * MAX_CHARS_PER_TOKEN characters, and the tokens of natural
    text are those of the uncut text."""
    from unilm_vl.data.stages import Tokenize
    from unilm_vl.data.tokenizers import MAX_CHARS_PER_TOKEN, OpenClipTokenizer

    class Recording(OpenClipTokenizer):
        lengths = []

        def encode(self, text):
            self.lengths.append(len(text))
            return super().encode(text)

    caption = "a photo of a small dog running on the green grass. " * 20_000  # ~1 MB
    tokenizer = Recording(context_length=77)
    sample = Tokenize(tokenizer, 77)({"caption": caption})
    assert Recording.lengths == [77 * MAX_CHARS_PER_TOKEN]
    uncut = tokenizer.encode(caption[:20_000])  # far more than 77 tokens, nothing of them cut
    assert sample["text"].tolist() == [tokenizer.bos_id] + uncut[:75] + [tokenizer.eos_id]


def test_uncompressed_shards_give_positions_that_read_the_same_bytes(tmp_path):
    """An uncompressed tar's records hold each member's position (read by the decoding process), a gzip tar's the
    bytes; both decode to the same samples. A tsv source's lines are positions, a text source's lines bytes."""
    write_wds(str(tmp_path / "wds" / "part"), 4, 4)
    plain = tmp_path / "wds" / "part-00000.tar"
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with tarfile.open(plain) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    by_position = list(read_tar(str(plain), SourceSpec("p", "wds", [str(plain)])))
    by_stream = list(read_tar(str(packed), SourceSpec("g", "wds", [str(packed)])))
    assert (
        [r["__key__"] for r in by_position]
        == [r["__key__"] for r in by_stream]
        == ["000000", "000001", "000002", "000003"]
    )
    for pos, streamed in zip(by_position, by_stream):
        assert set(pos["members"]) == set(streamed["members"]) == {"jpg", "txt", "json"}
        for ext, span in pos["members"].items():
            assert isinstance(span, FileSpan) and span.path == str(plain)
            assert span.read() == streamed["members"][ext] == stored[f"{pos['__key__']}.{ext}"]
        a, b = (
            decode_record(pos, SourceSpec("p", "wds", [str(plain)])),
            decode_record(streamed, SourceSpec("g", "wds", [])),
        )
        assert a["caption"] == b["caption"] and a["meta"] == b["meta"]
        assert a["image"].tobytes() == b["image"].tobytes()

    write_tsv(str(tmp_path / "tsv" / "part"), 3, 3)
    tsv = tmp_path / "tsv" / "part-00000.tsv"
    lines = tsv.read_bytes().splitlines(keepends=True)
    records = list(read_tsv(str(tsv), SourceSpec("t", "tsv", [str(tsv)])))
    assert [r["line"].read() for r in records] == lines
    text = tmp_path / "docs.txt"
    text.write_bytes(b"one document\n\nanother\n")
    assert [r["line"] for r in read_tsv(str(text), SourceSpec("x", "text", [str(text)]))] == [
        b"one document\n",
        b"another\n",
    ]


def test_a_shard_cut_after_its_records_were_read_is_a_bad_sample_naming_it(tmp_path):
    """Records are read (positions) before their data: a shard cut in between makes the sample whose data is
    gone one bad sample, naming the shard, the key, the member and how many bytes were missing; earlier samples
    still decode."""
    write_wds(str(tmp_path / "wds" / "part"), 3, 3)
    shard = tmp_path / "wds" / "part-00000.tar"
    spec = SourceSpec("w", "wds", [str(shard)])
    records = list(read_tar(str(shard), spec))
    meta = records[2]["members"]["json"]
    shard.write_bytes(shard.read_bytes()[: meta.offset + 5])
    assert decode_record(records[0], spec)["__key__"] == "000000"
    with pytest.raises(BadSample, match=rf"cannot read json: read 5 of {meta.size} bytes") as err:
        decode_record(records[2], spec)
    assert err.value.source == f"{shard}#000002" and err.value.field == "json"


def test_spans_read_through_a_few_cached_descriptors(tmp_path):
    """Spans of many files read the right bytes while this process keeps at most ``_MAX_OPEN_SHARDS`` of them open
    (the most recent ones), closing the others."""
    from unilm_vl.data import sources

    before = len(os.listdir("/proc/self/fd"))
    files = []
    for i in range(3 * sources._MAX_OPEN_SHARDS):
        path = tmp_path / f"shard{i}.bin"
        path.write_bytes(bytes(range(i, i + 50)))
        files.append(str(path))
    for _ in range(2):
        for i, path in enumerate(files):
            assert FileSpan(path, 10, 5).read() == bytes(range(i + 10, i + 15))
            assert len(sources._OPEN_SHARDS) <= sources._MAX_OPEN_SHARDS
    assert list(sources._OPEN_SHARDS) == files[-sources._MAX_OPEN_SHARDS :]
    assert len(os.listdir("/proc/self/fd")) <= before + sources._MAX_OPEN_SHARDS
