"""Kosmos-2 training samples: GRIT grounded captions -> token ids, and the image-LM batch layout.

Flow of one GRIT sample (microsoft/unilm ``kosmos-2/unilm/data/vl/laion2b_obj_loader.py``), in
:class:`GritGroundedCaption`::

    annotation (noun_chunks | ref_exps: [start, end, x0, y0, x1, y1, score])
      -> keep score >= threshold
      -> boxes moved into the model view (resize short side + centre crop; drop boxes keeping < 20% of their area)
      -> expression mode: keep only outermost spans;  identical spans -> one phrase with several boxes
      -> char spans -> sentencepiece token spans
      -> <grounding> ... <phrase> a dog</phrase><object><patch_index_UL><patch_index_LR></object> ... </s>
         (or, with probability 1 - use_object_bbox_prob, the plain caption ... </s>)

The grounded-vs-plain draw uses a ``random.Random`` seeded from the sample's identity seed (``__seed__``, set by the
pipeline from the run seed, the epoch and the record's position), so a resumed run makes the same choices.

:class:`CollateKosmos2` lays a batch out as the release does (``laion2b_obj_loader.py`` collate; notes 3.5)::

    full       = <s> <image> [<image> x L placeholders] </image> caption_ids      (text-only: <s> ids)
    src_tokens = full[:-1], target = full[1:], right-padded with <pad>
    image_mask = True on the L placeholder rows (2 .. L+1)
    loss_mask  = True on the caption targets (L+2 .. L+1+n): not <image>, the placeholders nor </image>
"""

from __future__ import annotations

import math
import random
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .decode import BadSample
from .formats import parse_annotation
from .grounding import (
    BOX_DELIMITER,
    DEFAULT_NUM_BINS,
    GROUNDING,
    OBJECT_END,
    OBJECT_START,
    PHRASE_END,
    PHRASE_START,
    Box,
    box_to_patch_indices,
    patch_index_token,
)
from .pipeline import derive_seed
from .tokenizers import truncate_for_tokens

LINE_END = "</line>"

MODES = ("phrase", "expression")
ANNOTATION_KEYS = {"phrase": ("phrase", "noun_chunks"), "expression": ("expression_v1", "ref_exps")}
"""Where each mode finds its entries: the TSV annotation dict key, then the GRIT jsonl / img2dataset json key."""


class GritEntry(NamedTuple):
    start: int
    end: int
    box: Box
    score: float


class GroundedSpan(NamedTuple):
    start: int
    end: int
    boxes: List[Box]


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters (an entry may hold a 400-digit integer or a huge nested list)."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_number(value: Any) -> float:
    """``float(value)`` for an int or float that is finite as a float; ``ValueError`` for anything else (strings,
    booleans, lists, NaN, infinities, integers too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{type(value).__name__} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("integer too large for a float") from None
    if not math.isfinite(number):
        raise ValueError(f"{number} is not finite")
    return number


def parse_grit_entries(entries: Any, caption: str) -> List[GritEntry]:
    """Validate ``[[start, end, x0, y0, x1, y1, score], ...]`` against ``caption``; raises ``ValueError`` naming the
    bad entry (a span outside the caption or not of integers, a box or score that is not a finite int/float, a box
    outside [0, 1] or inverted, a wrong length)."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"grounding entries must be a list, got {type(entries).__name__}")
    out = []
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 7:
            raise ValueError(f"a grounding entry is [start, end, x0, y0, x1, y1, score], got {_short(entry)}")
        start, end = entry[0], entry[1]
        if not (type(start) is int and type(end) is int and 0 <= start < end <= len(caption)):
            raise ValueError(
                f"span [{_short(start)}, {_short(end)}] is not inside the caption of {len(caption)} characters"
            )
        try:
            box = tuple(_finite_number(v) for v in entry[2:6])
            score = _finite_number(entry[6])
        except ValueError as exc:
            raise ValueError(f"bad box or score in {_short(entry)}: {exc}") from None
        if not all(0.0 <= v <= 1.0 for v in box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"box {box} of span [{start}, {end}] is outside [0, 1] or inverted")
        out.append(GritEntry(start, end, box, score))
    return out


def center_crop_box(
    box: Box, image_size: Tuple[int, int], size: int = 224, drop_threshold: float = 0.2
) -> Optional[Box]:
    """A box normalised to the original ``(width, height)`` image, in the ``size x size`` model view made by
    ``Resize(size)`` (short side; long side ``int(size * long / short)`` as torchvision) + ``CenterCrop(size)``.

    The crop offsets are not rounded (``(resized - size) / 2``), coordinates are clamped to the view; the box is
    dropped (``None``) when it keeps less than ``drop_threshold`` of its resized area or becomes empty.
    Example (computed with the release's ``centercrop_norm_bbox``): 1024 x 693, (0.019644, 0.310540, 0.962214,
    0.960344) -> (0, 0.31054, 1, 0.960344).
    """
    w, h = image_size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    if w <= h:
        rw, rh = size, int(size * h / w)
    else:
        rw, rh = int(size * w / h), size
    left, top = (rw - size) / 2, (rh - size) / 2
    x0, y0, x1, y1 = box[0] * rw, box[1] * rh, box[2] * rw, box[3] * rh
    area = (x1 - x0) * (y1 - y0)
    cx0, cy0 = min(max(x0 - left, 0.0), size), min(max(y0 - top, 0.0), size)
    cx1, cy1 = min(max(x1 - left, 0.0), size), min(max(y1 - top, 0.0), size)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    if area <= 0 or (cx1 - cx0) * (cy1 - cy0) / area < drop_threshold:
        return None
    return cx0 / size, cy0 / size, cx1 / size, cy1 / size


def select_grounded_spans(
    entries: Sequence[GritEntry],
    image_size: Tuple[int, int],
    mode: str = "expression",
    score_threshold: float = 0.65,
    center_crop: bool = True,
    size: int = 224,
    drop_threshold: float = 0.2,
) -> List[GroundedSpan]:
    """The spans and boxes a sample is grounded with, ordered by character start (then end).

    Keep ``score >= score_threshold``; move boxes into the model view (:func:`center_crop_box`, or unchanged with
    ``center_crop=False``, i.e. a plain square resize); in ``expression`` mode drop every span strictly inside
    another kept span (identical spans do not count); identical spans become one phrase with its boxes in
    annotation order.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kept = []
    for e in entries:
        if e.score < score_threshold:
            continue
        box = center_crop_box(e.box, image_size, size, drop_threshold) if center_crop else e.box
        if box is not None:
            kept.append(GritEntry(e.start, e.end, box, e.score))
    if mode == "expression":
        kept = [
            e
            for e in kept
            if not any(o.start <= e.start and e.end <= o.end and (o.start, o.end) != (e.start, e.end) for o in kept)
        ]
    spans: Dict[Tuple[int, int], List[Box]] = {}
    for e in kept:
        spans.setdefault((e.start, e.end), []).append(e.box)
    return [GroundedSpan(s, t, boxes) for (s, t), boxes in sorted(spans.items())]


def char_span_to_token_span(
    encode_pieces: Callable[[str], List[str]], caption: str, start: int, end: int
) -> Tuple[int, int]:
    """Token span ``[first, last)`` of the characters ``caption[start:end]`` (the release's
    ``find_substring_pairs``): with ``b = pieces(caption[:start])`` and ``a = pieces(caption[:end])``, the span is
    ``[len(b), len(a))`` when ``b`` is a prefix of ``a``, ``[len(b) - 1, len(a))`` when only ``b[:-1]`` is (the span
    starts inside a piece). Anything else raises ``ValueError``: the span does not align with the tokens."""
    before, upto = encode_pieces(caption[:start]), encode_pieces(caption[:end])
    if upto[: len(before)] == before:
        first = len(before)
    elif before and upto[: len(before) - 1] == before[:-1]:
        first = len(before) - 1
    else:
        raise ValueError(f"span [{start}, {end}] {caption[start:end]!r} does not align with the caption's tokens")
    if len(upto) <= first:
        raise ValueError(f"span [{start}, {end}] {caption[start:end]!r} covers no token")
    return first, len(upto)


def grounded_pieces(
    pieces: Sequence[str], token_spans: Sequence[Tuple[int, int, Sequence[Tuple[int, int]]]], grounding: bool = True
) -> List[str]:
    """Insert the grounding markup into a caption's pieces (notes 2.4)::

        [<grounding>] ... <phrase> span pieces </phrase> <object> <patch_index_UL> <patch_index_LR>
                      [</delimiter_of_multi_objects/> <patch_index_UL2> <patch_index_LR2> ...] </object> ...

    ``token_spans``: ``(first, last, [(ul, lr), ...])`` with ``[first, last)`` indexing ``pieces``. Markup that
    closes at a position comes before markup that opens there. No ``</s>`` is appended.
    """
    opens: Dict[int, List[Tuple[int, int]]] = {}
    closes: Dict[int, List[Tuple[int, List[str]]]] = {}
    for order, (first, last, pairs) in enumerate(token_spans):
        if not 0 <= first < last <= len(pieces):
            raise ValueError(f"token span [{first}, {last}) outside the {len(pieces)} caption pieces")
        if not pairs:
            raise ValueError(f"token span [{first}, {last}) has no box")
        obj = [OBJECT_START]
        for k, (ul, lr) in enumerate(pairs):
            obj += ([BOX_DELIMITER] if k else []) + [patch_index_token(ul), patch_index_token(lr)]
        obj.append(OBJECT_END)
        opens.setdefault(first, []).append((-(last - first), order))  # outer spans open first
        closes.setdefault(last, []).append((first, [PHRASE_END] + obj))
    out = [GROUNDING] if grounding else []
    for position in range(len(pieces) + 1):
        for _, markup in sorted(closes.get(position, []), key=lambda c: -c[0]):  # inner spans close first
            out += markup
        out += [PHRASE_START] * len(opens.get(position, []))
        if position < len(pieces):
            out.append(pieces[position])
    return out


def grit_entries_of(sample: Dict[str, Any], mode: str) -> Any:
    """The raw entries of ``mode`` in a decoded sample: the TSV annotation column (``{"phrase": ..,
    "expression_v1": ..}``, JSON or Python literal) or GRIT's own ``noun_chunks``/``ref_exps`` json fields."""
    meta = sample.get("meta", {})
    annotation = meta.get("annotation")
    if isinstance(annotation, str):
        annotation = parse_annotation(annotation)
    for source in (annotation, meta):
        if isinstance(source, dict):
            for key in ANNOTATION_KEYS[mode]:
                if key in source:
                    return source[key]
    return None


@dataclass
class GritGroundedCaption:
    """Stage: ``sample["tokens"]`` = the caption ids of a GRIT sample (grounded or plain, ``</s>`` last) and
    ``sample["grounded"]``. Runs before the image transform: box maths use the decoded image's size. A text-only
    document (a ``text`` source sample) gets :meth:`document_ids`.

    A sample without entries of ``mode`` (or none left after filtering) trains as a plain caption. Malformed
    entries, boxes outside [0, 1] and spans that do not align with the tokens raise :class:`BadSample` (counted
    and logged by the pipeline).
    """

    tokenizer: Any
    """:func:`~unilm_vl.data.grounding.build_kosmos2_tokenizer` (pieces -> ids with the grounding symbols)."""
    mode: str = "expression"
    num_bins: int = DEFAULT_NUM_BINS
    score_threshold: float = 0.65
    use_object_bbox_prob: float = 0.5
    center_crop: bool = True
    size: int = 224
    drop_threshold: float = 0.2
    box_encoder: str = "release"
    max_text_tokens: int = 2047
    """text-only documents are cut to this many tokens (the release packs 2048 with ``<s>``); captions and documents
    are first cut to ``max_text_tokens * MAX_CHARS_PER_TOKEN`` characters (:func:`truncate_for_tokens`), dropping
    the grounded spans that end past the cut"""

    def caption_pieces(self, caption: str, spans: Sequence[GroundedSpan], grounded: bool) -> List[str]:
        pieces = self.tokenizer.encode_pieces(caption)
        if grounded:
            token_spans = []
            for span in spans:
                first, last = char_span_to_token_span(self.tokenizer.encode_pieces, caption, span.start, span.end)
                pairs = [box_to_patch_indices(b, self.num_bins, self.box_encoder) for b in span.boxes]
                token_spans.append((first, last, pairs))
            pieces = grounded_pieces(pieces, token_spans)
        return pieces

    def document_ids(self, text: str) -> List[int]:
        """A text-only document as the release's text loader lays it out: each line's pieces followed by
        ``</line>``, the last ``</line>`` replaced by ``</s>``; cut to ``max_text_tokens`` (ending in ``</s>``)."""
        index = self.tokenizer.dictionary.index
        ids: List[int] = []
        text = truncate_for_tokens(text, self.max_text_tokens)
        for line in (l for l in text.split("\n") if l.strip()):
            ids += [index(p) for p in self.tokenizer.encode_pieces(line)] + [index(LINE_END)]
        ids[-1] = self.tokenizer.eos_id
        if len(ids) > self.max_text_tokens:
            ids = ids[: self.max_text_tokens - 1] + [self.tokenizer.eos_id]
        return ids

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if "image" not in sample and "text" in sample:  # a text-only document
            sample["tokens"] = self.document_ids(sample["text"])
            sample["grounded"] = False
            return sample
        caption, where = sample["caption"], sample.get("__where__", "?")
        spans: List[GroundedSpan] = []
        try:
            raw = grit_entries_of(sample, self.mode)
            if raw:
                entries = parse_grit_entries(raw, caption)  # validated against the whole caption
            caption = truncate_for_tokens(caption, self.max_text_tokens)
            if raw:
                entries = [e for e in entries if e.end <= len(caption)]
                spans = select_grounded_spans(
                    entries,
                    sample["image"].size,
                    self.mode,
                    self.score_threshold,
                    self.center_crop,
                    self.size,
                    self.drop_threshold,
                )
            rng = random.Random(derive_seed(sample.get("__seed__", sample.get("__key__")), "grounding"))
            grounded = bool(spans) and rng.random() < self.use_object_bbox_prob
            pieces = self.caption_pieces(caption, spans, grounded)
        except ValueError as exc:
            raise BadSample(f"grounding: {exc}", where, "annotation") from None
        index = self.tokenizer.dictionary.index
        sample["tokens"] = [index(p) for p in pieces] + [self.tokenizer.eos_id]
        sample["grounded"] = grounded
        return sample


@dataclass
class CollateKosmos2:
    """Batch layout of the module docstring. Samples carry ``tokens`` (caption ids ending in ``</s>``) and, when
    they hold an image, ``image`` (3 x S x S); text-only samples (no ``image``) get ``<s> ids`` and no image rows.

    Output: ``{"id", "source" (each row's data source name), "nsentences", "ntokens" (all tokens of ``full``, as the
    release logs), "net_input": {"src_tokens": B x T, "image": B_img x 3 x S x S or None, "image_mask": B x T},
    "target": B x T, "loss_mask": B x T}``. Images are stacked in batch order, one per image-bearing row.
    """

    bos_id: int
    pad_id: int
    image_id: int
    image_end_id: int
    num_image_tokens: int = 64

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        L = self.num_image_tokens
        rows, images, image_masks, loss_masks = [], [], [], []
        for s in samples:
            caption = list(s["tokens"])
            if s.get("image") is not None:
                full = [self.bos_id] + [self.image_id] * (L + 1) + [self.image_end_id] + caption
                image_mask = [False, False] + [True] * L + [False] + [False] * len(caption)
                loss_mask = [False, False] + [False] * L + [True] + [True] * len(caption)
                images.append(s["image"])
            else:
                full = [self.bos_id] + caption
                image_mask = [False] * len(full)
                loss_mask = [True] * len(full)
            rows.append(full)
            image_masks.append(image_mask[:-1])
            loss_masks.append(loss_mask[:-1])
        T = max(len(r) for r in rows) - 1
        src = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        tgt = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        img_mask = torch.zeros(len(rows), T, dtype=torch.bool)
        lmask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, (full, im, lm) in enumerate(zip(rows, image_masks, loss_masks)):
            n = len(full) - 1
            src[i, :n] = torch.tensor(full[:-1])
            tgt[i, :n] = torch.tensor(full[1:])
            img_mask[i, :n] = torch.tensor(im)
            lmask[i, :n] = torch.tensor(lm)
        return {
            "id": [s.get("__key__") for s in samples],
            "source": [s.get("__source__", "data") for s in samples],
            "nsentences": len(samples),
            "ntokens": sum(len(r) for r in rows),
            "net_input": {"src_tokens": src, "image": torch.stack(images) if images else None, "image_mask": img_mask},
            "target": tgt,
            "loss_mask": lmask,
        }
