"""Referring-expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg) of a ``kosmos2`` checkpoint: acc@0.5 of the
first predicted box (as microsoft/unilm ``kosmos-2/evaluation/refcoco/refexp_evaluate.py``), with the centre-box
baseline beside it.

Input: an MDETR-style json (``finetune_refcoco{,+,g}_<split>.json``): ``images[i]`` with ``file_name``,
``caption`` (the expression), ``width``, ``height``, ``dataset_name``; ``annotations[i].bbox`` ``[x, y, w, h]`` in
pixels, aligned 1:1 with ``images`` (matched by ``image_id`` == image ``id`` when present). One prompt per
expression, as the release's ``cook_data.py``: ``<grounding><phrase> {expression}</phrase>``. The model continues
with ``<object>...``; the boxes of the entities whose phrase equals the expression are the predictions (scaled to
pixels of the original image for the ``--image-view`` in float, as the release scores: no truncation to int), in
generation order; none -> a miss.

Baseline ``centre``: every expression gets the box centred in the image with the mean relative width and height of
the split's GT boxes (what a model that learned only the size prior would score).

CLI::

    python -m unilm_vl.eval.refcoco --checkpoint CKPT --data finetune_refcoco_testA.json --image-root DIR
        [--beam 1] [--batch-size 16] [--image-view squash] [--limit N] [--output metrics.json]
        [--generations out.jsonl]   # also write the raw generations
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from unilm_vl.checkpoint import load_kosmos2_inference
from unilm_vl.cli import progress
from unilm_vl.data.grounding import box_to_pixels
from unilm_vl.data.jsonio import read_json
from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.metrics import rec_accuracy, xywh_to_xyxy
from unilm_vl.inference.kosmos2 import IMAGE_VIEWS, PromptLine
from unilm_vl.logging_utils import setup_cli_logging
from unilm_vl.modules.generation import SearchConfig

logger = logging.getLogger(__name__)


def load_refexp(path: str, image_root: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Expressions of an MDETR-style json: ``{"id", "image", "expression", "width", "height", "group",
    "gt_xyxy"}``; image paths resolve against ``image_root`` (default: the json's directory)."""
    data = read_json(path, "referring-expression")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected an MDETR-style json with 'images' and 'annotations'")
    root = image_root or os.path.dirname(path)
    boxes = {ann.get("image_id", i): ann["bbox"] for i, ann in enumerate(data["annotations"])}
    items = []
    for i, image in enumerate(data["images"]):
        key = image.get("id", i)
        if key not in boxes:
            raise ValueError(f"{path}: image entry {key} has no annotation")
        for field in ("file_name", "caption", "width", "height"):
            if field not in image:
                raise ValueError(f"{path}: image entry {key} lacks {field!r}")
        items.append(
            {
                "id": key,
                "image": os.path.join(root, image["file_name"]),
                "expression": image["caption"],
                "width": image["width"],
                "height": image["height"],
                "group": image.get("dataset_name", "refexp"),
                "gt_xyxy": xywh_to_xyxy(boxes[key]).tolist(),
            }
        )
        if limit and len(items) >= limit:
            break
    missing = [it["image"] for it in items if not os.path.isfile(it["image"])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {path} not found, e.g. {missing[0]}")
    return items


def rec_prompt(expression: str) -> str:
    """The released RefCOCO prompt (``evaluation/refcoco/cook_data.py``)."""
    return f"<grounding><phrase> {expression.strip()}</phrase>"


def centre_baseline(items: Sequence[Dict[str, Any]]) -> Dict[Any, List[float]]:
    """A centred box of the mean relative GT size, in pixels of each image."""
    rel_w = sum((it["gt_xyxy"][2] - it["gt_xyxy"][0]) / it["width"] for it in items) / len(items)
    rel_h = sum((it["gt_xyxy"][3] - it["gt_xyxy"][1]) / it["height"] for it in items) / len(items)
    return {
        it["id"]: [
            it["width"] * (0.5 - rel_w / 2),
            it["height"] * (0.5 - rel_h / 2),
            it["width"] * (0.5 + rel_w / 2),
            it["height"] * (0.5 + rel_h / 2),
        ]
        for it in items
    }


def predicted_boxes(record: Dict[str, Any], item: Dict[str, Any], view: str) -> List[List[float]]:
    """Pixel boxes of the entities named like the expression, in generation order, in float
    (:func:`unilm_vl.data.grounding.box_to_pixels`, ``x * W`` as the release's ``refexp_evaluate.py``)."""
    name = item["expression"].strip()
    return [
        list(box_to_pixels(box, item["width"], item["height"], view))
        for phrase, _, boxes in record["entities"]
        if phrase.strip() == name
        for box in boxes
    ]


def evaluate_refcoco(
    checkpoint: str,
    data: str,
    image_root: Optional[str] = None,
    beam: int = 1,
    batch_size: int = 16,
    image_view: str = "squash",
    limit: Optional[int] = None,
    generations: Optional[str] = None,
    cpu: bool = False,
) -> Dict[str, Any]:
    """Generate for every expression and score; returns ``{"model": rec_accuracy(...), "centre_baseline": ...}``."""
    items = load_refexp(data, image_root, limit)
    search = SearchConfig(beam=beam, max_len_b=12, no_repeat_ngram_size=0)
    engine = load_kosmos2_inference(checkpoint, search, image_view=image_view, cpu=cpu)
    predictions: Dict[Any, List[List[float]]] = {}
    out = open(generations, "w", encoding="utf-8") if generations else None
    try:
        for start in progress(range(0, len(items), batch_size), "generating"):
            chunk = items[start : start + batch_size]
            lines = [PromptLine(it["image"], rec_prompt(it["expression"]), f"{data}[{it['id']}]") for it in chunk]
            records = [r for r in engine.run(lines) if r["rank"] == 0]
            for item, record in zip(chunk, records):
                predictions[item["id"]] = predicted_boxes(record, item, image_view)
                if out is not None:
                    out.write(
                        json.dumps({"id": item["id"], "text": record["text"], "boxes": predictions[item["id"]]}) + "\n"
                    )
    finally:
        if out is not None:
            out.close()
    gt = {it["id"]: it["gt_xyxy"] for it in items}
    groups = {it["id"]: it["group"] for it in items}
    return {
        "model": rec_accuracy(predictions, gt, groups),
        "centre_baseline": rec_accuracy({k: [v] for k, v in centre_baseline(items).items()}, gt, groups),
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description="RefCOCO-style REC accuracy of a kosmos2 checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="kosmos2 fairseq checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="MDETR-style finetune_refcoco*_<split>.json")
    parser.add_argument("--image-root", default=None, help="directory of the images (default: the json's)")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument(
        "--image-view",
        choices=IMAGE_VIEWS,
        default="squash",
        help="the model's view of the image (squash as released; use what the model trained with)",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N expressions")
    parser.add_argument("--generations", default=None, help="write the generations as json lines")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    args = parser.parse_args(argv)
    setup_cli_logging()
    metrics = evaluate_refcoco(
        args.checkpoint,
        args.data,
        args.image_root,
        args.beam,
        args.batch_size,
        args.image_view,
        args.limit,
        args.generations,
        args.cpu,
    )
    model, base = metrics["model"], metrics["centre_baseline"]
    print(
        f"{model['num_samples']} expressions   acc@0.5 (first box) {model['acc@1']:6.2f}   "
        f"any box {model['acc@upper_bound']:6.2f}   no box {model['num_missing_predictions']}"
    )
    print(f"centre-box baseline         acc@0.5 {base['acc@1']:6.2f}")
    if args.output:
        write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
