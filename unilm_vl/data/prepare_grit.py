"""Convert img2dataset downloads of GRIT into Kosmos-2 GRIT TSV shards and their JSON data config.

Usage::

    python -m unilm_vl.data.prepare_grit --input DIR [DIR ...] --out OUTDIR \\
        [--shard-size 1000] [--name grit] [--reencode-jpeg] [--overwrite]

Input: img2dataset output folders (or single ``.tar`` files) of GRIT, in either layout

* ``files``: ``<key>.jpg`` (or png/jpeg/webp) + ``<key>.json`` pairs, possibly in sub-folders;
* ``webdataset``: ``.tar`` shards holding the same members.

Each ``<key>.json`` holds the GRIT jsonl record fields (``caption``, ``width``, ``height``, ``noun_chunks``,
``ref_exps``, ``id``, ``url``, ...) as img2dataset saves them. img2dataset's ``<shard>_stats.json`` files and
``sizes.json`` are not samples and are ignored, as are ``.txt``/``.parquet`` files.

Output (the Kosmos-2 release layout)::

    OUTDIR/tsv/<name>-00000.tsv ...   formats.GRIT_TSV rows: id, caption, image, width, height, annotation
    OUTDIR/tsv/sizes.json             rows per shard
    OUTDIR/json/train.json            [{"source": ["../tsv/<name>-00000.tsv", ...], "source_lang": "grit",
                                        "weight": 1.0, "name": <name>}]

Columns: ``id`` = md5 of the image bytes written; ``image`` = base64 of the original bytes (``--reencode-jpeg``:
of a JPEG re-encode at PIL's default quality, as the release did); ``width``/``height`` from the json, else the
decoded size; ``annotation`` = ``{"phrase": noun_chunks, "expression_v1": ref_exps}``. Captions holding tabs or
newlines are escaped by the schema instead of corrupting the row.

Bad samples (a missing json or image, an undecodable image, unreadable json, json nested too deeply for the parser,
no ``caption``, a member repeated in a tar, an unreadable tar) are skipped, logged with their path and counted; the
run ends with ``converted N, skipped M (reason: count, ...)``. Samples are written in a deterministic order: inputs in
the order given, and within an input by sorted path/key.

No partial output: shards are written into a hidden staging folder inside ``OUTDIR/tsv`` and moved into place
(with ``sizes.json`` and ``train.json``) only when the whole conversion has finished; a run that fails or is
interrupted leaves ``OUTDIR`` as it was (with ``--overwrite``, the old shards too).
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from unilm_vl.cli import progress, report_error
from unilm_vl.data.decode import BadSample, decode_image
from unilm_vl.data.formats import (
    GRIT_TSV,
    IMG2DATASET_KEYS,
    TsvShardWriter,
    parse_annotation,
    relative_paths,
    update_sizes_json,
    write_source_config,
)
from unilm_vl.data.jsonio import JsonError, parse_json, read_json
from unilm_vl.data.sources import tar_has_end_marker
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

IMG2DATASET_STATS_SUFFIX = "_stats.json"
"""img2dataset writes ``<shard>_stats.json`` beside each shard; these are statistics, not samples."""

SIZES_JSON = "sizes.json"
SOURCE_LANG = "grit"
TAR_EXTENSION = "tar"
LOG_PROGRESS_EVERY = 10000


@dataclass
class RawSample:
    """One sample as found on disk: where it is and how to read its members (either may be missing)."""

    source: str
    read_meta: Optional[Callable[[], bytes]]
    read_image: Optional[Callable[[], bytes]]


@dataclass
class ConversionSummary:
    """Counts of one conversion run; ``skipped`` maps a reason to its count."""

    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: List[str] = field(default_factory=list)

    def skip(self, exc: BadSample) -> None:
        """Count and log one skipped sample (or unreadable tar)."""
        self.skipped[exc.reason.split(":")[0]] += 1
        logger.warning("skipped %s: %s", exc.source, exc.reason)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        return f"converted {self.converted}, skipped {self.n_skipped}" + (f" ({reasons})" if reasons else "")


# ---- finding samples ------------------------------------------------------------------------------------------


def split_member_name(name: str) -> Tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``): the webdataset rule, the key ends at the first dot of the
    base name; the extension is lower-cased."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def _read_file(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    return read


def _pick_image(members: Dict[str, Any]) -> Optional[Any]:
    for ext in IMG2DATASET_KEYS.image:
        if ext in members:
            return members[ext]
    return None


def _is_sample_member(base_name: str, ext: str) -> bool:
    if ext == IMG2DATASET_KEYS.meta:
        return base_name != SIZES_JSON and not base_name.endswith(IMG2DATASET_STATS_SUFFIX)
    return ext in IMG2DATASET_KEYS.image


def _iter_tar(path: str, summary: ConversionSummary) -> Iterator[RawSample]:
    """Samples of one tar, sorted by key. A tar that cannot be opened, or is truncated, is reported and whatever
    was indexed before the damage is still converted."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        summary.skip(BadSample(f"unreadable tar: {type(exc).__name__}: {exc}", path, "tar"))
        return
    with tar:
        groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if _is_sample_member(os.path.basename(member.name), ext):
                    group = groups.setdefault(key, {})
                    if ext in group:  # the first copy is converted
                        summary.skip(
                            BadSample("duplicate tar member: a later copy is ignored", f"{path}:{member.name}", "tar")
                        )
                        continue
                    group[ext] = member
            if not tar_has_end_marker(tar):
                raise tarfile.ReadError("no end-of-archive marker where the members stop")
        except (tarfile.TarError, OSError, EOFError) as exc:
            summary.skip(
                BadSample(f"unreadable tar: damaged or truncated after {len(groups)} keys: {exc}", path, "tar")
            )

        def reader(member: tarfile.TarInfo) -> Callable[[], bytes]:
            def read() -> bytes:
                try:
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise BadSample(f"unreadable tar member: {exc}", f"{path}:{member.name}", "tar") from None
                if len(data) != member.size:
                    raise BadSample("unreadable tar member: truncated", f"{path}:{member.name}", "tar")
                return data

            return read

        for key in sorted(groups):
            members = groups[key]
            meta, image = members.get(IMG2DATASET_KEYS.meta), _pick_image(members)
            yield RawSample(
                source=f"{path}:{(image or meta).name}",
                read_meta=reader(meta) if meta is not None else None,
                read_image=reader(image) if image is not None else None,
            )


def _iter_directory(root: str, summary: ConversionSummary) -> Iterator[RawSample]:
    """Samples of an img2dataset output folder: loose ``<key>.<ext>`` pairs and ``.tar`` shards, in sorted order
    of their path relative to ``root``."""
    entries: List[Tuple[Tuple[str, ...], str, Any]] = []
    loose: Dict[str, Dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            key, ext = split_member_name(path)
            if ext == TAR_EXTENSION:
                entries.append((tuple(os.path.relpath(key, root).split(os.sep)), "tar", path))
            elif _is_sample_member(filename, ext):
                loose.setdefault(key, {})[ext] = path
    for key, members in loose.items():
        entries.append((tuple(os.path.relpath(key, root).split(os.sep)), "files", members))
    entries.sort(key=lambda entry: entry[0])

    for _, kind, payload in entries:
        if kind == "tar":
            yield from _iter_tar(payload, summary)
        else:
            meta, image = payload.get(IMG2DATASET_KEYS.meta), _pick_image(payload)
            yield RawSample(
                source=image or meta,
                read_meta=_read_file(meta) if meta else None,
                read_image=_read_file(image) if image else None,
            )


def iter_raw_samples(inputs: Sequence[str], summary: ConversionSummary) -> Iterator[RawSample]:
    """Samples of every input (a folder or a ``.tar`` file), inputs in the order given."""
    for path in inputs:
        if os.path.isdir(path):
            yield from _iter_directory(path, summary)
        else:
            yield from _iter_tar(path, summary)


# ---- one sample -> one row ------------------------------------------------------------------------------------


def _chunks(meta: Dict[str, Any], name: str, source: str) -> List[Any]:
    """``noun_chunks`` / ``ref_exps`` as a list; a JSON or Python-literal string (as some parquet exports hold)
    is parsed; a missing field is an empty list."""
    value = meta.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = parse_annotation(value, name)
        except ValueError as exc:
            raise BadSample(f"bad annotation: {exc}", source, name) from None
    if not isinstance(value, list):
        raise BadSample(f"bad annotation: {name} is a {type(value).__name__}, not a list", source, name)
    return value


def _dimension(meta: Dict[str, Any], name: str, fallback: int) -> int:
    value = meta.get(name)
    if isinstance(value, bool):
        return fallback
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf")), JSON's Infinity
        return fallback
    return number if number > 0 else fallback


def build_row(sample: RawSample, reencode_jpeg: bool = False) -> Dict[str, Any]:
    """The GRIT_TSV row of one sample. Raises :class:`BadSample` naming why it cannot be used."""
    if sample.read_meta is None:
        raise BadSample("missing json", sample.source, "json")
    if sample.read_image is None:
        raise BadSample("missing image", sample.source, "image")
    try:
        meta = parse_json(sample.read_meta())
    except JsonError as exc:  # not UTF-8, invalid JSON, a too long integer, nested too deeply
        raise BadSample(f"bad json: {exc.problem}", sample.source, "json") from None
    if not isinstance(meta, dict):
        raise BadSample("bad json: not an object", sample.source, "json")
    caption = meta.get("caption")
    if not isinstance(caption, str):
        raise BadSample("missing caption", sample.source, "caption")

    data = sample.read_image()
    image = decode_image(data, source=sample.source)  # raises BadSample
    if reencode_jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")  # PIL's default quality, like the release
        data = buffer.getvalue()
    return {
        "id": hashlib.md5(data).hexdigest(),
        "caption": caption,
        "image": base64.b64encode(data).decode("ascii"),
        "width": _dimension(meta, "width", image.width),
        "height": _dimension(meta, "height", image.height),
        "annotation": {
            "phrase": _chunks(meta, "noun_chunks", sample.source),
            "expression_v1": _chunks(meta, "ref_exps", sample.source),
        },
    }


# ---- the conversion -------------------------------------------------------------------------------------------


def existing_shards(tsv_dir: str, name: str) -> List[str]:
    """Shards ``<name>-NNNNN.tsv`` already in ``tsv_dir``."""
    return sorted(glob.glob(os.path.join(glob.escape(tsv_dir), glob.escape(name) + "-" + "[0-9]" * 5 + ".tsv")))


def remove_shards(paths: Sequence[str]) -> None:
    """Delete ``paths`` and drop them from their directory's ``sizes.json``."""
    by_dir: Dict[str, List[str]] = {}
    for path in paths:
        os.remove(path)
        by_dir.setdefault(os.path.dirname(path), []).append(os.path.basename(path))
    for directory, names in by_dir.items():
        sizes_path = os.path.join(directory, SIZES_JSON)
        if not os.path.exists(sizes_path):
            continue
        sizes = read_json(sizes_path, "shard sizes")
        for shard in names:
            sizes.pop(shard, None)
        tmp = sizes_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(sizes, fh, indent=1, sort_keys=True)
        os.replace(tmp, sizes_path)


def write_train_config(config_path: str, shards: Sequence[str], name: str) -> None:
    """Write ``config_path`` with this dataset's entry; entries of other names already there are kept."""
    entries: List[Dict[str, Any]] = []
    if os.path.exists(config_path):
        entries = [e for e in read_json(config_path, "data config") if e.get("name") != name]
        if entries:
            logger.info("%s: keeping the entries %s", config_path, [e.get("name") for e in entries])
    entries.append(
        {
            "source": relative_paths(shards, os.path.dirname(os.path.abspath(config_path))),
            "source_lang": SOURCE_LANG,
            "weight": 1.0,
            "name": name,
        }
    )
    write_source_config(config_path, entries)


def convert(
    inputs: Sequence[str],
    out_dir: str,
    shard_size: int = 1000,
    name: str = "grit",
    reencode_jpeg: bool = False,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert ``inputs`` into ``out_dir``; see the module docstring. Returns the counts.

    Raises ``FileNotFoundError`` for an input that does not exist and ``FileExistsError`` when shards of ``name``
    are already in ``out_dir/tsv`` and ``overwrite`` is off. Bad samples never raise. Shards are staged and published
    only at the end (:func:`publish_shards`); with ``overwrite``, the old shards go only then.
    """
    if not name or os.sep in name or name != name.strip():
        raise ValueError(f"--name must be a plain file-name prefix, got {name!r}")
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input not found: {path}")
    tsv_dir = os.path.join(out_dir, "tsv")
    stale = existing_shards(tsv_dir, name)
    if stale and not overwrite:
        raise FileExistsError(
            f"{len(stale)} shards named {name!r} already exist in {tsv_dir} (pass --overwrite to replace them)"
        )

    summary = ConversionSummary()
    os.makedirs(tsv_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-partial-", dir=tsv_dir)
    try:
        with TsvShardWriter(os.path.join(staging, name), GRIT_TSV, rows_per_shard=shard_size) as writer:
            for sample in progress(iter_raw_samples(inputs, summary), "converting", unit="sample"):
                try:
                    writer.write(build_row(sample, reencode_jpeg=reencode_jpeg))
                except BadSample as exc:
                    summary.skip(exc)
                    continue
                except (ValueError, RecursionError) as exc:  # the row cannot be written as TSV (format_row)
                    summary.skip(BadSample(f"unwritable row: {type(exc).__name__}: {exc}", sample.source, "row"))
                    continue
                summary.converted += 1
                if summary.converted % LOG_PROGRESS_EVERY == 0:
                    logger.info("%s so far", summary.line())
        if writer.paths:
            summary.shards = publish_shards(writer.paths, writer.sizes, tsv_dir, stale)
            write_train_config(os.path.join(out_dir, "json", "train.json"), summary.shards, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def publish_shards(staged: Sequence[str], sizes: Dict[str, int], tsv_dir: str, stale: Sequence[str]) -> List[str]:
    """Move the finished shards ``staged`` into ``tsv_dir`` (``os.replace``: same file system), after removing the
    ``stale`` shards of the same name that they do not replace, and merge their ``sizes``; returns their paths."""
    published = [os.path.join(tsv_dir, os.path.basename(path)) for path in staged]
    leftover = sorted(set(stale) - set(published))
    if leftover:
        logger.info("removing %d older shards of the same name in %s", len(leftover), tsv_dir)
        remove_shards(leftover)
    for src, dst in zip(staged, published):
        os.replace(src, dst)
    update_sizes_json(tsv_dir, sizes)
    return published


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unilm_vl.data.prepare_grit",
        description="Convert img2dataset downloads of GRIT (files or webdataset layout) into GRIT TSV shards and "
        "OUTDIR/json/train.json.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="DIR",
        help="img2dataset output folders (key.jpg + key.json pairs and/or .tar shards) or .tar files",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="OUTDIR",
        help="output root: shards go to OUTDIR/tsv, the data config to OUTDIR/json/train.json",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per TSV shard")
    parser.add_argument("--name", default="grit", help="shard file prefix and the config entry's name")
    parser.add_argument(
        "--reencode-jpeg",
        action="store_true",
        help="store a JPEG re-encode (PIL default quality) instead of the original image bytes",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards of the same name already in OUTDIR/tsv"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point. Exit codes: 0 done, 1 nothing converted, 2 bad arguments or inputs."""
    args = get_parser().parse_args(argv)
    setup_cli_logging(stream=sys.stderr)
    if args.shard_size <= 0:
        return report_error(f"--shard-size must be positive, got {args.shard_size}")
    try:
        summary = convert(
            args.input,
            args.out,
            shard_size=args.shard_size,
            name=args.name,
            reencode_jpeg=args.reencode_jpeg,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        return report_error(exc)
    logger.info("%s", summary.line())
    if summary.converted == 0:
        logger.error("no sample was converted; nothing written to %s", args.out)
        return 1
    logger.info(
        "wrote %d shards to %s and %s",
        len(summary.shards),
        os.path.join(args.out, "tsv"),
        os.path.join(args.out, "json", "train.json"),
    )
    return 0


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
