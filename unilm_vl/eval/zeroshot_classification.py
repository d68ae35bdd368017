"""Zero-shot image classification (and an optional linear probe) on an ImageFolder layout.

Protocol (CLIP; OpenCLIP ``zero_shot_classifier``, as ExplainableML/cosmos and facebookresearch/clip-rocket
``eval_zeroshot.py`` run it): each class weight is the re-normalised mean of the L2-normalised embeddings of all its
prompts (:func:`unilm_vl.eval.metrics.zeroshot_classifier`), ``logits = 100 * image_feats @ W``, and the report holds
top-1, top-5 and mean per-class (balanced top-1) accuracy, all in percent. A class whose logit ties with the true
class's counts above it (:mod:`unilm_vl.eval.metrics`: constant logits score 0, not 100); the linear probe predicts
with scikit-learn's arg-max, which gives a tie to the lowest class index, whatever the true class.

Data layout, as torchvision's ``ImageFolder``::

    root/<class folder>/**/*.jpg|jpeg|png|...

The class index of a folder is its position among the sorted folder names (``000, 001, ...`` or any names).
Class names come as a list or from a text file with one name per line, in class-index order; their number must
equal the number of folders. Templates come as a list or from a text file with one template per line, each
holding ``{}`` where the class name goes. Empty lines are skipped in both files.

Linear probe (``--linear-probe --train-root DIR/train``): scikit-learn ``LogisticRegression`` (L-BFGS, inverse
regularisation ``--probe-c``) fit on the encoder's image features of the train folder, scored on the test folder.
The train folder must have the same class folders as the test folder.

CLI::

    python -m unilm_vl.eval.zeroshot_classification --checkpoint CKPT --root DIR/test
        --classnames DIR/classnames.txt --templates DIR/templates.txt [--batch-size 64] [--device cpu]
        [--per-class] [--linear-probe --train-root DIR/train [--probe-c 1.0]] [--l2l-ensemble] [--output out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from unilm_vl.eval.common import ImageTextEncoder, add_common_eval_args, write_metrics
from unilm_vl.eval.metrics import (
    ensemble_scores,
    mean_per_class_accuracy,
    per_class_accuracy,
    topk_accuracy,
    zeroshot_classifier,
)
from unilm_vl.eval.retrieval import check_files_exist, encode_image_files
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

# The extensions torchvision's ImageFolder accepts (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolderSet:
    """Class folder names (sorted; index = class), image paths and their class indices."""

    class_folders: List[str]
    image_paths: List[str]
    labels: List[int]


def load_image_folder(root: str) -> ImageFolderSet:
    """List ``root/<class folder>/**/<image>`` in a deterministic order (sorted folders, sorted files)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder root not found: {root}")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    paths: List[str] = []
    labels: List[int] = []
    for index, folder in enumerate(folders):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder), followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, name))
                    labels.append(index)
    if not paths:
        raise ValueError(f"{root} holds no image files with extensions {IMAGE_EXTENSIONS}")
    return ImageFolderSet(folders, paths, labels)


def read_lines(path: str) -> List[str]:
    """Non-empty lines of a UTF-8 text file, stripped of surrounding whitespace."""
    with open(path, "r", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def _resolve_list(value: Union[str, Sequence[str]]) -> List[str]:
    return read_lines(value) if isinstance(value, str) else list(value)


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise ValueError("no prompt templates given")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template must contain '{{}}' for the class name; these do not: {bad[:5]}")


def fit_linear_probe(
    train_feats: np.ndarray,
    train_labels: Sequence[int],
    test_feats: np.ndarray,
    test_labels: Sequence[int],
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test top-1 accuracy (percent) of a multinomial logistic regression fit on frozen features.

    ``LogisticRegression(C=c, solver="lbfgs")`` on ``train_feats`` (N x D) is scored on ``test_feats``:
    ``100 * mean(argmax_c p(c | x_n) == y_n)``.
    """
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(np.asarray(train_feats), np.asarray(train_labels))
    return float(100.0 * np.mean(probe.predict(np.asarray(test_feats)) == np.asarray(test_labels)))


def evaluate_zeroshot(
    encoder: ImageTextEncoder,
    root: str,
    classnames: Union[str, Sequence[str]],
    templates: Union[str, Sequence[str]],
    batch_size: int = 64,
    per_class: bool = False,
    device: Optional[str] = None,
    num_workers: int = 0,
    train_root: Optional[str] = None,
    probe_c: float = 1.0,
    l2l_encoder: Optional[ImageTextEncoder] = None,
) -> Dict[str, Any]:
    """Zero-shot classification metrics of ``encoder`` on the ImageFolder at ``root``.

    ``classnames`` and ``templates`` are lists, or paths of text files with one entry per line.
    Returns ``top1``, ``top5``, ``mean_per_class_accuracy`` (percent), ``num_images`` and ``num_classes``; with
    ``per_class`` also ``per_class_top1`` (class name -> percent, ``nan`` for a class without test images); with
    ``train_root`` also ``linear_probe_top1`` and ``num_train_images`` (see :func:`fit_linear_probe`); with
    ``l2l_encoder`` (clip-rocket's second head) also ``top1_h``, ``top5_h`` and ``ensemble_top1`` (``"w"`` ->
    top-1 of ``w * z_sim + (1 - w) * h_sim`` for w = 0.1 ... 0.9, :func:`ensemble_scores`).
    Raises ``ValueError`` when the number of class folders differs from the number of class names.
    """
    names = _resolve_list(classnames)
    prompts = _resolve_list(templates)
    _check_templates(prompts)
    data = load_image_folder(root)
    if len(data.class_folders) != len(names):
        source = classnames if isinstance(classnames, str) else "the given list"
        raise ValueError(
            f"{root} has {len(data.class_folders)} class folders but {len(names)} class names were "
            f"given ({source}); class i is the i-th folder in sorted order, so they must match"
        )
    check_files_exist(data.image_paths)
    logger.info(
        "zero-shot classification on %s: %d images, %d classes, %d templates",
        root,
        len(data.image_paths),
        len(names),
        len(prompts),
    )

    image_feats = encode_image_files(encoder, data.image_paths, batch_size, device, num_workers)  # N x D
    weights = zeroshot_classifier(encoder.encode_texts, names, prompts)  # D x C
    logits = 100.0 * image_feats @ weights  # N x C
    labels = torch.tensor(data.labels)
    metrics: Dict[str, Any] = topk_accuracy(logits, labels, ks=(1, 5))
    metrics["mean_per_class_accuracy"] = mean_per_class_accuracy(logits, labels, len(names))
    metrics["num_images"] = len(data.image_paths)
    metrics["num_classes"] = len(names)
    if per_class:
        metrics["per_class_top1"] = dict(zip(names, per_class_accuracy(logits, labels, len(names))))
    if l2l_encoder is not None:
        h_feats = encode_image_files(l2l_encoder, data.image_paths, batch_size, device, num_workers)  # N x D_h
        h_logits = 100.0 * h_feats @ zeroshot_classifier(l2l_encoder.encode_texts, names, prompts)  # N x C
        h_top = topk_accuracy(h_logits, labels, ks=(1, 5))
        metrics["top1_h"], metrics["top5_h"] = h_top["top1"], h_top["top5"]
        metrics["ensemble_top1"] = {
            f"{w / 10:.1f}": topk_accuracy(ensemble_scores(logits, h_logits, w / 10), labels, ks=(1,))["top1"]
            for w in range(1, 10)
        }

    if train_root is not None:
        train = load_image_folder(train_root)
        if train.class_folders != data.class_folders:
            raise ValueError(
                f"train folder {train_root} has classes {train.class_folders[:5]}... "
                f"({len(train.class_folders)}) but test folder {root} has {data.class_folders[:5]}... "
                f"({len(data.class_folders)}); they must be the same"
            )
        check_files_exist(train.image_paths)
        logger.info("linear probe: %d train images from %s, C=%g", len(train.image_paths), train_root, probe_c)
        train_feats = encode_image_files(encoder, train.image_paths, batch_size, device, num_workers)
        metrics["linear_probe_top1"] = fit_linear_probe(
            train_feats.numpy(), train.labels, image_feats.numpy(), data.labels, c=probe_c
        )
        metrics["num_train_images"] = len(train.image_paths)
    return metrics


def format_zeroshot_table(metrics: Dict[str, Any]) -> str:
    """A short text report of the metrics returned by :func:`evaluate_zeroshot`."""
    lines = [
        f"{metrics['num_images']} images, {metrics['num_classes']} classes",
        f"top-1                    {metrics['top1']:7.2f}",
        f"top-5                    {metrics['top5']:7.2f}",
        f"mean per-class accuracy  {metrics['mean_per_class_accuracy']:7.2f}",
    ]
    if "top1_h" in metrics:
        lines.append(f"l2l head top-1 / top-5    {metrics['top1_h']:7.2f} {metrics['top5_h']:7.2f}")
        lines.append(
            "ensemble top-1 (w z + (1-w) h)  "
            + "  ".join(f"{w}:{acc:.1f}" for w, acc in metrics["ensemble_top1"].items())
        )
    if "linear_probe_top1" in metrics:
        lines.append(
            f"linear probe top-1       {metrics['linear_probe_top1']:7.2f}"
            f"   ({metrics['num_train_images']} train images)"
        )
    for name, acc in metrics.get("per_class_top1", {}).items():
        lines.append(f"  {name:<30} {acc:7.2f}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Zero-shot classification of a unilm_vl checkpoint.")
    add_common_eval_args(parser)
    parser.add_argument("--root", required=True, help="test ImageFolder: root/<class folder>/<image>")
    parser.add_argument(
        "--classnames", required=True, help="text file with one class name per line, in sorted-folder order"
    )
    parser.add_argument("--templates", required=True, help="text file with one prompt template per line, with {}")
    parser.add_argument("--per-class", action="store_true", help="also report the top-1 accuracy of every class")
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="also fit a logistic-regression probe on --train-root features and report its accuracy",
    )
    parser.add_argument("--train-root", default=None, help="train ImageFolder for --linear-probe")
    parser.add_argument(
        "--l2l-ensemble",
        action="store_true",
        help="clip_rocket models: also score the l2l head and the ensembles w*z + (1-w)*h",
    )
    parser.add_argument(
        "--probe-c", type=float, default=1.0, help="inverse L2 regularisation strength C of the linear probe"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.linear_probe and not args.train_root:
        parser.error("--linear-probe needs --train-root")
    setup_cli_logging()
    from unilm_vl.eval.common import load_encoder  # loads fairseq; only the CLI needs it

    encoder = load_encoder(args.checkpoint, device=args.device)
    l2l_encoder = load_encoder(args.checkpoint, device=args.device, head="l2l") if args.l2l_ensemble else None
    metrics = evaluate_zeroshot(
        encoder,
        args.root,
        args.classnames,
        args.templates,
        batch_size=args.batch_size,
        per_class=args.per_class,
        device=args.device,
        num_workers=args.workers,
        train_root=args.train_root if args.linear_probe else None,
        probe_c=args.probe_c,
        l2l_encoder=l2l_encoder,
    )
    print(format_zeroshot_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
