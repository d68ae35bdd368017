"""Compositionality benchmarks: an image, its positive caption and hard-negative captions (SugarCrepe, ARO).

Protocol (the standard one of these benchmarks, as FSC-CLIP's ``eval_compo`` runs them; ytaek-oh/fsc-clip
``src/training/eval_compo.py``): images and captions are encoded separately by an
:class:`~unilm_vl.eval.common.ImageTextEncoder` and scored by cosine similarity. An item is correct iff

    cos(i, t_pos) > max_j cos(i, t_neg_j)

The comparison is **strict**: a negative tied with the positive makes the item wrong (ARO's own ``argmax`` would
instead let the storage order decide ties). The score of a category (one json file) is the accuracy in percent over
its items (:func:`unilm_vl.eval.metrics.compositional_accuracy`); ``macro_accuracy`` is the unweighted mean over
the categories evaluated.

Annotation formats, told apart by their structure (never by the file name); the category name is the file name
without ``.json``:

- **SugarCrepe** (one file per category: ``replace_att.json``, ``swap_obj.json``, ...)::

      {"0": {"filename": "000000391895.jpg", "caption": "...", "negative_caption": "..."}, ...}

  ``negative_caption`` may also be a list of strings (several negatives). Items keep the file's key order.
  Image path: ``image_root / filename`` (SugarCrepe's images are COCO val2017).
- **ARO VG-Relation / VG-Attribution** (``visual_genome_relation.json``, ``visual_genome_attribution.json``)::

      [{"image_path": "2315375.jpg", "true_caption": "...", "false_caption": "...",
        "bbox_x": 0, "bbox_y": 12, "bbox_w": 300, "bbox_h": 200, "relation_name": "on", ...}, ...]

  As in ARO, the image is cropped to the box ``(x, y, x + w, y + h)`` (pixels) before the transform when all four
  ``bbox_*`` fields are present (a partial box is an error). Items with ``relation_name`` (VG-Relation) or
  ``attributes`` (VG-Attribution, a list joined with ``_``) are also grouped: the report adds the accuracy per
  group and its unweighted mean (ARO's per-relation / per-attribute-pair tables). Image path:
  ``image_root / image_path`` (ARO keeps the images in ``<ARO root>/images``).
- **ARO order** (COCO-Order / Flickr30k-Order test cases written to json)::

      [{"image": "val2014/x.jpg", "caption_options": ["the true caption", "perturbed 1", ...]}, ...]

  The **first** caption option is the positive, all the others are negatives. ``image_path`` is accepted in place
  of ``image``. Image path: ``image_root / image``.

``image_root`` defaults to the directory of each annotation file. A missing image file raises
``FileNotFoundError`` naming the paths before anything is encoded (an evaluation set must be complete); with
``skip_missing`` the items whose image is missing are dropped instead, counted per category
(``num_skipped_missing``) and logged. A category left without any item is an error either way.

Report (json): ``categories`` -> name -> ``accuracy`` (percent), ``num_items``, ``num_skipped_missing``,
``format``, ``max_negatives`` (and ``group_accuracy`` / ``group_macro_accuracy`` for grouped ARO files);
``macro_accuracy``, ``num_items`` (all categories) and ``num_categories``.

CLI::

    python -m unilm_vl.eval.compositionality --checkpoint CKPT --data DIR_OR_JSON [DIR_OR_JSON ...]
        [--image-root DIR] [--format auto|sugarcrepe|aro] [--skip-missing] [--batch-size 64] [--device cpu]
        [--workers 0] [--output metrics.json]

A directory given to ``--data`` stands for all its ``*.json`` files (sorted).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unilm_vl.data.decode import load_image
from unilm_vl.data.jsonio import read_json
from unilm_vl.eval.common import ImageTextEncoder, add_common_eval_args, write_metrics
from unilm_vl.eval.metrics import compositional_correct
from unilm_vl.eval.retrieval import encode_captions, encode_image_dataset
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

FORMATS = ("auto", "sugarcrepe", "aro")
BOX_KEYS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")

Box = Tuple[float, float, float, float]


@dataclass
class CompositionalItem:
    """One test case: an image (optionally cropped to ``box`` = x, y, w, h), its positive and negative captions."""

    image: str
    positive: str
    negatives: List[str]
    box: Optional[Box] = None
    group: Optional[str] = None


@dataclass
class CompositionalSet:
    """The items of one annotation file (one category)."""

    name: str
    format: str
    source: str
    items: List[CompositionalItem] = field(default_factory=list)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty caption string, got {value!r}")
    return value.strip()


def _is_sugarcrepe(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(e, dict) and "caption" in e and "negative_caption" in e for e in data.values())
    )


def _is_aro_pairs(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(e, dict) and "true_caption" in e and "false_caption" in e for e in data)
    )


def _is_aro_order(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(e, dict) and "caption_options" in e for e in data)


def _sugarcrepe_items(data: Dict[str, Any], root: str, where: str) -> Iterator[CompositionalItem]:
    for key, entry in data.items():
        at = f"{where} item {key!r}"
        if "filename" not in entry:
            raise ValueError(f"{at}: no 'filename' field")
        negatives = entry["negative_caption"]
        negatives = [negatives] if isinstance(negatives, str) else list(negatives)
        if not negatives:
            raise ValueError(f"{at}: 'negative_caption' is an empty list")
        yield CompositionalItem(
            os.path.join(root, entry["filename"]), _text(entry["caption"], at), [_text(n, at) for n in negatives]
        )


def _aro_box(entry: Dict[str, Any], at: str) -> Optional[Box]:
    present = [k for k in BOX_KEYS if k in entry]
    if not present:
        return None
    if len(present) != len(BOX_KEYS):
        raise ValueError(f"{at}: a crop box needs all of {BOX_KEYS}, found only {present}")
    x, y, w, h = (float(entry[k]) for k in BOX_KEYS)
    if w <= 0 or h <= 0:
        raise ValueError(f"{at}: crop box has non-positive size w={w}, h={h}")
    return x, y, w, h


def _aro_group(entry: Dict[str, Any]) -> Optional[str]:
    if "relation_name" in entry:
        return str(entry["relation_name"])
    if "attributes" in entry:
        attrs = entry["attributes"]
        return "_".join(str(a) for a in attrs) if isinstance(attrs, (list, tuple)) else str(attrs)
    return None


def _aro_pair_items(data: List[Dict[str, Any]], root: str, where: str) -> Iterator[CompositionalItem]:
    for index, entry in enumerate(data):
        at = f"{where} item {index}"
        if "image_path" not in entry:
            raise ValueError(f"{at}: no 'image_path' field")
        yield CompositionalItem(
            os.path.join(root, entry["image_path"]),
            _text(entry["true_caption"], at),
            [_text(entry["false_caption"], at)],
            box=_aro_box(entry, at),
            group=_aro_group(entry),
        )


def _aro_order_items(data: List[Dict[str, Any]], root: str, where: str) -> Iterator[CompositionalItem]:
    for index, entry in enumerate(data):
        at = f"{where} item {index}"
        image = entry.get("image", entry.get("image_path"))
        if image is None:
            raise ValueError(f"{at}: no 'image' (or 'image_path') field")
        options = entry["caption_options"]
        if not isinstance(options, list) or len(options) < 2:
            raise ValueError(
                f"{at}: 'caption_options' must list the positive first and at least one negative, got {options!r}"
            )
        captions = [_text(c, at) for c in options]
        yield CompositionalItem(os.path.join(root, image), captions[0], captions[1:], box=_aro_box(entry, at))


def load_compositional_set(path: str, image_root: Optional[str] = None, fmt: str = "auto") -> CompositionalSet:
    """Read one SugarCrepe or ARO annotation file (see the module docstring) as a category named after the file."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    data = read_json(path, "compositionality annotation")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if _is_sugarcrepe(data):
        found, items = "sugarcrepe", _sugarcrepe_items(data, root, path)
    elif _is_aro_pairs(data):
        found, items = "aro_pairs", _aro_pair_items(data, root, path)
    elif _is_aro_order(data):
        found, items = "aro_order", _aro_order_items(data, root, path)
    else:
        raise ValueError(
            f"{path}: unrecognised annotation format; expected SugarCrepe ({{id: {{'filename', "
            "'caption', 'negative_caption'}}}), ARO VG ([{'image_path', 'true_caption', "
            "'false_caption', ...}]) or ARO order ([{'image', 'caption_options'}])"
        )
    if fmt != "auto" and not found.startswith(fmt):
        raise ValueError(f"{path} is in {found} format but --format {fmt} was asked for")
    name = os.path.splitext(os.path.basename(path))[0]
    return CompositionalSet(name, found, path, list(items))


def annotation_files(data: Sequence[str]) -> List[str]:
    """Expand directories to their sorted ``*.json`` files; raise on a missing path, an empty directory or two files
    with the same category name."""
    files: List[str] = []
    for entry in data:
        if os.path.isdir(entry):
            found = sorted(os.path.join(entry, n) for n in os.listdir(entry) if n.endswith(".json"))
            if not found:
                raise ValueError(f"{entry} holds no *.json annotation file")
            files.extend(found)
        elif os.path.isfile(entry):
            files.append(entry)
        else:
            raise FileNotFoundError(f"annotation file or directory not found: {entry}")
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several annotation files share the category names {duplicates}: {files}")
    return files


def drop_missing_images(data: CompositionalSet, skip_missing: bool) -> int:
    """Raise ``FileNotFoundError`` naming the missing image files of ``data``, or (``skip_missing``) drop their
    items and return how many were dropped."""
    missing = sorted({item.image for item in data.items if not os.path.isfile(item.image)})
    if not missing:
        return 0
    if not skip_missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{data.source}: {len(missing)} image files are missing: {shown} (pass --skip-missing to drop their items)"
        )
    gone = set(missing)
    before = len(data.items)
    data.items = [item for item in data.items if item.image not in gone]
    dropped = before - len(data.items)
    logger.warning(
        "%s: skipped %d of %d items whose image is missing (%d files, first: %s)",
        data.source,
        dropped,
        before,
        len(missing),
        missing[0],
    )
    return dropped


class _CroppedImages(torch.utils.data.Dataset):
    """(path, box) pairs -> transformed tensors; ``box`` (x, y, w, h in pixels) crops before the transform."""

    def __init__(self, keys: Sequence[Tuple[str, Optional[Box]]], transform: Callable[[Image.Image], torch.Tensor]):
        self.keys, self.transform = list(keys), transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        path, box = self.keys[index]
        image = load_image(path)
        if box is not None:
            x, y, w, h = box
            image = image.crop((x, y, x + w, y + h))
        return self.transform(image)


def _encode_images(
    encoder: ImageTextEncoder,
    keys: Sequence[Tuple[str, Optional[Box]]],
    batch_size: int,
    device: Optional[str],
    num_workers: int,
) -> torch.Tensor:
    images = _CroppedImages(keys, encoder.image_transform)
    return F.normalize(encode_image_dataset(encoder, images, batch_size, device, num_workers), dim=-1)  # N x D


def score_items(
    items: Sequence[CompositionalItem],
    image_feats: torch.Tensor,
    image_index: Dict[Any, int],
    text_feats: torch.Tensor,
    text_index: Dict[str, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of each item: positives (N) and negatives (N x K_max, rows padded with ``-inf``)."""
    k_max = max(len(item.negatives) for item in items)
    pos = torch.empty(len(items), dtype=torch.float64)
    neg = torch.full((len(items), k_max), float("-inf"), dtype=torch.float64)
    for n, item in enumerate(items):
        img = image_feats[image_index[(item.image, item.box)]].double()  # D
        pos[n] = img @ text_feats[text_index[item.positive]].double()
        rows = torch.tensor([text_index[t] for t in item.negatives])
        neg[n, : len(item.negatives)] = text_feats[rows].double() @ img  # K
    return pos, neg


def evaluate_compositionality(
    encoder: ImageTextEncoder,
    data: Sequence[str],
    image_root: Optional[str] = None,
    fmt: str = "auto",
    skip_missing: bool = False,
    batch_size: int = 64,
    device: Optional[str] = None,
    num_workers: int = 0,
) -> Dict[str, Any]:
    """Per-category accuracy of ``encoder`` on SugarCrepe / ARO files (paths or directories of json files).

    Returns the report described in the module docstring. Every distinct (image, crop) and every distinct caption
    is encoded once.
    """
    sets = [load_compositional_set(path, image_root, fmt) for path in annotation_files(data)]
    skipped = {s.name: drop_missing_images(s, skip_missing) for s in sets}
    for s in sets:
        if not s.items:
            raise ValueError(f"{s.source}: no item left to evaluate ({skipped[s.name]} skipped for missing images)")
    image_keys = list(dict.fromkeys((item.image, item.box) for s in sets for item in s.items))
    texts = list(dict.fromkeys(t for s in sets for item in s.items for t in (item.positive, *item.negatives)))
    logger.info(
        "compositionality: %d categories, %d items, %d distinct images, %d distinct captions",
        len(sets),
        sum(len(s.items) for s in sets),
        len(image_keys),
        len(texts),
    )
    image_feats = _encode_images(encoder, image_keys, batch_size, device, num_workers)  # N_img x D
    text_feats = F.normalize(encode_captions(encoder, texts, batch_size), dim=-1)  # N_txt x D
    image_index = {key: i for i, key in enumerate(image_keys)}
    text_index = {t: i for i, t in enumerate(texts)}

    categories: Dict[str, Dict[str, Any]] = {}
    for s in sets:
        pos, neg = score_items(s.items, image_feats, image_index, text_feats, text_index)
        correct = compositional_correct(pos, neg).numpy()  # N
        report: Dict[str, Any] = {
            "accuracy": float(100.0 * correct.mean()),
            "num_items": len(s.items),
            "num_skipped_missing": skipped[s.name],
            "format": s.format,
            "max_negatives": int(neg.shape[1]),
        }
        groups = [item.group for item in s.items]
        if all(g is not None for g in groups):
            by_group: Dict[str, List[bool]] = {}
            for g, ok in zip(groups, correct.tolist()):
                by_group.setdefault(g, []).append(ok)
            report["group_accuracy"] = {g: float(100.0 * np.mean(v)) for g, v in sorted(by_group.items())}
            report["group_macro_accuracy"] = float(np.mean(list(report["group_accuracy"].values())))
        categories[s.name] = report
    return {
        "categories": categories,
        "macro_accuracy": float(np.mean([c["accuracy"] for c in categories.values()])),
        "num_items": sum(c["num_items"] for c in categories.values()),
        "num_categories": len(categories),
    }


def format_compositionality_table(metrics: Dict[str, Any]) -> str:
    """A short text table of the report returned by :func:`evaluate_compositionality`."""
    lines = [f"{'category':<32}{'accuracy':>10}{'items':>8}"]
    for name, c in metrics["categories"].items():
        lines.append(f"{name:<32}{c['accuracy']:>10.2f}{c['num_items']:>8d}")
    lines.append(f"{'macro average':<32}{metrics['macro_accuracy']:>10.2f}{metrics['num_items']:>8d}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compositionality accuracy (SugarCrepe / ARO) of a unilm_vl "
        "checkpoint: positive caption scored above every hard negative."
    )
    add_common_eval_args(parser)
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="annotation json files, or directories whose *.json files are the categories",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="directory the image paths are relative to (default: the directory of each json)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="expected annotation format; auto tells SugarCrepe and ARO apart by structure",
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop (and count) items whose image file is missing instead of failing",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    from unilm_vl.eval import common  # loads fairseq on use; only the CLI needs it

    encoder = common.load_encoder(args.checkpoint, device=args.device)
    metrics = evaluate_compositionality(
        encoder,
        args.data,
        image_root=args.image_root,
        fmt=args.format,
        skip_missing=args.skip_missing,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
    )
    logger.info("compositionality results\n%s", format_compositionality_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
