"""Image captioning scores of an existing prediction file: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (coco-caption).

The scores come from :func:`unilm_vl.eval.metrics.caption_metrics` (pycocoevalcap; PTB tokenisation and METEOR
when Java is on PATH, otherwise a documented Python tokenizer and no METEOR). They are in percent, CIDEr 1.23 ->
123.0. Kosmos-2 reports Flickr30k Karpathy-test CIDEr (Peng et al. 2023); COSA scores captions the same way
(TXH-mercury/COSA ``test.py``).

Predictions, told apart by their structure:

- COCO caption results ``[{"image_id": 42, "caption": "a dog ..."}, ...]`` (one entry per image);
- a plain mapping ``{"42": "a dog ..."}``.

References:

- COCO captions annotations ``{"annotations": [{"image_id": 42, "caption": "..."}, ...]}`` (``images`` optional);
- a Karpathy split file ``{"images": [{"split": "test", "sentences": [{"raw": "..."}], "cocoid" / "imgid" /
  "filename": ...}]}``: only the ``--split`` entries. Prediction ids are matched, as strings, against the first of
  ``cocoid``, the file-name stem, the file name and ``imgid`` that knows all of them (COCO results use the COCO
  image id; Flickr30k results usually the file-name stem).

Ids are compared as strings (``42`` and ``"42"`` are the same image). Every predicted id must have references;
reference images without a prediction are left out with a warning, as coco-caption scores the images of the
result file.

CLI::

    python -m unilm_vl.eval.caption --predictions pred.json --references captions.json [--split test]
        [--tokenizer auto|ptb|simple] [--no-meteor] [--output out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from unilm_vl.data.jsonio import read_json
from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.metrics import caption_metrics, preview_ids
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

# Karpathy id fields tried in order; the file-name stem and file name are derived from "filename".
_KARPATHY_ID_KINDS = ("cocoid", "filename_stem", "filename", "imgid")


def load_caption_predictions(path: str) -> Dict[str, str]:
    """``{image id as str: caption}`` from a COCO results list or a plain ``{id: caption}`` mapping."""
    data = read_json(path, "predictions")
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for n, entry in enumerate(data):
            if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
                raise ValueError(f"{path}: entry {n} is not {{'image_id', 'caption'}}: {entry!r}")
            items.append((entry["image_id"], entry["caption"]))
    else:
        raise ValueError(
            f"{path}: predictions must be a list of {{'image_id', 'caption'}} or an {{id: caption}} "
            f"mapping, got {type(data).__name__}"
        )
    out: Dict[str, str] = {}
    for image_id, caption in items:
        key = str(image_id)
        if not isinstance(caption, str):
            raise ValueError(f"{path}: caption of image {image_id!r} is not a string: {caption!r}")
        if key in out:
            raise ValueError(f"{path}: image {image_id!r} has more than one predicted caption")
        out[key] = caption
    if not out:
        raise ValueError(f"{path}: no predictions")
    return out


def _karpathy_ids(entry: Dict[str, Any]) -> Dict[str, str]:
    ids = {}
    for kind in ("cocoid", "imgid", "filename"):
        if kind in entry:
            ids[kind] = str(entry[kind])
    if "filename" in entry:
        ids["filename_stem"] = os.path.splitext(os.path.basename(str(entry["filename"])))[0]
    return ids


def _karpathy_references(data: Dict[str, Any], path: str, split: str, wanted: Sequence[str]) -> Dict[str, List[str]]:
    entries = [e for e in data["images"] if isinstance(e, dict) and e.get("split") == split]
    if not entries:
        splits = sorted({str(e.get("split")) for e in data["images"] if isinstance(e, dict)})
        raise ValueError(f"{path}: no image has split {split!r}; the splits present are {splits}")
    by_kind: Dict[str, Dict[str, List[str]]] = {kind: {} for kind in _KARPATHY_ID_KINDS}
    for e in entries:
        sentences = e.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise ValueError(f"{path}: image {e.get('filename', e)!r} needs 'sentences': [{{'raw': str}}, ...]")
        for kind, key in _karpathy_ids(e).items():
            by_kind[kind][key] = [s["raw"] for s in sentences]
    kinds = [kind for kind in _KARPATHY_ID_KINDS if by_kind[kind]]
    if not kinds:
        raise ValueError(f"{path}: the {split!r} images have none of the id fields cocoid, filename, imgid")
    for kind in kinds:
        if all(w in by_kind[kind] for w in wanted):
            logger.info("%s: matching prediction ids to Karpathy %r", path, kind)
            return by_kind[kind]
    # none knows every id: the field that knows most, and the caller reports the ids it lacks
    return by_kind[max(kinds, key=lambda kind: sum(w in by_kind[kind] for w in wanted))]


def load_caption_references(path: str, split: str = "test", wanted: Sequence[str] = ()) -> Dict[str, List[str]]:
    """``{image id as str: [captions]}`` from COCO captions annotations or a Karpathy split file.

    ``wanted`` (the predicted ids) picks the Karpathy id field (see the module docstring).
    """
    data = read_json(path, "references")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        refs: Dict[str, List[str]] = {}
        for n, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path}: annotation {n} is not {{'image_id', 'caption': str}}: {ann!r}")
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        if split != "test":
            logger.warning("%s is a COCO captions file, which holds one split; --split %r is ignored", path, split)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        refs = _karpathy_references(data, path, split, wanted)
    else:
        raise ValueError(
            f"{path}: unrecognised references; expected COCO captions ({{'annotations': [{{'image_id', "
            "'caption'}]}) or a Karpathy split file ({'images': [{'split', 'sentences'}]})"
        )
    if not refs:
        raise ValueError(f"{path}: no reference captions")
    return refs


def evaluate_caption_files(
    predictions_path: str, references_path: str, split: str = "test", tokenizer: str = "auto", meteor: bool = True
) -> Dict[str, Any]:
    """:func:`~unilm_vl.eval.metrics.caption_metrics` of a prediction file against a reference file."""
    predictions = load_caption_predictions(predictions_path)
    references = load_caption_references(references_path, split, wanted=list(predictions))
    unknown = [key for key in predictions if key not in references]
    if unknown:
        raise ValueError(
            f"{predictions_path}: {len(unknown)} predicted image ids are not in {references_path}: "
            f"{preview_ids(unknown)}"
        )
    logger.info("captioning: %d predictions, %d reference images", len(predictions), len(references))
    return caption_metrics(predictions, references, tokenizer=tokenizer, meteor=meteor)


def format_caption_table(metrics: Dict[str, Any]) -> str:
    """One line of names and one of values (2 decimals, as coco-caption reports)."""
    names = [n for n in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr") if n in metrics]
    return (
        "".join(f"{n:>9}" for n in names)
        + "\n"
        + "".join(f"{metrics[n]:>9.2f}" for n in names)
        + f"\n({metrics['num_images']} images, {metrics['tokenizer']} tokenizer"
        + ("" if "METEOR" in metrics else ", no METEOR")
        + ")"
    )


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score generated captions with the coco-caption metrics.")
    parser.add_argument(
        "--predictions",
        required=True,
        help="json: COCO results [{'image_id', 'caption'}] or an {image_id: caption} mapping",
    )
    parser.add_argument(
        "--references",
        required=True,
        help="json: COCO captions annotations {'annotations': [...]} or a Karpathy split file",
    )
    parser.add_argument("--split", default="test", help="Karpathy split to score against (ignored for COCO files)")
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "ptb", "simple"),
        default="auto",
        help="ptb = coco-caption's Java PTBTokenizer, simple = the Python stand-in, auto = ptb when java is on PATH",
    )
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java process, ~10 s to start)")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    metrics = evaluate_caption_files(
        args.predictions, args.references, split=args.split, tokenizer=args.tokenizer, meteor=not args.no_meteor
    )
    print(format_caption_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
