"""Zero-shot semantic segmentation from patch-text similarity (COSMOS / SCLIP protocol), mIoU on a VOC layout.

Protocol (ExplainableML/cosmos ``src/seg_eval.py`` / ``src/training/clip_segmentor.py``):

1. **Class queries.** Each line of the class-name file is one class, in label order (line 0 = label 0); a line
   ``"a, b"`` lists synonyms. Every *name* is one query: its prompts over all templates are encoded,
   L2-normalised, averaged and re-normalised (:func:`unilm_vl.eval.metrics.zeroshot_classifier`). The default
   templates are OpenAI's 80 ImageNet templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``), as in the reference.
2. **Preprocessing.** RGB in [0, 1], the short side resized (bilinear, keeping the aspect ratio) to
   ``short_side``, normalised with the image tower's mean / std (mmseg's 0-255 mean / std in the reference are
   the OpenAI values times 255, i.e. the same).
3. **Sliding window.** Square windows of the tower's input size ``S`` with stride ``stride`` (reference 224 / 112:
   the default stride is ``S // 2``; windows at the bottom / right border are shifted inside the image, mmseg's
   ``slide_inference``). Per window, the patch tokens of the encoder's ``encode_image_dense`` (after ``ln_post``,
   times ``proj``) are L2-normalised and scored against the queries, reshaped to the ``sqrt(P) x sqrt(P)`` patch
   grid, upsampled bilinearly to ``S x S`` and accumulated; overlapping windows are averaged. The averaged logits
   are upsampled bilinearly to the original image (= mask) size.
4. **Labels** (:func:`logits_to_labels`): ``softmax(logit_scale * logits)`` over all queries per pixel, then the max
   over the names of each class. With ``area_thd > 0``, a foreground class (label != 0) whose arg-max area is at
   most ``area_thd`` times the total arg-max area of the foreground classes has its probabilities set to 0.
   Then the arg-max over classes; pixels whose winning probability is below ``prob_thd`` become 0 (background).
5. **Metric.** A confusion matrix accumulated over the whole dataset, target 255 ignored, and the VOC / mmseg
   IoU per class (:func:`unilm_vl.eval.metrics.mean_iou`): classes with zero union (absent from both truth and
   prediction over the whole dataset) are excluded from the mean; mIoU and IoUs lie in [0, 1].

Background (label 0): ``--background query`` (default; the reference's VOC-21 setting) queries class 0 like any
other class with its own name(s) from the class-name file (the synthetic world writes ``background``; SCLIP-style
lists of stuff names such as ``"sky, wall, floor"`` work too), and ``prob_thd`` additionally sends low-confidence
pixels to 0. ``--background threshold`` does not query class 0 at all: the softmax runs over the other classes
and only ``prob_thd`` produces background. ``--background ignore`` is the reference's "without background" setting
(VOC-20, Context-59: mmseg's ``reduce_zero_label``): class 0 is not queried, its pixels are left out of the metric
(like 255), and ``mIoU`` is the mean over the other classes, so it measures only which class each object pixel
gets; use it with ``--prob-thd 0 --area-thd 0`` (the reference's settings there; a pixel sent to 0 by a threshold
counts as wrong). Defaults are the reference's VOC-21 settings: ``logit_scale 65``,
``prob_thd 0.1``, ``area_thd 0.1``; the reference's short side is 1.5x its 224 window (336), so the default
``short_side`` is ``round(1.5 * S)``.

``--use-csa`` runs the towers' last block with SCLIP's correlative self-attention
(:func:`unilm_vl.modules.clip.csa_last_block`; off by default, as in the reference). Not implemented: PAMR (off
there). COSMOS evaluates its EMA *teacher*; which tower a model's
``encode_image_dense`` uses is that model's choice.

Data layout (PASCAL VOC)::

    root/ImageSets/Segmentation/<split>.txt      one image id per line
    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png              palette / grey PNG of labels: 0 background, 1..C-1, 255 ignore
    root/classnames.txt                          (default --classnames) one class per line, "a, b" = synonyms

CLI::

    python -m unilm_vl.eval.segmentation --checkpoint CKPT --data DIR/eval/segmentation [--split val]
        [--classnames FILE] [--templates FILE] [--background query|threshold|ignore] [--use-csa] [--logit-scale 65]
        [--prob-thd 0.1] [--area-thd 0.1] [--short-side N] [--stride N] [--batch-size 64] [--device cpu]
        [--workers 0] [--output metrics.json]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unilm_vl.cli import progress
from unilm_vl.data.decode import load_image
from unilm_vl.eval.common import DenseImageTextEncoder, add_common_eval_args, write_metrics
from unilm_vl.eval.metrics import confusion_matrix, mean_iou, zeroshot_classifier
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

BACKGROUND_MODES = ("query", "threshold", "ignore")
IGNORE_INDEX = 255


@dataclass
class SegmentationSet:
    """Image ids of one split with their image and mask paths, and the class names (synonym lists) by label."""

    ids: List[str]
    image_paths: List[str]
    mask_paths: List[str]
    classnames: List[List[str]]


def read_lines(path: str) -> List[str]:
    """Non-empty, stripped lines of a UTF-8 text file; a missing file raises naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "r", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def parse_classnames(lines: Sequence[str], where: str) -> List[List[str]]:
    """One class per line, synonyms separated by commas: ``"sky, wall"`` -> ``["sky", "wall"]``."""
    classes = []
    for index, line in enumerate(lines):
        names = [n.strip() for n in line.split(",") if n.strip()]
        if not names:
            raise ValueError(f"{where}: class {index} has no name ({line!r})")
        classes.append(names)
    if len(classes) > IGNORE_INDEX:
        raise ValueError(f"{where}: {len(classes)} classes, but labels must stay below the ignore label {IGNORE_INDEX}")
    return classes


def load_segmentation_set(root: str, split: str = "val", classnames: Optional[str] = None) -> SegmentationSet:
    """The VOC layout of the module docstring; a missing split file, image or mask raises naming the paths."""
    ids = read_lines(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))
    if not ids:
        raise ValueError(f"{root}: split {split!r} lists no image")
    images = [os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids]
    masks = [os.path.join(root, "SegmentationClass", f"{i}.png") for i in ids]
    missing = [p for p in images + masks if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image / mask files of split {split!r} are missing: "
            + ", ".join(missing[:5])
            + (", ..." if len(missing) > 5 else "")
        )
    names_path = classnames if classnames is not None else os.path.join(root, "classnames.txt")
    return SegmentationSet(ids, images, masks, parse_classnames(read_lines(names_path), names_path))


def read_mask(path: str) -> np.ndarray:
    """H x W uint8 labels of a palette (``P``) or grey (``L``) PNG; an RGB mask is an error (its colours are not
    labels)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: segmentation masks must be palette or grey PNGs of labels, got mode {img.mode}")
        return np.array(img, dtype=np.uint8)


def load_templates(path: Optional[str]) -> List[str]:
    """Templates with ``{}`` from a file (one per line), or OpenAI's 80 ImageNet templates when ``path`` is None."""
    if path is None:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    else:
        templates = read_lines(path)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"templates ({path or 'OpenAI ImageNet'}) must be non-empty and each hold '{{}}'; bad: {bad[:5]}"
        )
    return templates


def preprocess(image: Image.Image, short_side: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> 3 x H' x W' float tensor: [0, 1], short side resized to ``short_side`` (bilinear, aspect kept),
    normalised per channel."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # 3 x H x W
    h, w = x.shape[1:]
    scale = short_side / min(h, w)
    size = (max(short_side, round(h * scale)), max(short_side, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean_t) / std_t  # 3 x H' x W'


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Window offsets along one axis (mmseg ``slide_inference``): ``ceil((length - crop) / stride) + 1`` windows at
    multiples of ``stride``, the last one shifted back so that it ends at ``length``."""
    if length < crop:
        raise ValueError(f"image side {length} is smaller than the window {crop}")
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, length - crop) for i in range(count)]


@torch.no_grad()
def sliding_window_logits(
    encoder: DenseImageTextEncoder,
    image: torch.Tensor,
    queries: torch.Tensor,
    crop: int,
    stride: int,
    batch_size: int = 64,
    device: Optional[str] = None,
) -> torch.Tensor:
    """Patch-query cosine logits of a preprocessed image (3 x H x W), Q x H x W, averaged over overlapping windows.

    ``queries`` is Q x D (L2-normalised). Each window's patch tokens are L2-normalised, scored against the queries,
    laid out on their square grid and upsampled bilinearly to the window.
    """
    _, h, w = image.shape
    boxes = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    total = torch.zeros(queries.shape[0], h, w)  # Q x H x W
    count = torch.zeros(1, h, w)  # 1 x H x W
    for b0 in range(0, len(boxes), batch_size):
        chunk = boxes[b0 : b0 + batch_size]
        crops = torch.stack([image[:, y : y + crop, x : x + crop] for y, x in chunk])  # B x 3 x S x S
        if device is not None:
            crops = crops.to(device)
        tokens = F.normalize(encoder.encode_image_dense(crops).float().cpu(), dim=-1)  # B x P x D
        grid = math.isqrt(tokens.shape[1])
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
        logits = tokens @ queries.T  # B x P x Q
        logits = logits.transpose(1, 2).reshape(len(chunk), -1, grid, grid)  # B x Q x g x g
        logits = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)  # B x Q x S x S
        for (y, x), window in zip(chunk, logits):
            total[:, y : y + crop, x : x + crop] += window
            count[:, y : y + crop, x : x + crop] += 1
    return total / count  # Q x H x W


def logits_to_labels(
    logits: torch.Tensor,
    query_class: Sequence[int],
    num_classes: int,
    logit_scale: float = 65.0,
    prob_thd: float = 0.0,
    area_thd: float = 0.0,
) -> torch.Tensor:
    """Per-pixel labels (H x W, long) from query logits (Q x H x W); step 4 of the module docstring.

    ``query_class[q]`` is the label of query q (several queries may share a label: synonyms). Labels without any
    query are never predicted except 0, which low-confidence pixels (winning probability ``< prob_thd``) get.
    ``area_thd > 0`` zeroes the probabilities of each foreground label (!= 0) whose arg-max pixel count is at most
    ``area_thd`` times the arg-max pixel count of all foreground labels.
    """
    q, h, w = logits.shape
    qc = torch.as_tensor(list(query_class), dtype=torch.long)
    if qc.numel() != q:
        raise ValueError(f"query_class has {qc.numel()} entries for {q} queries")
    if int(qc.min()) < 0 or int(qc.max()) >= num_classes:
        raise ValueError(f"query labels must lie in [0, {num_classes})")
    probs = torch.softmax(logit_scale * logits.double(), dim=0)  # Q x H x W
    classes = torch.zeros(num_classes, h, w, dtype=torch.float64)  # C x H x W
    classes.scatter_reduce_(0, qc[:, None, None].expand(q, h, w), probs, reduce="amax", include_self=True)
    if area_thd > 0:
        winners = classes.argmax(0)  # H x W
        area = torch.bincount(winners.reshape(-1), minlength=num_classes).double()  # C
        small = area <= area_thd * area[1:].sum()
        small[0] = False
        classes[small] = 0.0
    best, labels = classes.max(0)  # H x W, H x W
    labels[best < prob_thd] = 0
    return labels


def build_queries(
    encoder: DenseImageTextEncoder, classnames: Sequence[Sequence[str]], templates: Sequence[str], background: str
) -> Tuple[torch.Tensor, List[int]]:
    """Query embeddings (Q x D, one per name) and the label of each; class 0 is skipped unless ``query``."""
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
    first = 0 if background == "query" else 1
    names = [n for c in range(first, len(classnames)) for n in classnames[c]]
    query_class = [c for c in range(first, len(classnames)) for _ in classnames[c]]
    if not names:
        raise ValueError(f"no class to query ({background} background mode needs classes besides 0)")
    return zeroshot_classifier(encoder.encode_texts, names, templates).T.contiguous(), query_class  # Q x D


class _SegmentationItems(torch.utils.data.Dataset):
    """Index -> (mask path, preprocessed image 3 x H' x W', labels H x W); checks that image and mask sizes agree."""

    def __init__(self, data: SegmentationSet, short_side: int, mean: Sequence[float], std: Sequence[float]):
        self.data, self.short_side, self.mean, self.std = data, short_side, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, index: int) -> Tuple[str, torch.Tensor, np.ndarray]:
        image_path, mask_path = self.data.image_paths[index], self.data.mask_paths[index]
        image = load_image(image_path)
        target = read_mask(mask_path)
        if target.shape != (image.height, image.width):
            raise ValueError(
                f"{mask_path}: mask size {target.shape[::-1]} differs from the image size {image.size} of {image_path}"
            )
        return mask_path, preprocess(image, self.short_side, self.mean, self.std), target


def evaluate_segmentation(
    encoder: DenseImageTextEncoder,
    root: str,
    split: str = "val",
    classnames: Optional[str] = None,
    templates: Optional[Union[str, Sequence[str]]] = None,
    background: str = "query",
    logit_scale: float = 65.0,
    prob_thd: float = 0.1,
    area_thd: float = 0.1,
    short_side: Optional[int] = None,
    stride: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    num_workers: int = 0,
) -> Dict[str, Any]:
    """mIoU of ``encoder`` on the VOC-layout dataset at ``root`` (module docstring).

    ``templates`` is a file path, a list, or None (OpenAI's 80 ImageNet templates). Returns ``mIoU``,
    ``foreground_mIoU`` (the same mean without class 0, ``None`` if no other class is defined; background pixels
    dominate these datasets, so this isolates how well objects are segmented), ``per_class_iou`` (class name ->
    IoU, ``None`` where undefined), ``pixel_accuracy``, ``num_images``,
    ``num_classes``, ``num_valid_classes`` and the settings used.
    """
    data = load_segmentation_set(root, split, classnames)
    prompts = load_templates(templates) if templates is None or isinstance(templates, str) else list(templates)
    crop = int(encoder.image_size)
    short_side = int(short_side) if short_side is not None else round(1.5 * crop)
    stride = int(stride) if stride is not None else max(crop // 2, 1)
    if short_side < crop:
        raise ValueError(f"short_side {short_side} is smaller than the model's window {crop}")
    num_classes = len(data.classnames)
    queries, query_class = build_queries(encoder, data.classnames, prompts, background)
    logger.info(
        "segmentation on %s/%s: %d images, %d classes (%d queries), %d templates, window %d stride %d, "
        "short side %d, background %s",
        root,
        split,
        len(data.ids),
        num_classes,
        len(query_class),
        len(prompts),
        crop,
        stride,
        short_side,
        background,
    )
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    items = _SegmentationItems(data, short_side, encoder.image_mean, encoder.image_std)
    loader = torch.utils.data.DataLoader(items, batch_size=None, shuffle=False, num_workers=num_workers)
    for mask_path, x, target in progress(loader, "segmenting", unit="image"):  # 3 x H' x W', H x W
        target = np.asarray(target)
        logits = sliding_window_logits(encoder, x, queries, crop, stride, batch_size, device)  # Q x H' x W'
        logits = F.interpolate(logits[None], size=target.shape, mode="bilinear", align_corners=False)[0]
        pred = logits_to_labels(logits, query_class, num_classes, logit_scale, prob_thd, area_thd)  # H x W
        bad = (target != IGNORE_INDEX) & (target >= num_classes)
        if bad.any():
            raise ValueError(
                f"{mask_path}: labels {sorted(set(target[bad].tolist()))[:5]} are not below the "
                f"{num_classes} classes of the class-name file"
            )
        if background == "ignore":
            target = np.where(target == 0, IGNORE_INDEX, target)
        conf += confusion_matrix(pred.numpy(), target, num_classes, IGNORE_INDEX)
    scores = mean_iou(conf)
    names = [", ".join(c) for c in data.classnames]
    foreground = [v for v in scores["per_class_iou"][1:] if not math.isnan(v)]
    if background == "ignore":  # class 0 has no truth pixels: it is no class of the metric (predicted 0 = a miss)
        scores["per_class_iou"][0] = float("nan")
        scores["mIoU"] = float(np.mean(foreground)) if foreground else float("nan")
        scores["num_valid_classes"] = len(foreground)
    return {
        "mIoU": scores["mIoU"],
        "foreground_mIoU": float(np.mean(foreground)) if foreground else None,
        "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(names, scores["per_class_iou"])},
        "pixel_accuracy": scores["pixel_accuracy"],
        "num_images": len(data.ids),
        "num_classes": num_classes,
        "num_valid_classes": scores["num_valid_classes"],
        "num_pixels": scores["num_pixels"],
        "settings": {
            "background": background,
            "logit_scale": logit_scale,
            "prob_thd": prob_thd,
            "area_thd": area_thd,
            "window": crop,
            "stride": stride,
            "short_side": short_side,
            "num_templates": len(prompts),
            "csa": bool(getattr(encoder, "dense_csa", False)),
        },
    }


def format_segmentation_table(metrics: Dict[str, Any]) -> str:
    """A short text report of the metrics returned by :func:`evaluate_segmentation`."""
    fg = metrics["foreground_mIoU"]
    lines = [
        f"mIoU {metrics['mIoU']:.4f}  foreground mIoU "
        + ("n/a" if fg is None else f"{fg:.4f}")
        + f"  pixel accuracy {metrics['pixel_accuracy']:.4f}  "
        f"({metrics['num_images']} images, {metrics['num_valid_classes']}/{metrics['num_classes']} classes)"
    ]
    for name, iou in metrics["per_class_iou"].items():
        lines.append(f"  {name:<30} " + ("   n/a" if iou is None else f"{iou:.4f}"))
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Zero-shot semantic segmentation (patch-text similarity, mIoU) of "
        "a unilm_vl checkpoint on a VOC-layout dataset."
    )
    add_common_eval_args(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="VOC-layout root: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt",
    )
    parser.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt lists the image ids")
    parser.add_argument(
        "--classnames",
        default=None,
        help="one class per line in label order, 'a, b' = synonyms (default: DATA/classnames.txt)",
    )
    parser.add_argument(
        "--templates",
        default=None,
        help="prompt templates with {}, one per line (default: OpenAI's 80 ImageNet templates)",
    )
    parser.add_argument(
        "--background",
        default="query",
        choices=BACKGROUND_MODES,
        help="query: class 0 is queried by its name(s); threshold: class 0 only from --prob-thd; "
        "ignore: class 0 neither queried nor scored (the reference's VOC-20 setting; use "
        "--prob-thd 0 --area-thd 0)",
    )
    parser.add_argument(
        "--logit-scale",
        type=float,
        default=65.0,
        help="temperature multiplying the cosine logits before the softmax (reference VOC-21: 65)",
    )
    parser.add_argument(
        "--prob-thd",
        type=float,
        default=0.1,
        help="pixels whose winning class probability is below this become background (0)",
    )
    parser.add_argument(
        "--area-thd",
        type=float,
        default=0.1,
        help="drop foreground classes covering at most this fraction of the foreground; 0 = off",
    )
    parser.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="resize the image's short side to this (default: 1.5 x the model's input size)",
    )
    parser.add_argument(
        "--use-csa",
        action="store_true",
        help="last image block with correlative self-attention (SCLIP; the reference's --use-csa)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding-window stride in pixels (default: half the model's input size)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    from unilm_vl.eval import common  # loads fairseq on use; only the CLI needs it

    encoder = common.load_encoder(args.checkpoint, device=args.device)
    encoder.dense_csa = args.use_csa
    metrics = evaluate_segmentation(
        encoder,
        args.data,
        split=args.split,
        classnames=args.classnames,
        templates=args.templates,
        background=args.background,
        logit_scale=args.logit_scale,
        prob_thd=args.prob_thd,
        area_thd=args.area_thd,
        short_side=args.short_side,
        stride=args.stride,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.workers,
    )
    logger.info("segmentation results\n%s", format_segmentation_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
