"""Sources: read shards into *raw records* and decode raw records into samples.

Reading and decoding are separate on purpose. Raw records are cheap (where a TSV line or a tar sample's members
lie, as :class:`FileSpan` s; an annotation entry): the iterator can replay them to resume mid-epoch without reading
or decoding a single image, and a record that fails to decode is skipped and counted by the pipeline's one handler.

Raw record: ``{"__source__": name, "__url__": shard path, "__index__": position in the shard, ...payload}``.
Sample (after decode): ``{"__key__", "__source__", "image": PIL RGB | "frames": [PIL RGB], "caption": str,
"meta": dict}``.

Kinds:
- ``tsv``: one sample per line under a declared :class:`~unilm_vl.data.formats.TsvSchema`.
- ``wds``: img2dataset tar shards (``<key>.jpg|png|jpeg|webp``, ``<key>.txt``, ``<key>.json``); the caption
  comes from ``txt`` or, with ``caption_key``, from that field of the json.
- ``frames``: a JSON annotation list ``[{"video_id": ..., "caption"|"desc": str | [str]}]`` with frames in
  ``<frames_root>/<video_id>/*.jpg`` (sorted by name). A ``video_id`` must name a folder inside ``frames_root``
  (:func:`video_directory`): an absolute path or a ``..`` component is a bad sample, never read.
- ``text``: text-only documents for language-model mixing, one per line: ``.jsonl`` lines ``{"text": str}`` or
  plain ``.txt`` lines (with ``\n`` escaped as ``\\n`` inside a document). Samples hold ``text`` and no image.

A shard that holds no record at all (a valid but empty tar, an empty TSV, an empty annotation list) yields one
error record, so it is counted and logged as a bad sample like an unreadable one instead of passing unnoticed. A
tar sample whose members repeat (``a.jpg a.txt a.jpg a.txt``: the same key written twice back to back) is two
records, the second an error record ("duplicate sample key"), instead of one silently merged sample.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from .decode import BadSample, decode_image, load_image
from .formats import IMG2DATASET_KEYS, TSV_SCHEMAS, TsvSchema, WdsKeys
from .jsonio import JsonError, parse_json, read_json

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class SourceSpec:
    """One data source: its kind, shards and weight in a mixture."""

    name: str
    kind: str  # "tsv" | "wds" | "frames" | "text"
    shards: List[str]
    weight: float = 1.0
    schema: str = "grit"  # tsv only: a name in formats.TSV_SCHEMAS
    caption_key: str = "txt"  # wds only: "txt" or a field of the json member
    frames_root: Optional[str] = None  # frames only: directory holding <video_id>/ folders
    num_samples: Optional[int] = None  # known size; counted when None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in READERS:
            raise ValueError(f"source {self.name!r}: unknown kind {self.kind!r}; choose from {sorted(READERS)}")
        if self.kind == "tsv" and self.schema not in TSV_SCHEMAS:
            raise ValueError(f"source {self.name!r}: unknown tsv schema {self.schema!r}; known: {sorted(TSV_SCHEMAS)}")
        if self.kind == "frames" and not self.frames_root:
            raise ValueError(f"source {self.name!r}: a frames source needs frames_root")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")


# ----------------------------------------------------------------------------------------------- readers
def _empty_shard(path: str, spec: SourceSpec) -> Dict[str, Any]:
    """The error record standing for a shard without any record (counted like any bad sample)."""
    return {
        "__source__": spec.name,
        "__url__": path,
        "__index__": 0,
        "__key__": None,
        "members": {},
        "__error__": "empty shard: no record in it",
    }


@dataclass(frozen=True)
class FileSpan:
    """``size`` bytes at ``offset`` of the file ``path``: a record field given by position instead of its bytes.

    :func:`read_tar` (uncompressed shards) and :func:`read_tsv` (``tsv`` sources) give these, so the process that
    orders the records (the main one, for exact resume) reads only tar headers or line ends, and the process that
    decodes the record (a loader worker, as in webdataset where each worker reads its own shards) reads the data:
    a record is a few hundred bytes to pickle to a worker instead of its image, and a shuffle buffer holds
    positions. :func:`record_bytes` reads one."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        data = os.pread(_open_shard(self.path), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"read {len(data)} of {self.size} bytes at offset {self.offset}: the file changed")
        return data


# this process's most recently read shards, path -> descriptor: a sample's members (and the next samples) come from
# one shard, and an open per read would cost a metadata round trip each on a network filesystem. pread keeps no
# file position, so descriptors inherited by forked loader workers are safe to share.
_OPEN_SHARDS: "OrderedDict[str, int]" = OrderedDict()
_MAX_OPEN_SHARDS = 8


def _open_shard(path: str) -> int:
    fd = _OPEN_SHARDS.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_OPEN_SHARDS) >= _MAX_OPEN_SHARDS:
            os.close(_OPEN_SHARDS.popitem(last=False)[1])
    _OPEN_SHARDS[path] = fd
    return fd


def record_bytes(value: Any, where: str, field: str) -> bytes:
    """The bytes of a record field: as read, or read now from its :class:`FileSpan`."""
    if not isinstance(value, FileSpan):
        return value
    try:
        return value.read()
    except OSError as exc:
        raise BadSample(f"cannot read {field}: {exc}", where, field) from None


def read_tsv(path: str, spec: SourceSpec) -> Iterator[Dict[str, Any]]:
    """Yield one raw record per line: ``line`` is its :class:`FileSpan` in a ``tsv`` source (an image per line),
    its bytes in a ``text`` one; decoding to text happens in :func:`decode_tsv` / :func:`decode_text`."""
    empty = True
    by_position = spec.kind == "tsv"
    end = 0
    with open(path, "rb") as fh:
        for index, line in enumerate(fh):
            start, end = end, end + len(line)
            if not line.strip():
                continue
            empty = False
            value = FileSpan(path, start, len(line)) if by_position else line
            yield {"__source__": spec.name, "__url__": path, "__index__": index, "line": value}
    if empty:
        yield _empty_shard(path, spec)


def tar_has_end_marker(tar: tarfile.TarFile) -> bool:
    """Whether a zero block follows the last member. ``tarfile`` stops iterating silently when a shard is cut at
    a header boundary; a complete archive ends with two zero blocks, the first of which ends the iteration."""
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


# the first bytes of the compressed streams tarfile's "r|*" mode reads (gzip, bzip2, xz)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def read_tar(path: str, spec: SourceSpec) -> Iterator[Dict[str, Any]]:
    """Yield one raw record per sample key of a tar shard: ``{"members": {ext: FileSpan | bytes}}``: positions
    (:class:`FileSpan`) in an uncompressed shard, the bytes in a gzip, bzip2 or xz one (read as a stream).

    Written on ``tarfile`` rather than webdataset's expanders because we need every problem counted with its
    path (a truncated shard yields its complete samples, then one bad record naming the shard) and exact
    replay for resume. When the cut falls inside a member of the pending sample, that sample is partial and the
    bad record stands for it; when it falls in a later sample's member (or a header), the pending sample is
    yielded first and decoded on its own merits. A member extension that repeats within a key starts a new record
    flagged as a duplicate (an error record); a tar without any sample yields one error record.
    """
    index = 0
    current_key: Optional[str] = None
    members: Dict[str, Any] = {}  # ext -> FileSpan, or bytes in a compressed shard
    duplicate = False  # the pending record repeats the key of the record before it
    reading: Optional[str] = None  # key of the member whose data is being read (None between members): the cut one

    def record(key, members, duplicate):
        out = {"__source__": spec.name, "__url__": path, "__index__": index, "__key__": key, "members": members}
        if duplicate:
            out["__error__"] = f"duplicate sample key: {key!r} repeats its members right after its first copy"
        return out

    try:
        with open(path, "rb") as fh:  # one open: the magic bytes, the size and the archive
            by_position = not fh.read(6).startswith(_COMPRESSED_MAGIC)
            size = os.fstat(fh.fileno()).st_size
            fh.seek(0)
            with tarfile.open(fileobj=fh, mode="r:" if by_position else "r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = os.path.basename(info.name)
                    if "." not in base or base.startswith("."):
                        continue
                    prefix = os.path.dirname(info.name)
                    stem, ext = base.split(".", 1)
                    key = os.path.join(prefix, stem) if prefix else stem
                    reading = key
                    if by_position:  # the data is not read here; a shard cut inside it fails as a stream read would
                        if info.offset_data + info.size > size:
                            raise tarfile.ReadError("unexpected end of data")
                        data = FileSpan(path, info.offset_data, info.size)
                    else:
                        data = tar.extractfile(info).read()
                    reading = None
                    ext = ext.lower()
                    if key != current_key or ext in members:
                        if current_key is not None:
                            yield record(current_key, members, duplicate)
                            index += 1
                        duplicate = key == current_key
                        current_key, members = key, {}
                    members[ext] = data
                if not tar_has_end_marker(tar):
                    raise tarfile.ReadError("no end-of-archive marker: the shard is truncated")
    except (tarfile.TarError, OSError, EOFError) as exc:
        # Emit what was complete, then one error record so the damage is counted, not silent.
        if current_key is None:
            yield {
                "__source__": spec.name,
                "__url__": path,
                "__index__": index,
                "__key__": None,
                "members": {},
                "__error__": f"unreadable tar shard: {type(exc).__name__}: {exc}",
            }
            return
        if reading != current_key:  # the pending sample's members were all read
            yield record(current_key, members, duplicate)
            index += 1
        yield {
            "__source__": spec.name,
            "__url__": path,
            "__index__": index,
            "__key__": reading,
            "members": {},
            "__error__": f"truncated shard: {exc}",
        }
        return
    if current_key is not None:
        yield record(current_key, members, duplicate)
    else:
        yield _empty_shard(path, spec)


def read_frames_annotation(path: str, spec: SourceSpec) -> Iterator[Dict[str, Any]]:
    """Yield one raw record per entry of a JSON annotation list (one per text when a video has several)."""
    try:
        entries = read_json(path, "annotation")
    except JsonError as exc:  # missing, unreadable, not UTF-8, invalid JSON, a too long integer, nested too deeply
        yield {"__source__": spec.name, "__url__": path, "__index__": 0, "__error__": f"unreadable annotation: {exc}"}
        return
    if not isinstance(entries, list):
        yield {
            "__source__": spec.name,
            "__url__": path,
            "__index__": 0,
            "__error__": "annotation file must hold a JSON list",
        }
        return
    if not entries:
        yield _empty_shard(path, spec)
    for index, entry in enumerate(entries):
        yield {"__source__": spec.name, "__url__": path, "__index__": index, "entry": entry}


READERS = {"tsv": read_tsv, "wds": read_tar, "frames": read_frames_annotation, "text": read_tsv}
"""Line-based kinds share the line reader (one record per non-empty line)."""


def count_records(path: str, spec: SourceSpec) -> int:
    """Number of raw records in a shard, by scanning (used when no sizes.json declares it)."""
    return sum(1 for _ in READERS[spec.kind](path, spec))


# ----------------------------------------------------------------------------------------------- decoders
def _where(raw: Dict[str, Any]) -> str:
    return f"{raw['__url__']}#{raw.get('__key__', raw['__index__'])}"


def decode_tsv(raw: Dict[str, Any], spec: SourceSpec, defer_jpeg: bool = False) -> Dict[str, Any]:
    if "__error__" in raw:  # an empty shard
        raise BadSample(raw["__error__"], raw["__url__"], "shard")
    schema: TsvSchema = TSV_SCHEMAS[spec.schema]
    where = f"{raw['__url__']}:{raw['__index__'] + 1}"
    try:
        line = record_bytes(raw["line"], where, "line").decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("line is not UTF-8", where, "line") from None
    try:
        row = schema.parse_row(line)
    except (ValueError, KeyError) as exc:
        raise BadSample(f"malformed row: {exc}", where, "row") from None
    image_b64 = row.get(schema.image_column, "")
    try:
        image_bytes = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadSample("image column is not base64", where, schema.image_column) from None
    image = decode_image(image_bytes, where, schema.image_column, defer_jpeg)
    caption = row.get(schema.caption_column, "")
    if not caption.strip():
        raise BadSample("empty caption", where, schema.caption_column)
    meta = {k: v for k, v in row.items() if k not in (schema.image_column, schema.caption_column)}
    key = str(row.get("id", raw["__index__"]))
    return {
        "__key__": key,
        "__source__": spec.name,
        "__where__": where,
        "image": image,
        "caption": caption,
        "meta": meta,
    }


def decode_wds(
    raw: Dict[str, Any], spec: SourceSpec, keys: WdsKeys = IMG2DATASET_KEYS, defer_jpeg: bool = False
) -> Dict[str, Any]:
    where = _where(raw)
    if "__error__" in raw:  # read_tar's record for an unreadable, truncated or empty shard, or a duplicate key
        raise BadSample(raw["__error__"], where if raw.get("__key__") else raw["__url__"], "tar")
    members = raw["members"]
    image_ext = next((ext for ext in keys.image if ext in members), None)
    if image_ext is None:
        raise BadSample(f"no image member (looked for {keys.image})", where, "image")
    meta: Dict[str, Any] = {}
    if keys.meta in members:
        try:
            meta = parse_json(record_bytes(members[keys.meta], where, keys.meta))
        except JsonError:  # not UTF-8, invalid JSON, a too long integer, nested too deeply
            raise BadSample("json member is not valid UTF-8 JSON", where, keys.meta) from None
        if not isinstance(meta, dict):
            raise BadSample("json member is not an object", where, keys.meta)
    if spec.caption_key == keys.caption:
        if keys.caption not in members:
            raise BadSample(f"missing {keys.caption!r} member", where, keys.caption)
        try:
            caption = record_bytes(members[keys.caption], where, keys.caption).decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("caption is not UTF-8", where, keys.caption) from None
    else:
        caption = meta.get(spec.caption_key)
        if not isinstance(caption, str):
            raise BadSample(f"json lacks string field {spec.caption_key!r}", where, spec.caption_key)
    if not caption.strip():
        raise BadSample("empty caption", where, spec.caption_key)
    image = decode_image(record_bytes(members[image_ext], where, image_ext), where, image_ext, defer_jpeg)
    return {
        "__key__": raw["__key__"],
        "__source__": spec.name,
        "__where__": where,
        "image": image,
        "caption": caption.strip(),
        "meta": meta,
    }


def video_directory(frames_root: str, video_id: Any, where: str = "?") -> str:
    """``<frames_root>/<video_id>``, for a ``video_id`` (a string or an integer) that names a folder inside
    ``frames_root``: relative, without ``..`` components or NUL. Anything else raises :class:`BadSample`, so an
    annotation cannot make the loader read files outside the frames root (``"../../etc"``, ``"/data/other"``)."""
    if isinstance(video_id, bool) or not isinstance(video_id, (str, int)):
        raise BadSample(f"video_id must be a string or an integer: got {type(video_id).__name__}", where, "video_id")
    name = str(video_id)
    parts = name.replace("\\", "/").split("/")
    if not name.strip() or "\0" in name or os.path.isabs(name) or ".." in parts or os.path.normpath(name) == ".":
        raise BadSample(f"unsafe video_id: {name[:200]!r} must name a folder inside the frames root", where, "video_id")
    return os.path.join(frames_root, name)


def list_frames(video_dir: str) -> List[str]:
    """Sorted frame image paths of one video directory."""
    return sorted(os.path.join(video_dir, f) for f in os.listdir(video_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


def decode_frames(raw: Dict[str, Any], spec: SourceSpec) -> Dict[str, Any]:
    if "__error__" in raw:
        raise BadSample(raw["__error__"], raw["__url__"], "annotation")
    entry = raw["entry"]
    where = f"{raw['__url__']}[{raw['__index__']}]"
    if not isinstance(entry, dict) or "video_id" not in entry:
        raise BadSample("entry lacks video_id", where, "video_id")
    caption = entry.get("caption", entry.get("desc"))
    if isinstance(caption, list):
        caption = caption[0] if caption else None
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("entry lacks a caption/desc string", where, "caption")
    video_dir = video_directory(spec.frames_root, entry["video_id"], where)
    if not os.path.isdir(video_dir):
        raise BadSample(f"missing video directory: {video_dir}", where, "video_id")
    paths = list_frames(video_dir)
    if not paths:
        raise BadSample(f"empty frame directory: {video_dir}", where, "video_id")
    try:
        frames = [load_image(p) for p in paths]
    except FileNotFoundError as exc:
        raise BadSample(str(exc), where, "frames") from None
    return {
        "__key__": str(entry["video_id"]),
        "__source__": spec.name,
        "__where__": where,
        "frames": frames,
        "caption": caption.strip(),
        "meta": {k: v for k, v in entry.items() if k not in ("caption", "desc")},
    }


def decode_text(raw: Dict[str, Any], spec: SourceSpec) -> Dict[str, Any]:
    """A text-only document: ``{"text": ...}`` of a ``.jsonl`` line, or a plain line with ``\\n`` for newlines."""
    if "__error__" in raw:  # an empty shard
        raise BadSample(raw["__error__"], raw["__url__"], "shard")
    where = f"{raw['__url__']}:{raw['__index__'] + 1}"
    try:
        line = raw["line"].decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise BadSample("line is not UTF-8", where, "line") from None
    if raw["__url__"].endswith(".jsonl"):
        try:
            doc = parse_json(line)
        except JsonError:
            raise BadSample("line is not JSON", where, "line") from None
        text = doc.get("text") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            raise BadSample("json line lacks a string 'text'", where, "text")
    else:
        text = line.replace("\\n", "\n")
    if not text.strip():
        raise BadSample("empty document", where, "text")
    return {
        "__key__": f"{os.path.basename(raw['__url__'])}:{raw['__index__']}",
        "__source__": spec.name,
        "__where__": where,
        "text": text,
        "meta": {},
    }


DECODERS = {"tsv": decode_tsv, "wds": decode_wds, "frames": decode_frames, "text": decode_text}


def decode_record(raw: Dict[str, Any], spec: SourceSpec, defer_jpeg: bool = False) -> Dict[str, Any]:
    """Decode a raw record of ``spec``; raises :class:`BadSample` naming the shard and field on failure.

    A task may replace the decoder of its sources with a picklable callable in ``spec.extra["decoder"]`` (COSA
    lists frame paths without decoding them: :class:`unilm_vl.data.cosa.CosaFramesDecoder`). ``defer_jpeg`` leaves
    the JPEG images of tsv and wds records undecoded for a transform that decodes them itself
    (:func:`~unilm_vl.data.decode.decode_image`)."""
    decoder = spec.extra.get("decoder")
    if decoder is None and defer_jpeg and spec.kind in ("tsv", "wds"):
        return DECODERS[spec.kind](raw, spec, defer_jpeg=True)
    return (decoder or DECODERS[spec.kind])(raw, spec)


# ----------------------------------------------------------------------------------------------- data specs
_KIND_BY_EXT = {".tsv": "tsv", ".tar": "wds", ".json": "frames", ".jsonl": "text", ".txt": "text"}


def _infer_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in _KIND_BY_EXT:
        raise ValueError(
            f"cannot tell the source kind of {path!r} from its extension; expected one of "
            f"{sorted(_KIND_BY_EXT)} (or give the kind in a json config)"
        )
    return _KIND_BY_EXT[ext]


def parse_data_spec(
    spec: str,
    root: Optional[str] = None,
    schema: str = "grit",
    caption_key: str = "txt",
    frames_root: Optional[str] = None,
) -> List[SourceSpec]:
    """Sources from a data spec string.

    - ``a/{00000..00009}.tar::b/*.tsv``: shard patterns (``::``-separated); all patterns must share one kind,
      inferred from the extension (``.tsv`` -> tsv, ``.tar`` -> wds).
    - ``config.json`` holding a list of ``{"source": [shards], "name", "weight", "kind"?, "schema"?,
      "caption_key"?, "frames_root"?}`` (the Kosmos-2 ``generate_config`` layout; paths relative to the json):
      a weighted mixture.
    - ``annotations.json`` holding a list of ``{"video_id", "caption"|"desc"}``: a frames source whose frames are
      in ``frames_root`` (default: ``frames/`` beside the json).

    Relative paths resolve against ``root`` (the task's ``data`` directory).
    """
    from .shards import expand_urls

    first = spec.split("::")[0].strip()
    path = first if root is None or os.path.isabs(first) else os.path.join(root, first)
    if first.endswith(".json") and "::" not in spec:
        content = read_json(path, "data config")
        base = os.path.dirname(path)
        if isinstance(content, list) and content and isinstance(content[0], dict) and "source" in content[0]:
            sources = []
            for i, entry in enumerate(content):
                shards = expand_urls(entry["source"], base_dir=base)
                kind = entry.get("kind") or _infer_kind(shards[0])
                entry_frames = entry.get("frames_root")
                if entry_frames and not os.path.isabs(entry_frames):
                    entry_frames = os.path.join(base, entry_frames)
                sources.append(
                    SourceSpec(
                        name=entry.get("name", f"source{i}"),
                        kind=kind,
                        shards=shards,
                        weight=float(entry.get("weight", 1.0)),
                        schema=entry.get("schema", schema),
                        caption_key=entry.get("caption_key", caption_key),
                        frames_root=entry_frames or (os.path.join(base, "frames") if kind == "frames" else None),
                        num_samples=entry.get("num_samples"),
                    )
                )
            return sources
        if isinstance(content, list):
            if frames_root:  # a relative --frames-root resolves against root, like the data spec
                fr = frames_root if root is None or os.path.isabs(frames_root) else os.path.join(root, frames_root)
            else:  # base already includes root
                fr = os.path.join(base, "frames")
            return [
                SourceSpec(
                    name=os.path.splitext(os.path.basename(path))[0], kind="frames", shards=[path], frames_root=fr
                )
            ]
        raise ValueError(f"{path}: a data json must hold a list of source entries or of annotations")
    shards = expand_urls(spec, base_dir=root)
    kinds = {_infer_kind(s) for s in shards}
    if len(kinds) != 1:
        raise ValueError(f"data spec {spec!r} mixes kinds {sorted(kinds)}; use a json config to mix sources")
    kind = kinds.pop()
    name = os.path.basename(os.path.dirname(shards[0])) or "data"
    return [
        SourceSpec(name=name, kind=kind, shards=shards, schema=schema, caption_key=caption_key, frames_root=frames_root)
    ]
