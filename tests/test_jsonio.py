"""The one JSON reader (unilm_vl/data/jsonio.py): values, and one error type with one-line messages naming the file
and the problem; the data streams turn the same errors into counted skips."""

import json
import math
import os
import pickle

import pytest

from unilm_vl.data.jsonio import JsonError, JsonFileNotFoundError, parse_json, read_json


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def read_error(path, what="annotation") -> JsonError:
    with pytest.raises(JsonError) as info:
        read_json(path, what)
    assert "\n" not in str(info.value)
    return info.value


def test_values_round_trip(tmp_path):
    value = {"a": [1, 2.5, None, True], "b": {"c": "\u00e9"}}
    assert read_json(write(tmp_path / "v.json", json.dumps(value).encode()), "data config") == value
    assert parse_json(json.dumps(value)) == value and parse_json(json.dumps(value).encode()) == value
    nan, inf = parse_json("[NaN, Infinity]")  # Python's json accepts them; callers check the values they use
    assert math.isnan(nan) and inf == math.inf


def test_missing_file_is_also_a_file_not_found_error(tmp_path):
    path = str(tmp_path / "nothere.json")
    err = read_error(path, "predictions")
    assert isinstance(err, JsonFileNotFoundError) and isinstance(err, FileNotFoundError)
    assert isinstance(err, ValueError)  # the CLIs' one `error:` line catches ValueError
    assert str(err) == f"predictions file {path}: not found"
    assert (err.where, err.problem) == (f"predictions file {path}", "not found")
    again = pickle.loads(pickle.dumps(err))  # as a loader worker sends it
    assert type(again) is JsonFileNotFoundError and str(again) == str(err) and again.problem == "not found"


def test_directory_cannot_be_read(tmp_path):
    err = read_error(str(tmp_path), "data config")
    assert not isinstance(err, FileNotFoundError)
    assert str(err) == f"data config file {tmp_path}: cannot be read: Is a directory"


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "bad.json", b"[1, 2\n, 3 4]")  # '4' is char 10: line 2 starts at char 6 -> column 5
    assert str(read_error(path)) == (
        f"annotation file {path}: not valid JSON: Expecting ',' delimiter: line 2 column 5 (char 10)"
    )
    empty = write(tmp_path / "empty.json", b"")
    assert str(read_error(empty)) == (
        f"annotation file {empty}: not valid JSON: Expecting value: line 1 column 1 (char 0)"
    )


def test_not_utf8(tmp_path):
    path = write(tmp_path / "latin1.json", b'{"a": "\xff"}')
    assert str(read_error(path)) == f"annotation file {path}: not UTF-8 text (byte 0xff at offset 7)"
    with pytest.raises(JsonError, match=r"^member: not UTF-8 text \(byte 0xff at offset 7\)$"):
        parse_json(b'{"a": "\xff"}', "member")


def test_over_long_integer_and_deep_nesting(tmp_path):
    long_int = write(tmp_path / "long.json", b'{"n": ' + b"9" * 5000 + b"}")
    assert str(read_error(long_int)).startswith(
        f"annotation file {long_int}: not valid JSON: Exceeds the limit (4300 digits) for integer string conversion"
    )
    deep = write(tmp_path / "deep.json", b"[" * 100_000 + b"]" * 100_000)
    assert str(read_error(deep)) == f"annotation file {deep}: not valid JSON: nested too deeply for the parser"
    with pytest.raises(JsonError, match=r"^line: not valid JSON: nested too deeply for the parser$"):
        parse_json("[" * 100_000 + "]" * 100_000, "line")


def test_frames_annotation_errors_are_one_counted_reason(tmp_path):
    """A missing or broken annotation file of a frames source is one error record; its reason (the text before the
    first colon, what BadSampleCounter counts) is the same for every problem."""
    from unilm_vl.data.sources import SourceSpec, read_frames_annotation

    spec = SourceSpec(name="clips", kind="frames", shards=[], frames_root=str(tmp_path))
    broken = write(tmp_path / "broken.json", b"[{")
    for path in (str(tmp_path / "missing.json"), broken, str(tmp_path)):
        (record,) = list(read_frames_annotation(path, spec))
        assert record["__error__"].split(":")[0] == "unreadable annotation"
        assert path in record["__error__"]


def test_ensure_world_regenerates_an_unreadable_manifest(tmp_path):
    from unilm_vl.data.synthetic import ensure_world

    out = tmp_path / "w"
    kw = dict(seed=1, num_train=2, num_val=1, num_test=1, num_videos=0, workers=1)
    first = ensure_world(str(out), **kw)
    (out / "world.json").write_bytes(b'{"format_version": ')  # a cut manifest
    again = ensure_world(str(out), **kw)
    assert again["counts"] == first["counts"] and json.loads((out / "world.json").read_text())["args"] == first["args"]
    assert os.path.isfile(out / "eval" / "karpathy.json")
