"""Declared on-disk formats: the TSV column schemas, the webdataset member keys, and their writers.

Everything that reads or writes a shard names its columns through a :class:`TsvSchema` or its members through
:class:`WdsKeys`; no code indexes ``row[3]``. The layouts (also documented in the README):

GRIT TSV (the Kosmos-2 release layout, one sample per line, tab separated)::

    id <TAB> caption <TAB> image (base64 JPEG/PNG) <TAB> width <TAB> height <TAB> annotation

``annotation`` is ``{"phrase": noun_chunks, "expression_v1": ref_exps}`` where each chunk is
``[char_start, char_end, x0, y0, x1, y1, score]`` with coordinates normalised to the original image. We write it
as JSON; readers accept JSON and the Python-literal form the original writer produced.

Fields are escaped (``\\`` -> ``\\\\``, TAB -> ``\\t``, LF -> ``\\n``, CR -> ``\\r``) so that a caption holding a
tab or newline cannot shift columns; the original writer did not escape and corrupted such rows.

img2dataset webdataset layout: ``<key>.jpg|png|jpeg|webp`` (image bytes), ``<key>.txt`` (caption) and
``<key>.json`` (metadata: ``key``, ``caption``, ``width``, ``height`` and any extra fields).

Sample counts: each shard directory may hold ``sizes.json`` (``{"<shard file name>": n}``, the open_clip
convention) so that readers know the epoch length without scanning.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from .jsonio import JsonError, parse_json, read_json

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_field(text: str) -> str:
    """Escape backslash, tab, LF and CR so ``text`` fits in one TSV cell."""
    if not any(c in text for c in _ESCAPES):
        return text
    return "".join(_ESCAPES.get(c, c) for c in text)


def unescape_field(text: str) -> str:
    """Inverse of :func:`escape_field`. An unknown escape like ``\\x`` is kept verbatim."""
    if "\\" not in text:
        return text
    out: List[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _UNESCAPES:
            out.append(_UNESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class TsvSchema:
    """Column layout of a TSV shard.

    ``image_column`` holds base64 image bytes, ``caption_column`` the text, ``annotation_column`` (optional) a
    JSON / Python-literal structure, ``int_columns`` are parsed as integers.
    """

    name: str
    columns: tuple
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    annotation_column: Optional[str] = None
    int_columns: tuple = ()
    header: bool = False

    def __post_init__(self):
        for col in (self.image_column, self.caption_column, self.annotation_column, *self.int_columns):
            if col is not None and col not in self.columns:
                raise ValueError(f"schema {self.name!r}: column {col!r} is not one of {self.columns}")

    def format_row(self, row: Mapping[str, Any]) -> str:
        """One TSV line (without the newline) from a mapping holding every column."""
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"schema {self.name!r}: row lacks columns {missing}")
        cells = []
        for col in self.columns:
            value = row[col]
            if col == self.annotation_column and not isinstance(value, str):
                value = json.dumps(value, separators=(",", ":"))
            cells.append(escape_field(str(value)))
        return "\t".join(cells)

    def parse_row(self, line: str) -> Dict[str, Any]:
        """Column dict from one TSV line. Raises ``ValueError`` naming the problem on a malformed row."""
        cells = line.rstrip("\n").rstrip("\r").split("\t")
        if len(cells) != len(self.columns):
            raise ValueError(
                f"expected {len(self.columns)} columns {self.columns} for schema {self.name!r}, got {len(cells)}"
            )
        row: Dict[str, Any] = {}
        for col, cell in zip(self.columns, cells):
            value: Any = unescape_field(cell) if col != self.image_column else cell
            if col in self.int_columns:
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"column {col!r}: {value!r} is not an integer") from None
            elif col == self.annotation_column:
                value = parse_annotation(value, col)
            row[col] = value
        return row


def parse_annotation(text: str, column: str = "annotation") -> Any:
    """Parse an annotation cell written as JSON or as a Python literal (the original GRIT writer's ``str(dict)``)."""
    if text == "":
        return None
    try:
        return parse_json(text)
    except JsonError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # TypeError: {[1]: 2}
        raise ValueError(f"column {column!r}: not JSON or a Python literal: {text[:80]!r}") from None


GRIT_TSV = TsvSchema(
    name="grit",
    columns=("id", "caption", "image", "width", "height", "annotation"),
    image_column="image",
    caption_column="caption",
    annotation_column="annotation",
    int_columns=("width", "height"),
)
"""The Kosmos-2 GRIT TSV layout (``data/prepare_grit.py`` of the release)."""

IMAGE_TEXT_TSV = TsvSchema(
    name="image_text",
    columns=("id", "caption", "image"),
    image_column="image",
    caption_column="caption",
)
"""A minimal image-caption TSV: id, caption, base64 image."""

TSV_SCHEMAS: Dict[str, TsvSchema] = {s.name: s for s in (GRIT_TSV, IMAGE_TEXT_TSV)}


@dataclass(frozen=True)
class WdsKeys:
    """Member keys of a webdataset sample (img2dataset layout)."""

    image: tuple = ("jpg", "png", "jpeg", "webp")
    caption: str = "txt"
    meta: str = "json"


IMG2DATASET_KEYS = WdsKeys()


class _ShardWriter:
    """Rotates ``<prefix>-00000.<ext>``, ``<prefix>-00001.<ext>``, ... every ``per_shard`` samples, counts samples
    per shard and merges the counts into ``sizes.json`` on close. Subclasses open and close one shard."""

    extension = ""

    def __init__(self, prefix: str, per_shard: int):
        if per_shard <= 0:
            raise ValueError("samples per shard must be positive")
        self.prefix, self.per_shard = prefix, per_shard
        self.paths: List[str] = []
        self.sizes: Dict[str, int] = {}
        self._handle = None
        self._count = 0
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    def _open(self, path: str):
        raise NotImplementedError

    def _next_handle(self):
        """The open shard, rotating to a new one when the current one is full; counts the sample written."""
        if self._handle is None or self._count >= self.per_shard:
            self._close_current()
            path = f"{self.prefix}-{len(self.paths):05d}.{self.extension}"
            self._handle = self._open(path)
            self.paths.append(path)
            self.sizes[os.path.basename(path)] = 0
            self._count = 0
        self._count += 1
        self.sizes[os.path.basename(self.paths[-1])] += 1
        return self._handle

    def _close_current(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._close_current()
        if self.paths:
            update_sizes_json(os.path.dirname(os.path.abspath(self.prefix)), self.sizes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TsvShardWriter(_ShardWriter):
    """Writes rows to ``<prefix>-00000.tsv``, ... with ``rows_per_shard`` rows each and a ``sizes.json`` beside
    them. Use as a context manager; ``paths`` lists the shards written."""

    extension = "tsv"

    def __init__(self, prefix: str, schema: TsvSchema, rows_per_shard: int = 1000):
        super().__init__(prefix, rows_per_shard)
        self.schema = schema

    def _open(self, path: str):
        return open(path, "w", encoding="utf-8", newline="\n")

    def write(self, row: Mapping[str, Any]) -> None:
        line = self.schema.format_row(row)  # format first: a bad row raises before anything is counted
        self._next_handle().write(line + "\n")


class WdsShardWriter(_ShardWriter):
    """Writes img2dataset-layout tar shards ``<prefix>-00000.tar``, ... and a ``sizes.json`` beside them.

    ``mtime`` fixes the members' modification time (an int: tarfile adds a pax header to every member with a float
    mtime) so identical inputs give byte-identical tars; None stamps the current time as webdataset does."""

    extension = "tar"

    def __init__(
        self, prefix: str, samples_per_shard: int = 1000, keys: WdsKeys = IMG2DATASET_KEYS, mtime: Optional[int] = None
    ):
        super().__init__(prefix, samples_per_shard)
        self.keys, self.mtime = keys, mtime

    def _open(self, path: str):
        import webdataset as wds

        return wds.TarWriter(path, mtime=self.mtime)

    def write(self, key: str, image_bytes: bytes, image_ext: str, caption: str, meta: Mapping[str, Any]) -> None:
        if image_ext not in self.keys.image:
            raise ValueError(f"image extension {image_ext!r} is not one of {self.keys.image}")
        self._next_handle().write(
            {
                "__key__": key,
                image_ext: image_bytes,
                self.keys.caption: caption.encode("utf-8"),
                self.keys.meta: json.dumps(dict(meta)).encode("utf-8"),
            }
        )


def update_sizes_json(directory: str, sizes: Mapping[str, int]) -> str:
    """Merge ``sizes`` into ``<directory>/sizes.json`` and return its path."""
    path = os.path.join(directory, "sizes.json")
    merged: Dict[str, int] = {}
    if os.path.exists(path):
        merged = read_json(path, "shard sizes")
    merged.update(sizes)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(merged, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def write_source_config(path: str, sources: Sequence[Mapping[str, Any]]) -> None:
    """Write a Kosmos-2 style data config: a JSON list of ``{"source": [shard paths relative to the config's
    directory], "source_lang": ..., "weight": w, "name": ...}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(list(sources), fh, indent=1)
    os.replace(tmp, path)  # a reader never sees a half-written config


def relative_paths(paths: Iterable[str], start: str) -> List[str]:
    return [os.path.relpath(p, start) for p in paths]
