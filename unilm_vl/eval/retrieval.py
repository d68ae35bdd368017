"""Zero-shot image-text retrieval (COCO, Flickr30k): R@1/5/10, mean / median rank, rsum.

Protocol (CLIP; COSMOS ``compute_retrieval``, ExplainableML/cosmos ``src/training/train.py``): images and captions are
encoded separately by an :class:`~unilm_vl.eval.common.ImageTextEncoder`, ``sim = image_feats @ text_feats.T`` (the
logit scale does not change ranks), and the ranks come from :func:`unilm_vl.eval.metrics.retrieval_metrics`: an image
is ranked by its best GT caption, a caption by its single GT image. Ties count against the ground truth: an item
scoring the same as the GT ranks above it (the metrics module says why), so a model with constant scores gets R@1 = 0,
never more than chance; without ties the ranks are the sort-based ones of those protocols.

Annotation formats, told apart by their structure (never by the file name):

- **Karpathy** split file (``dataset_coco.json``, ``dataset_flickr30k.json``)::

      {"images": [{"filepath": "val2014", "filename": "x.jpg", "split": "test",
                   "sentences": [{"raw": "A caption."}, ...]}, ...]}

  Only the entries whose ``split`` equals ``--split`` are used (``restval`` is its own split). ``filepath`` is
  optional (the Flickr30k file has none). Image path: ``image_root / filepath / filename``.
- **COCO captions** (``captions_val2017.json``, what COSMOS evaluates on)::

      {"images": [{"id": 1, "file_name": "x.jpg"}, ...], "annotations": [{"image_id": 1, "caption": "..."}, ...]}

  The file is the split; ``--split`` is ignored. Image path: ``image_root / file_name``.
- **Flickr list** (``flickr30k_test.json`` of the ALBEF / COSMOS releases)::

      [{"image": "flickr30k-images/x.jpg", "caption": ["...", ...]}, ...]

  ``caption`` may also be a single string; ``--split`` is ignored. Image path: ``image_root / image``.

``image_root`` defaults to the directory of the annotation file. Images without any caption cannot be ranked
image->text and are dropped with a warning. A missing image file raises ``FileNotFoundError`` before anything is
encoded: an evaluation set must be complete.

CLI::

    python -m unilm_vl.eval.retrieval --checkpoint CKPT --data KARPATHY_JSON [--image-root DIR] [--split test]
        [--batch-size 64] [--device cpu] [--workers 0] [--output out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from PIL import Image

from unilm_vl.cli import progress
from unilm_vl.data.decode import load_image
from unilm_vl.data.jsonio import read_json
from unilm_vl.eval.common import ImageTextEncoder, add_common_eval_args, write_metrics
from unilm_vl.eval.metrics import retrieval_metrics
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


@dataclass
class RetrievalSet:
    """An evaluation set: image files, all captions flattened, and the GT image index of each caption."""

    image_paths: List[str]
    captions: List[str]
    text_to_image: List[int]
    format: str


def _is_coco_captions(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def _is_karpathy(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and "annotations" not in data
        and all(isinstance(e, dict) and "sentences" in e for e in data["images"])
    )


def _is_flickr_list(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(e, dict) and "image" in e and "caption" in e for e in data)


def _clean(caption: Any, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"empty or non-string caption {caption!r} in {where}")
    return caption.strip()


def _from_karpathy(data: Dict[str, Any], root: str, split: str, where: str):
    entries = [e for e in data["images"] if e.get("split") == split]
    if not entries:
        splits = sorted({str(e.get("split")) for e in data["images"]})
        raise ValueError(f"{where}: no image has split {split!r}; the splits present are {splits}")
    for e in entries:
        path = os.path.join(root, e.get("filepath", ""), e["filename"])
        captions = []
        for sentence in e["sentences"]:
            if "raw" not in sentence:
                raise ValueError(f"{where}: a sentence of {e['filename']} has no 'raw' field: {sentence!r}")
            captions.append(_clean(sentence["raw"], where))
        yield path, captions


def _from_coco_captions(data: Dict[str, Any], root: str, where: str):
    by_id: Dict[Any, List[str]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_id:
            raise ValueError(f"{where}: annotation {ann.get('id')} points to unknown image_id {ann['image_id']}")
        by_id[ann["image_id"]].append(_clean(ann["caption"], where))
    for image in data["images"]:
        yield os.path.join(root, image["file_name"]), by_id[image["id"]]


def _from_flickr_list(data: List[Dict[str, Any]], root: str, where: str):
    for e in data:
        captions = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        yield os.path.join(root, e["image"]), [_clean(c, where) for c in captions]


def load_retrieval_set(annotation_path: str, image_root: Optional[str] = None, split: str = "test") -> RetrievalSet:
    """Read a Karpathy, COCO-captions or Flickr-list annotation file (see the module docstring)."""
    data = read_json(annotation_path, "retrieval annotation")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(annotation_path))
    if _is_coco_captions(data):
        fmt, items = "coco_captions", _from_coco_captions(data, root, annotation_path)
    elif _is_karpathy(data):
        fmt, items = "karpathy", _from_karpathy(data, root, split, annotation_path)
    elif _is_flickr_list(data):
        fmt, items = "flickr_list", _from_flickr_list(data, root, annotation_path)
    else:
        raise ValueError(
            f"{annotation_path}: unrecognised annotation format; expected a Karpathy split file "
            "({'images': [{'filename', 'sentences', ...}]}), COCO captions ({'images': [...], 'annotations': "
            "[...]}) or a Flickr list ([{'image', 'caption'}])"
        )
    if fmt != "karpathy" and split != "test":
        logger.warning("%s is in %s format, which holds one split; --split %r is ignored", annotation_path, fmt, split)

    paths: List[str] = []
    captions: List[str] = []
    text_to_image: List[int] = []
    dropped = 0
    for path, image_captions in items:
        if not image_captions:
            dropped += 1
            continue
        text_to_image.extend([len(paths)] * len(image_captions))
        captions.extend(image_captions)
        paths.append(path)
    if dropped:
        logger.warning("%s: dropped %d images without any caption", annotation_path, dropped)
    if not paths:
        raise ValueError(f"{annotation_path}: no image with a caption")
    return RetrievalSet(paths, captions, text_to_image, fmt)


def check_files_exist(paths: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` naming the first missing files (and how many are missing) if any is absent."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} evaluation images are missing: {shown}"
            + (", ..." if len(missing) > 5 else "")
        )


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> transformed tensors, decoded with :func:`unilm_vl.data.decode.load_image`."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index]))


@torch.no_grad()
def encode_image_files(
    encoder: ImageTextEncoder,
    paths: Sequence[str],
    batch_size: int = 64,
    device: Optional[str] = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Encode image files in order with ``encoder.image_transform`` and ``encoder.encode_images``.

    Batches are moved to ``device`` when it is given. Returns N x D float32 on the CPU.
    """
    return encode_image_dataset(encoder, _ImageFiles(paths, encoder.image_transform), batch_size, device, num_workers)


@torch.no_grad()
def encode_image_dataset(
    encoder: ImageTextEncoder,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    device: Optional[str] = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Encode a map-style dataset of transformed image tensors in order with ``encoder.encode_images``; batches
    are moved to ``device`` when it is given. Returns N x D float32 on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = []
    for images in progress(loader, "encoding images"):  # B x 3 x H x W
        if device is not None:
            images = images.to(device)
        feats.append(encoder.encode_images(images).float().cpu())  # B x D
    return torch.cat(feats)


@torch.no_grad()
def encode_captions(encoder: ImageTextEncoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Encode strings in order with ``encoder.encode_texts``; returns N x D float32 on the CPU."""
    texts = list(texts)
    return torch.cat(
        [
            encoder.encode_texts(texts[i : i + batch_size]).float().cpu()
            for i in progress(range(0, len(texts), batch_size), "encoding texts")
        ]
    )


def evaluate_retrieval(
    encoder: ImageTextEncoder,
    karpathy_json: str,
    image_root: Optional[str] = None,
    split: str = "test",
    batch_size: int = 64,
    device: Optional[str] = None,
    num_workers: int = 0,
) -> Dict[str, float]:
    """Image<->text retrieval metrics of ``encoder`` on one annotation file (any format of the module docstring).

    Returns :func:`~unilm_vl.eval.metrics.retrieval_metrics` (``i2t_R@1/5/10``, ``t2i_R@1/5/10``, mean / median
    ranks, ``rsum``) plus ``num_images`` and ``num_texts``.
    """
    data = load_retrieval_set(karpathy_json, image_root, split)
    check_files_exist(data.image_paths)
    logger.info(
        "retrieval on %s (%s): %d images, %d captions",
        karpathy_json,
        data.format,
        len(data.image_paths),
        len(data.captions),
    )
    image_feats = encode_image_files(encoder, data.image_paths, batch_size, device, num_workers)  # N_img x D
    text_feats = encode_captions(encoder, data.captions, batch_size)  # N_txt x D
    sim = image_feats @ text_feats.T  # N_img x N_txt
    metrics: Dict[str, float] = retrieval_metrics(sim, data.text_to_image)
    metrics["num_images"] = len(data.image_paths)
    metrics["num_texts"] = len(data.captions)
    return metrics


def format_retrieval_table(metrics: Dict[str, float]) -> str:
    """A fixed-width text table of the metrics returned by :func:`evaluate_retrieval`."""
    header = f"{'direction':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean rank':>11}{'median rank':>13}"
    lines = [header, "-" * len(header)]
    for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
        lines.append(
            f"{label:<12}{metrics[f'{name}_R@1']:>8.2f}{metrics[f'{name}_R@5']:>8.2f}"
            f"{metrics[f'{name}_R@10']:>8.2f}{metrics[f'{name}_mean_rank']:>11.2f}"
            f"{metrics[f'{name}_median_rank']:>13.1f}"
        )
    lines.append(f"rsum {metrics['rsum']:.2f}   ({metrics['num_images']} images, {metrics['num_texts']} captions)")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Zero-shot image-text retrieval of a unilm_vl checkpoint.")
    add_common_eval_args(parser)
    parser.add_argument(
        "--data", required=True, help="annotation json: Karpathy split file, COCO captions or Flickr list"
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="directory the image paths are relative to (default: the directory of --data)",
    )
    parser.add_argument("--split", default="test", help="Karpathy split to evaluate (ignored by the other formats)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    from unilm_vl.eval.common import load_encoder  # loads fairseq; only the CLI needs it

    encoder = load_encoder(args.checkpoint, device=args.device)
    metrics = evaluate_retrieval(
        encoder,
        args.data,
        image_root=args.image_root,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
    )
    print(format_retrieval_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
