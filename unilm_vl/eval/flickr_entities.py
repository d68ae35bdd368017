"""Flickr30k Entities phrase grounding of a ``kosmos2`` model: any-box Recall@1/5/10 and the upper bound, overall and
per phrase type (as microsoft/unilm ``kosmos-2/evaluation/flickr_entities/flickr_entities_evaluate.py``).

Inputs:

- the MDETR json ``final_flickr_separateGT_{val,test}.json``: ``images[i]`` is one sentence with ``file_name``,
  ``caption``, ``width``, ``height``, ``original_img_id``, ``sentence_id`` and ``tokens_positive_eval`` (one list
  of char spans per phrase to ground);
- the official Flickr30k Entities files under ``--flickr-root``: ``Sentences/<image_id>.txt`` (one sentence a
  line, phrases marked ``[/EN#<phrase_id>/<type>[/<type>...] words]``) and ``Annotations/<image_id>.xml`` (the GT
  boxes per phrase id; :func:`parse_annotation_file`).

Protocol (as the release's ``cook_data.py`` + ``flickr_entities_evaluate.py``):

1. One prompt per ``tokens_positive_eval`` entry, in the order images x entries, using only its first span
   ``(start, end)``: phrase = ``caption[start:end]``, prompt ``<grounding>{caption[:start]} <phrase>{phrase}</phrase>``
   (verbatim; :func:`flickr_prompt`).
2. GT: among the phrases of sentence ``sentence_id`` of ``Sentences/<original_img_id>.txt`` that have boxes in the
   xml, the first whose text equals the phrase; its boxes are the GT (integer pixel xyxy). A phrase that only
   matches phrases without boxes is skipped and counted (``num_skipped_without_gt``); a phrase that matches no
   phrase of the sentence at all raises ``ValueError`` (the release raises too: wrong files).
3. Predictions: every entity of the generated text (:func:`unilm_vl.data.grounding.parse_grounded_text`) whose
   name ``.strip()`` equals ``phrase.strip()``, all its boxes, in generation order, scaled to pixels of the original
   image with the json's ``width`` / ``height`` by :func:`unilm_vl.data.grounding.box_to_pixels` (continuous
   coordinates, ``x * W``, as the release; with ``--image-view crop`` through the central square instead). None -> a
   miss at every k.
4. :func:`unilm_vl.eval.metrics.phrase_grounding_recall` (hit at k: max IoU of ``pred[:k]`` with any GT box
   >= 0.5; k = -1 -> all predictions = upper bound). A phrase with several types counts once in each.

CLI::

    python -m unilm_vl.eval.flickr_entities --data final_flickr_separateGT_test.json --flickr-root DIR
        [--image-root DIR] (--checkpoint CKPT | --generations FILE) [--output metrics.json]
        [--image-view squash|crop] [--limit N_SENTENCES] [--num-bins 32]
        run mode only: [--beam 1] [--batch-size 16] [--max-len-b 500] [--no-repeat-ngram-size 3] [--cpu]
                       [--save-generations out.jsonl]

``--generations`` scores existing generations: a json-lines file with one record per prompt, in prompt order,
each holding ``"text"``, the full grounded text (prompt + continuation), i.e. the ``--output`` of
``python -m unilm_vl.kosmos2_infer`` (records with ``"rank"`` > 0, extra n-best hypotheses, are ignored) or the
``--save-generations`` file of a run. ``--checkpoint`` generates them (like :mod:`unilm_vl.eval.refcoco`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from unilm_vl.checkpoint import load_kosmos2_inference
from unilm_vl.cli import progress
from unilm_vl.data.grounding import box_to_pixels, parse_grounded_text
from unilm_vl.data.jsonio import parse_json, read_json
from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.metrics import phrase_grounding_recall
from unilm_vl.inference.kosmos2 import IMAGE_VIEWS, PromptLine
from unilm_vl.logging_utils import setup_cli_logging
from unilm_vl.modules.generation import SearchConfig

logger = logging.getLogger(__name__)

PHRASE_TYPES = ("animals", "bodyparts", "clothing", "instruments", "other", "people", "scene", "vehicles")
"""The Flickr30k Entities types with boxes (``notvisual`` phrases have none)."""


class SentencePhrase(NamedTuple):
    """One marked phrase of a Flickr30k Entities sentence."""

    phrase: str
    """The phrase's words joined by single spaces."""
    span: Tuple[int, int]
    """``(start, end)`` char span in the plain sentence: ``sentence[start:end] == phrase``."""
    first_word_index: int
    phrase_id: str
    phrase_type: List[str]
    """All its types (``[/EN#12/people/other ...]`` -> ``["people", "other"]``)."""


class Sentence(NamedTuple):
    sentence: str
    """The plain sentence: the words (markup removed) joined by single spaces."""
    phrases: List[SentencePhrase]


# ---------------------------------------------------------------------------------------------------------------------
# Official Flickr30k Entities files
# ---------------------------------------------------------------------------------------------------------------------


def parse_sentence(line: str, where: str = "<sentence>") -> Sentence:
    """One line of a ``Sentences/<id>.txt`` file -> :class:`Sentence`.

    Whitespace-separated tokens; outside a phrase, a token starting with ``[`` opens one: ``[/EN#<id>/<type>...``
    (not a word itself); the phrase's words follow up to the token ending with ``]`` (that ``]`` is dropped).
    Raises ``ValueError`` naming ``where`` for a malformed tag or a phrase left open at the end of the line.
    """
    words: List[str] = []
    phrases: List[SentencePhrase] = []
    current: Optional[dict] = None
    for token in line.split():
        if current is not None:
            closes = token.endswith("]")
            word = token[:-1] if closes else token
            words.append(word)
            current["words"].append(word)
            if closes:
                phrases.append(_finish_phrase(current, words))
                current = None
        elif token.startswith("["):
            parts = token.split("/")
            if len(parts) < 2 or not parts[1].startswith("EN#") or len(parts[1]) == 3:
                raise ValueError(f"{where}: malformed phrase tag {token!r} (expected '[/EN#<id>/<type>')")
            current = {"first": len(words), "id": parts[1][3:], "types": [t for t in parts[2:] if t], "words": []}
        else:
            words.append(token)
    if current is not None:
        raise ValueError(f"{where}: phrase /EN#{current['id']} is not closed with ']' before the end of the line")
    return Sentence(" ".join(words), phrases)


def _finish_phrase(current: dict, words: List[str]) -> SentencePhrase:
    text = " ".join(current["words"])
    start = sum(len(w) + 1 for w in words[: current["first"]])
    return SentencePhrase(text, (start, start + len(text)), current["first"], current["id"], current["types"])


def parse_sentence_file(path: str) -> List[Sentence]:
    """All sentences of a ``Sentences/<image_id>.txt`` file, in order (blank lines skipped, as the official
    loader does; ``sentence_id`` of the MDETR json indexes this list)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Flickr30k Entities sentence file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return [parse_sentence(line, f"{path}:{number}") for number, line in enumerate(lines, start=1) if line.strip()]


def parse_annotation_file(path: str) -> Dict[str, Any]:
    """A ``Annotations/<image_id>.xml`` file -> ``{"boxes": {phrase_id: [[xmin, ymin, xmax, ymax], ...]},
    "nobox": [phrase_id, ...], "scene": [phrase_id, ...], "width", "height", "depth"}`` (size keys as present).

    Each ``<object>`` has one or more ``<name>`` (phrase ids: a box shared by several phrases lists each) and
    either a ``<bndbox>`` (its integer corners are appended to every one of its phrase ids, in file order) or
    ``<nobndbox>1`` / ``<scene>1`` flags. Raises ``FileNotFoundError`` / ``ValueError`` naming the file for a
    missing file, malformed xml or a box with a missing or non-integer corner.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Flickr30k Entities annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: malformed xml: {err}") from err
    info: Dict[str, Any] = {}
    size = root.find("size")
    if size is not None:
        for element in size:
            info[element.tag] = _xml_int(element, path, f"size/{element.tag}")
    boxes: Dict[str, List[List[int]]] = {}
    nobox: List[str] = []
    scene: List[str] = []
    for number, obj in enumerate(root.findall("object")):
        names = [(n.text or "").strip() for n in obj.findall("name")]
        if not names or not all(names):
            raise ValueError(f"{path}: object {number} has no (or an empty) <name>")
        bndbox = obj.find("bndbox")
        if bndbox is not None:
            box = [
                _xml_int(bndbox.find(tag), path, f"object {number} bndbox/{tag}")
                for tag in ("xmin", "ymin", "xmax", "ymax")
            ]
            for name in names:
                boxes.setdefault(name, []).append(list(box))
            continue
        for flag, target in (("nobndbox", nobox), ("scene", scene)):
            element = obj.find(flag)
            if element is not None and _xml_int(element, path, f"object {number} {flag}") > 0:
                target.extend(names)
    info.update(boxes=boxes, nobox=nobox, scene=scene)
    return info


def _xml_int(element, path: str, what: str) -> int:
    if element is None or element.text is None:
        raise ValueError(f"{path}: malformed annotation: {what} is missing")
    try:
        return int(element.text.strip())
    except ValueError:
        raise ValueError(f"{path}: malformed annotation: {what} is not an integer: {element.text!r}") from None


# ---------------------------------------------------------------------------------------------------------------------
# MDETR json -> prompts with their GT
# ---------------------------------------------------------------------------------------------------------------------


def flickr_prompt(caption: str, start: int, end: int) -> str:
    """The release's phrase-grounding prompt (``evaluation/flickr_entities/cook_data.py``), verbatim:
    ``<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>``."""
    return f"<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>"


def match_phrase(
    phrase: str, sentence: Sentence, boxes: Dict[str, List[List[int]]]
) -> Optional[Tuple[SentencePhrase, List[List[int]]]]:
    """``(sentence phrase, its GT boxes)`` for a phrase text: the first phrase of ``sentence`` with boxes whose
    text equals ``phrase`` (the release filters box-less phrases before matching); failing that, the first
    box-less phrase with that text and ``[]`` (to be skipped); ``None`` when no phrase has that text."""
    for candidate in sentence.phrases:
        if candidate.phrase == phrase and boxes.get(candidate.phrase_id):
            return candidate, [list(b) for b in boxes[candidate.phrase_id]]
    for candidate in sentence.phrases:
        if candidate.phrase == phrase:
            return candidate, []
    return None


def load_flickr_entities(
    data: str, flickr_root: str, image_root: Optional[str] = None, limit: Optional[int] = None
) -> List[Dict[str, Any]]:
    """The prompts of an MDETR ``final_flickr_separateGT_*.json`` with their GT, one dict per
    ``tokens_positive_eval`` entry in the order images x entries:

    ``{"id": "<image entry id>_<entry index>", "image", "caption", "span": (start, end), "phrase", "prompt",
    "width", "height", "original_img_id", "sentence_id", "phrase_id", "phrase_type", "gt_boxes"}``

    (``gt_boxes`` is ``[]`` for a phrase without boxes). ``limit`` keeps the first N image entries (sentences).
    Image paths resolve against ``image_root`` (default: the json's directory) and are not checked here.
    """
    content = read_json(data, "Flickr30k Entities MDETR")
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{data}: expected an MDETR-style json with an 'images' list")
    root = image_root or os.path.dirname(data)
    sentences_cache: Dict[str, List[Sentence]] = {}
    boxes_cache: Dict[str, Dict[str, List[List[int]]]] = {}
    items: List[Dict[str, Any]] = []
    for index, entry in enumerate(content["images"][:limit] if limit else content["images"]):
        key = entry.get("id", index)
        for field in (
            "file_name",
            "caption",
            "width",
            "height",
            "original_img_id",
            "sentence_id",
            "tokens_positive_eval",
        ):
            if field not in entry:
                raise ValueError(f"{data}: image entry {key} lacks {field!r}")
        flickr_id = str(entry["original_img_id"])
        if flickr_id not in sentences_cache:
            sentences_cache[flickr_id] = parse_sentence_file(os.path.join(flickr_root, "Sentences", f"{flickr_id}.txt"))
            boxes_cache[flickr_id] = parse_annotation_file(
                os.path.join(flickr_root, "Annotations", f"{flickr_id}.xml")
            )["boxes"]
        sentences = sentences_cache[flickr_id]
        sentence_id = int(entry["sentence_id"])
        if not 0 <= sentence_id < len(sentences):
            raise ValueError(
                f"{data}: image entry {key} has sentence_id {sentence_id} but "
                f"{os.path.join(flickr_root, 'Sentences', flickr_id + '.txt')} has {len(sentences)} "
                "sentences"
            )
        sentence = sentences[sentence_id]
        caption = entry["caption"]
        for j, spans in enumerate(entry["tokens_positive_eval"]):
            if not spans or len(spans[0]) != 2:
                raise ValueError(
                    f"{data}: image entry {key}: tokens_positive_eval[{j}] = {spans!r} has no [start, end] span"
                )
            start, end = int(spans[0][0]), int(spans[0][1])
            phrase = caption[start:end]
            found = match_phrase(phrase, sentence, boxes_cache[flickr_id])
            if found is None:
                raise ValueError(
                    f"{data}: image entry {key}: phrase {phrase!r} is no phrase of sentence {sentence_id} of "
                    f"{os.path.join(flickr_root, 'Sentences', flickr_id + '.txt')} "
                    f"({[p.phrase for p in sentence.phrases]})"
                )
            record, gt_boxes = found
            items.append(
                {
                    "id": f"{key}_{j}",
                    "image": os.path.join(root, entry["file_name"]),
                    "caption": caption,
                    "span": (start, end),
                    "phrase": phrase,
                    "prompt": flickr_prompt(caption, start, end),
                    "width": entry["width"],
                    "height": entry["height"],
                    "original_img_id": flickr_id,
                    "sentence_id": sentence_id,
                    "phrase_id": record.phrase_id,
                    "phrase_type": list(record.phrase_type),
                    "gt_boxes": gt_boxes,
                }
            )
    if not items:
        raise ValueError(f"{data}: no phrase to ground (empty 'images' or 'tokens_positive_eval')")
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Generations -> predicted boxes -> recall
# ---------------------------------------------------------------------------------------------------------------------


def predicted_boxes(text: str, item: Dict[str, Any], view: str = "squash", num_bins: int = 32) -> List[List[float]]:
    """Pixel boxes of every entity of ``text`` named like the item's phrase (``strip()`` on both), in generation
    order."""
    _, entities = parse_grounded_text(text, num_bins)
    name = item["phrase"].strip()
    return [
        list(box_to_pixels(box, item["width"], item["height"], view))
        for phrase, _, boxes in entities
        if phrase.strip() == name
        for box in boxes
    ]


def read_generations(path: str) -> List[str]:
    """The ``"text"`` of each rank-0 record of a json-lines file (``kosmos2_infer --output`` or
    ``--save-generations``), in file order; blank lines are skipped. Errors name ``path:line``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generations file not found: {path}")
    texts: List[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            record = parse_json(line, f"{path}:{number}")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected a json object with a string 'text'")
            if record.get("rank", 0) != 0:
                continue
            texts.append(record["text"])
    return texts


def score_generations(
    items: Sequence[Dict[str, Any]],
    texts: Sequence[str],
    view: str = "squash",
    num_bins: int = 32,
    source: str = "generations",
) -> Dict[str, Any]:
    """Recall of one generated text per item (same order): :func:`phrase_grounding_recall` plus ``num_prompts``.
    ``source`` names the texts in errors."""
    if len(texts) != len(items):
        raise ValueError(
            f"{source} holds {len(texts)} generations but there are {len(items)} prompts; "
            "expected one per prompt, in prompt order"
        )
    predictions: Dict[str, List[List[float]]] = {}
    ground_truth: Dict[str, Dict[str, Any]] = {}
    for number, (item, text) in enumerate(zip(items, texts), start=1):
        try:
            predictions[item["id"]] = predicted_boxes(text, item, view, num_bins)
        except ValueError as err:
            raise ValueError(f"{source}: generation {number} (prompt {item['id']}): {err}") from err
        ground_truth[item["id"]] = {"boxes": item["gt_boxes"], "phrase_type": item["phrase_type"]}
    metrics = phrase_grounding_recall(predictions, ground_truth, ks=(1, 5, 10, -1))
    metrics["num_prompts"] = len(items)
    return metrics


def evaluate_generations(
    data: str, flickr_root: str, generations: str, view: str = "squash", num_bins: int = 32, limit: Optional[int] = None
) -> Dict[str, Any]:
    """Score an existing generations file (see the module docstring)."""
    items = load_flickr_entities(data, flickr_root, limit=limit)
    return score_generations(items, read_generations(generations), view, num_bins, source=generations)


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    flickr_root: str,
    image_root: Optional[str] = None,
    beam: int = 1,
    batch_size: int = 16,
    image_view: str = "squash",
    max_len_b: int = 500,
    no_repeat_ngram_size: int = 3,
    limit: Optional[int] = None,
    save_generations: Optional[str] = None,
    cpu: bool = False,
) -> Dict[str, Any]:
    """Generate for every prompt with :class:`unilm_vl.inference.kosmos2.Kosmos2Inference` and score."""
    items = load_flickr_entities(data, flickr_root, image_root, limit)
    missing = sorted({it["image"] for it in items if not os.path.isfile(it["image"])})
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {data} not found, e.g. {missing[0]}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    search = SearchConfig(beam=beam, max_len_b=max_len_b, no_repeat_ngram_size=no_repeat_ngram_size)
    engine = load_kosmos2_inference(checkpoint, search, image_view=image_view, cpu=cpu)
    num_bins = engine.num_bins
    texts: List[str] = []
    out = open(save_generations, "w", encoding="utf-8") if save_generations else None
    try:
        for start in progress(range(0, len(items), batch_size), "generating"):
            chunk = items[start : start + batch_size]
            lines = [PromptLine(it["image"], it["prompt"], f"{data}[{it['id']}]") for it in chunk]
            records = [r for r in engine.run(lines) if r["rank"] == 0]
            for item, record in zip(chunk, records):
                texts.append(record["text"])
                if out is not None:
                    out.write(
                        json.dumps(
                            {"id": item["id"], "prompt": item["prompt"], "text": record["text"]}, ensure_ascii=False
                        )
                        + "\n"
                    )
            logger.info("generated %d / %d prompts", len(texts), len(items))
    finally:
        if out is not None:
            out.close()
    return score_generations(items, texts, image_view, num_bins, source=f"generations of {checkpoint}")


def format_metrics(metrics: Dict[str, Any]) -> str:
    """A text table: R@1, R@5, R@10 and the upper bound for all phrases and per type."""
    rows = [("all", metrics)] + sorted(metrics.get("per_type", {}).items())
    lines = [f"{'type':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'upper':>8}{'phrases':>9}"]
    for name, m in rows:
        lines.append(
            f"{name:<12}{m['R@1']:8.2f}{m['R@5']:8.2f}{m['R@10']:8.2f}{m['R@upper_bound']:8.2f}{m['num_phrases']:9d}"
        )
    lines.append(
        f"prompts {metrics['num_prompts']}   no box predicted {metrics['num_missing_predictions']}   "
        f"skipped (no GT box) {metrics['num_skipped_without_gt']}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unilm_vl.eval.flickr_entities",
        description="Flickr30k Entities phrase-grounding recall of a kosmos2 model.",
    )
    parser.add_argument("--data", required=True, help="MDETR final_flickr_separateGT_{val,test}.json")
    parser.add_argument(
        "--flickr-root", required=True, help="Flickr30k Entities directory with Annotations/ and Sentences/"
    )
    parser.add_argument("--image-root", default=None, help="directory of the images (run mode; default: the json's)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", default=None, help="kosmos2 checkpoint: generate, then score")
    source.add_argument(
        "--generations", default=None, help="score these generations (json lines with 'text', one per prompt, in order)"
    )
    parser.add_argument(
        "--image-view",
        choices=IMAGE_VIEWS,
        default="squash",
        help="the model's view of the image that the boxes are normalised to (squash as released)",
    )
    parser.add_argument("--num-bins", type=int, default=32, help="patch grid side of --generations (32 as released)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences (image entries)")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    run = parser.add_argument_group("run mode (--checkpoint)")
    run.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, as released)")
    run.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    run.add_argument("--max-len-b", type=int, default=500, help="max new tokens (released: 500)")
    run.add_argument("--no-repeat-ngram-size", type=int, default=3, help="3 as released; 0 = off")
    run.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    run.add_argument(
        "--save-generations", default=None, help="write the generations as json lines (readable by --generations)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    if args.generations:
        metrics = evaluate_generations(
            args.data, args.flickr_root, args.generations, args.image_view, args.num_bins, args.limit
        )
    else:
        metrics = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.flickr_root,
            args.image_root,
            args.beam,
            args.batch_size,
            args.image_view,
            args.max_len_b,
            args.no_repeat_ngram_size,
            args.limit,
            args.save_generations,
            args.cpu,
        )
    print(format_metrics(metrics))
    if args.output:
        write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
