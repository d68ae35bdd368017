"""prepare_grit: img2dataset folders and tars of GRIT -> GRIT TSV shards, sizes.json and json/train.json."""

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from unilm_vl.data.formats import GRIT_TSV
from unilm_vl.data.prepare_grit import build_row, convert, main, split_member_name

NOUN_CHUNKS = [[0, 13, 0.0, 0.0, 1.0, 1.0, 0.8], [19, 33, 0.28, 0.1, 0.97, 0.9, 0.7]]
REF_EXPS = [[0, 66, 0.0, 0.0, 1.0, 1.0, 0.8]]


def image_bytes(size=(40, 30), color=(200, 30, 30), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def grit_record(caption, key, width=1024, height=693, **extra):
    record = {
        "caption": caption,
        "width": width,
        "height": height,
        "noun_chunks": NOUN_CHUNKS,
        "ref_exps": REF_EXPS,
        "id": 1000 + int(key),
        "url": f"http://example.com/{key}.jpg",
        "clip_similarity_vitb32": 0.3,
        "key": key,
        "status": "success",
    }
    record.update(extra)
    return record


def build_samples():
    """(key, {ext: bytes}) of one img2dataset shard: 3 good samples and 5 bad ones, one per reason."""
    good_png = image_bytes((50, 20), (0, 0, 255), "PNG")
    no_size = grit_record("a blue png without size", "000000002")
    del no_size["width"], no_size["height"]
    return [
        (
            "000000000",
            {
                "jpg": image_bytes(),
                "json": grit_record("a wire hanger with a paper cover", "000000000"),
                "txt": b"a wire hanger with a paper cover",
            },
        ),
        (
            "000000001",
            {
                "jpg": image_bytes((30, 30), (10, 200, 10)),
                "json": grit_record("tab\there and a\nnewline \\t literal", "000000001", 640, 480),
            },
        ),
        ("000000002", {"png": good_png, "json": no_size}),
        ("000000003", {"jpg": b"\xff\xd8 this is not a jpeg", "json": grit_record("corrupt image", "000000003")}),
        ("000000004", {"jpg": image_bytes()}),  # missing json
        ("000000005", {"json": grit_record("no image", "000000005")}),  # missing image
        ("000000006", {"jpg": image_bytes(), "json": {"width": 10, "height": 10, "noun_chunks": []}}),  # no caption
        ("000000007", {"jpg": image_bytes(), "json": b"{not json"}),  # unreadable json
    ]


GOOD_KEYS = ["000000000", "000000001", "000000002"]
EXPECTED_SKIPS = {"missing json": 1, "missing image": 1, "missing caption": 1, "bad json": 1, "undecodable image": 1}


def _member_bytes(ext, value):
    if ext == "json" and not isinstance(value, bytes):
        return json.dumps(value).encode("utf-8")
    return value


def write_files_layout(root):
    """img2dataset ``files`` output: a ``00000/`` folder of key.ext files, plus its stats and parquet files."""
    shard = root / "00000"
    shard.mkdir(parents=True)
    for key, members in build_samples():
        for ext, value in members.items():
            (shard / f"{key}.{ext}").write_bytes(_member_bytes(ext, value))
    (root / "00000_stats.json").write_text(json.dumps({"count": 8, "successes": 7}))
    (root / "00000.parquet").write_bytes(b"PAR1")
    return root


def write_tar(path):
    with tarfile.open(path, "w") as tar:
        for key, members in build_samples():
            for ext, value in members.items():
                data = _member_bytes(ext, value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def read_rows(out_dir):
    config = json.loads((out_dir / "json" / "train.json").read_text())
    rows = []
    for rel in config[0]["source"]:
        with open(os.path.join(out_dir / "json", rel), encoding="utf-8") as fh:
            rows.extend(GRIT_TSV.parse_row(line) for line in fh)
    return config, rows


def expected_image(key):
    return dict(build_samples())[key][{"000000002": "png"}.get(key, "jpg")]


def check_good_rows(rows):
    assert len(rows) == 3
    captions = [dict(build_samples())[k]["json"]["caption"] for k in GOOD_KEYS]
    assert [row["caption"] for row in rows] == captions  # sorted key order; tab/newline round-trip
    for key, row in zip(GOOD_KEYS, rows):
        data = base64.b64decode(row["image"])
        assert data == expected_image(key)  # original bytes by default
        assert row["id"] == hashlib.md5(data).hexdigest()
        assert row["annotation"] == {"phrase": NOUN_CHUNKS, "expression_v1": REF_EXPS}
    assert [(r["width"], r["height"]) for r in rows] == [(1024, 693), (640, 480), (50, 20)]  # last: decoded size


def test_split_member_name():
    assert split_member_name("00000/000001.jpg") == ("00000/000001", "jpg")
    assert split_member_name("000001.JSON") == ("000001", "json")
    assert split_member_name("README") == ("README", "")


def test_files_layout(tmp_path, caplog):
    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="unilm_vl.data.prepare_grit"):
        assert main(["--input", str(src), "--out", str(out), "--shard-size", "2"]) == 0
    config, rows = read_rows(out)
    check_good_rows(rows)

    assert config == [
        {
            "source": ["../tsv/grit-00000.tsv", "../tsv/grit-00001.tsv"],
            "source_lang": "grit",
            "weight": 1.0,
            "name": "grit",
        }
    ]
    sizes = json.loads((out / "tsv" / "sizes.json").read_text())
    assert sizes == {"grit-00000.tsv": 2, "grit-00001.tsv": 1}
    # One physical line per row although a caption holds a newline.
    assert len((out / "tsv" / "grit-00000.tsv").read_text(encoding="utf-8").splitlines()) == 2

    log = caplog.text
    assert (
        "converted 3, skipped 5 (bad json: 1, missing caption: 1, missing image: 1, missing json: 1, "
        "undecodable image: 1)" in log
    )
    for key in ("000000003", "000000004", "000000005", "000000006", "000000007"):
        assert key in log, f"the skip of {key} is not logged with its path"
    assert "00000_stats" not in log


def test_tar_layout_and_determinism(tmp_path):
    tars = tmp_path / "wds"
    tars.mkdir()
    write_tar(tars / "00000.tar")
    (tars / "00000_stats.json").write_text("{}")
    summary = convert([str(tars)], str(tmp_path / "a"))
    assert (summary.converted, dict(summary.skipped)) == (3, EXPECTED_SKIPS)
    _, rows = read_rows(tmp_path / "a")
    check_good_rows(rows)

    # A tar file given directly, twice into another folder: byte-identical shards.
    convert([str(tars / "00000.tar")], str(tmp_path / "b"))
    assert (tmp_path / "a" / "tsv" / "grit-00000.tsv").read_bytes() == (
        tmp_path / "b" / "tsv" / "grit-00000.tsv"
    ).read_bytes()


def test_several_inputs_keep_order_and_count(tmp_path):
    files = write_files_layout(tmp_path / "files")
    tar = write_tar(tmp_path / "extra.tar")
    summary = convert([str(files), str(tar)], str(tmp_path / "out"), shard_size=4, name="grit_mix")
    assert summary.converted == 6 and summary.n_skipped == 10
    config = json.loads((tmp_path / "out" / "json" / "train.json").read_text())
    assert config[0]["name"] == "grit_mix"
    assert config[0]["source"] == ["../tsv/grit_mix-00000.tsv", "../tsv/grit_mix-00001.tsv"]
    _, rows = read_rows(tmp_path / "out")
    assert [r["caption"] for r in rows[:3]] == [r["caption"] for r in rows[3:]]


def test_reencode_jpeg(tmp_path):
    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    assert main(["--input", str(src), "--out", str(out), "--reencode-jpeg"]) == 0
    _, rows = read_rows(out)
    for key, row in zip(GOOD_KEYS, rows):
        data = base64.b64decode(row["image"])
        assert data[:2] == b"\xff\xd8", "not a JPEG"
        assert row["id"] == hashlib.md5(data).hexdigest()
        assert Image.open(io.BytesIO(data)).size == Image.open(io.BytesIO(expected_image(key))).size
    assert base64.b64decode(rows[2]["image"]) != expected_image("000000002")  # the PNG was re-encoded


@pytest.mark.parametrize("cut", ["half", "member_boundary"])
def test_corrupt_and_truncated_tars_are_reported(tmp_path, cut):
    folder = tmp_path / "wds"
    folder.mkdir()
    write_tar(folder / "00000.tar")
    full = (folder / "00000.tar").read_bytes()
    with tarfile.open(folder / "00000.tar") as tar:
        sixth_header = tar.getmembers()[5].offset  # after 0.jpg 0.json 0.txt 1.jpg 1.json
    (folder / "00001.tar").write_bytes(b"garbage, not a tar" * 10)
    (folder / "00002.tar").write_bytes(full[: len(full) // 2] if cut == "half" else full[:sixth_header])
    summary = convert([str(folder)], str(tmp_path / "out"))
    # 00000 is intact; 00002 still yields the samples before the cut (keys 0 and 1 are its first 5 members).
    assert summary.converted >= 5
    assert summary.skipped["unreadable tar"] == 2  # the garbage file and the cut one


def test_webdataset_writer_tar_reads_cleanly(tmp_path):
    from unilm_vl.data.formats import WdsShardWriter

    with WdsShardWriter(str(tmp_path / "wds" / "part"), samples_per_shard=2) as writer:
        for key in GOOD_KEYS:
            record = dict(build_samples())[key]["json"]
            writer.write(key, expected_image(key), {"000000002": "png"}.get(key, "jpg"), record["caption"], record)
    summary = convert([str(tmp_path / "wds")], str(tmp_path / "out"))
    assert (summary.converted, summary.n_skipped) == (3, 0)
    _, rows = read_rows(tmp_path / "out")
    check_good_rows(rows)


def test_existing_shards_need_overwrite(tmp_path):
    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    assert main(["--input", str(src), "--out", str(out), "--shard-size", "1"]) == 0
    assert main(["--input", str(src), "--out", str(out)]) == 2
    assert main(["--input", str(src), "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out / "tsv")) == ["grit-00000.tsv", "sizes.json"]
    assert json.loads((out / "tsv" / "sizes.json").read_text()) == {"grit-00000.tsv": 3}


def test_config_keeps_other_names(tmp_path):
    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    convert([str(src)], str(out), name="grit_a")
    convert([str(src)], str(out), name="grit_b")
    convert([str(src)], str(out), name="grit_a", overwrite=True)
    config = json.loads((out / "json" / "train.json").read_text())
    assert [entry["name"] for entry in config] == ["grit_b", "grit_a"]


def test_bad_arguments(tmp_path):
    assert main(["--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--input", str(empty), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out" / "json" / "train.json").exists()


def test_build_row_parses_string_annotations(tmp_path):
    from unilm_vl.data.prepare_grit import RawSample

    meta = grit_record("a dog", "000000009", noun_chunks=json.dumps(NOUN_CHUNKS), ref_exps=str(REF_EXPS))
    sample = RawSample("mem", lambda: json.dumps(meta).encode(), lambda: image_bytes())
    row = build_row(sample)
    assert row["annotation"] == {"phrase": NOUN_CHUNKS, "expression_v1": REF_EXPS}


def test_module_cli(tmp_path):
    src = write_files_layout(tmp_path / "download")
    proc = subprocess.run(
        [sys.executable, "-m", "unilm_vl.data.prepare_grit", "--input", str(src), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted 3, skipped 5" in proc.stderr


def test_deeply_nested_json_is_a_counted_skip(tmp_path):
    """json that the parser cannot nest into (RecursionError) or an integer of more digits than Python parses is
    a bad sample like any other; the rest converts."""
    folder = tmp_path / "download" / "00000"
    folder.mkdir(parents=True)
    for key, meta in (
        (
            "000000000",
            json.dumps(grit_record("a good one", "000000000", width=float("inf"), height=float("nan"))).encode(),
        ),
        ("000000001", b"[" * 100_000 + b"]" * 100_000),
        ("000000002", b'{"caption": "x", "width": ' + b"9" * 5000 + b"}"),
    ):
        (folder / f"{key}.jpg").write_bytes(image_bytes())
        (folder / f"{key}.json").write_bytes(meta)
    summary = convert([str(tmp_path / "download")], str(tmp_path / "out"))
    assert (summary.converted, dict(summary.skipped)) == (1, {"bad json": 2})
    _, rows = read_rows(tmp_path / "out")
    assert (rows[0]["width"], rows[0]["height"]) == (40, 30)  # Infinity / NaN sizes: the decoded image's


def test_a_failed_conversion_leaves_no_partial_output(tmp_path, monkeypatch):
    """A conversion that dies after writing rows (here: an unexpected error on the 3rd sample) leaves the output
    folder as it was: first empty, then, with --overwrite over an earlier run, with the earlier shards and config."""
    from unilm_vl.data import prepare_grit

    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    real_build_row, calls = prepare_grit.build_row, []

    def failing_build_row(sample, reencode_jpeg=False):
        calls.append(sample.source)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_build_row(sample, reencode_jpeg)

    monkeypatch.setattr(prepare_grit, "build_row", failing_build_row)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert([str(src)], str(out), shard_size=1)
    assert os.listdir(out / "tsv") == [] and not (out / "json").exists()

    monkeypatch.setattr(prepare_grit, "build_row", real_build_row)
    convert([str(src)], str(out), shard_size=2)
    before = {
        p: (out / p).read_bytes()
        for p in ("tsv/grit-00000.tsv", "tsv/grit-00001.tsv", "tsv/sizes.json", "json/train.json")
    }
    calls.clear()
    monkeypatch.setattr(prepare_grit, "build_row", failing_build_row)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert([str(src)], str(out), shard_size=1, overwrite=True)
    assert sorted(os.listdir(out / "tsv")) == ["grit-00000.tsv", "grit-00001.tsv", "sizes.json"]
    assert {p: (out / p).read_bytes() for p in before} == before


def test_overwrite_with_fewer_shards_removes_the_older_ones(tmp_path):
    src = write_files_layout(tmp_path / "download")
    out = tmp_path / "out"
    convert([str(src)], str(out), shard_size=1)
    convert([str(src)], str(out), shard_size=2, overwrite=True)
    assert sorted(os.listdir(out / "tsv")) == ["grit-00000.tsv", "grit-00001.tsv", "sizes.json"]
    assert json.loads((out / "tsv" / "sizes.json").read_text()) == {"grit-00000.tsv": 2, "grit-00001.tsv": 1}


def test_repeated_tar_member_is_a_counted_skip(tmp_path):
    """A tar that holds a sample's members twice: the first copy converts, the repeats are counted."""
    members = [
        (f"000000000.{ext}", _member_bytes(ext, value))
        for ext, value in dict(build_samples())["000000000"].items()
        if ext != "txt"
    ]
    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for name, data in members * 2:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = convert([str(tmp_path / "dup.tar")], str(tmp_path / "out"))
    assert (summary.converted, dict(summary.skipped)) == (1, {"duplicate tar member": 2})
