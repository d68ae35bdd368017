"""Language of the synthetic world: captions with GRIT noun chunks and referring expressions, long captions,
evaluation captions, Karpathy tokens, RefCOCO expressions, VQA questions and SugarCrepe hard negatives, all derived
from a scene's objects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .scenes import Background, SceneObject
from .vocabulary import COLOURS, INVERSE_RELATION, NUMBER_WORDS, SHAPES, SIZES, all_combos


@dataclass(frozen=True)
class GroundedCaption:
    """A caption with GRIT annotations: chunks are ``[char_start, char_end, x0, y0, x1, y1, score]``."""

    text: str
    noun_chunks: List[List[float]]
    ref_exps: List[List[float]]


# ----------------------------------------------------------------------------------------------------- language
def indefinite(words: Sequence[str]) -> str:
    """``words`` joined after ``a`` or ``an`` (empty words skipped)."""
    words = [w for w in words if w]
    return " ".join(["an" if words[0][0] in "aeiou" else "a", *words])


def object_phrase(obj: Any, with_size: bool = True) -> str:
    """``a {size} {colour} {shape}`` (``obj`` is a :class:`SceneObject`, :class:`ShapeSpec` or :class:`Track`);
    without the size, ``a``/``an {colour} {shape}``."""
    return indefinite([obj.size if with_size else "", obj.colour, obj.shape])


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, from their pixel box centres along the axis of larger offset."""
    (ax, ay), (bx, by) = a.centre_px, b.centre_px
    dx, dy = bx - ax, by - ay
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def position_words(obj: SceneObject, width: int, height: int) -> str:
    """Where the object's centre lies in a 3 x 3 grid: ``in the top left corner``, ``at the top``, ``on the left``,
    ``in the centre``."""
    cx, cy = obj.centre_px
    col = ("left", "", "right")[min(2, int(3 * cx / width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / height))]
    if row and col:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "in the centre"


def _pairs(order: Sequence[int]) -> List[Tuple[int, ...]]:
    """Objects in caption order grouped as ``(a, b)`` relation pairs and a possible leftover ``(c,)``."""
    return [tuple(order[i : i + 2]) for i in range(0, len(order), 2)]


def _compose(
    objects: Sequence[SceneObject],
    order: Sequence[int],
    with_size: Union[bool, Set[int]] = True,
    words: Optional[Dict[int, Tuple[str, str, str]]] = None,
    relations: Optional[Dict[int, str]] = None,
) -> Tuple[str, List[Tuple[int, int, int]], List[Tuple]]:
    """Relational text for ``objects`` in ``order``. ``words`` overrides (size, colour, shape) per object index and
    ``relations`` the relation of the pair led by an object, for hard negatives; ``with_size`` may be the set of
    object indices whose phrase keeps its size word. Returns the text, the phrase
    spans ``(start, end, object index)`` and the relation spans ``(start, end, lead index)``."""
    text, spans, rel_spans = "", [], []
    for group in _pairs(order):
        if text:
            text += " and "
        group_start = len(text)
        for pos, k in enumerate(group):
            if pos == 1:
                rel = (relations or {}).get(group[0], relation(objects[group[0]], objects[k]))
                text += f" {rel} "
            size, colour, shape = (words or {}).get(k, (objects[k].size, objects[k].colour, objects[k].shape))
            start = len(text)
            sized = k in with_size if isinstance(with_size, set) else with_size
            text += indefinite([size if sized else "", colour, shape])
            spans.append((start, len(text), k))
        if len(group) == 2:
            rel_spans.append((group_start, len(text), group[0]))
    return text, spans, rel_spans


def caption_for(objects: Sequence[SceneObject], rng: np.random.Generator) -> GroundedCaption:
    """The training caption (random object order) with GRIT noun chunks and referring expressions.

    A chunk's score is drawn from U[0.5, 1.0] (some fall under the usual 0.65 filter). A phrase that leads a
    relation gets a referring expression spanning ``phrase relation other-phrase`` with its own box; every other
    phrase's expression equals its chunk.
    """
    order = [int(k) for k in rng.permutation(len(objects))]
    text, spans, rel_spans = _compose(objects, order)
    scores = {k: round(float(rng.uniform(0.5, 1.0)), 3) for k in order}
    lead = {k: (s, e) for s, e, k in rel_spans}
    chunks, refs = [], []
    for start, end, k in spans:
        box = list(objects[k].box)
        chunks.append([start, end, *box, scores[k]])
        s, e = lead.get(k, (start, end))
        refs.append([s, e, *box, scores[k]])
    return GroundedCaption(text, chunks, refs)


def long_caption_for(objects: Sequence[SceneObject], background: Background, width: int, height: int) -> str:
    """3-6 sentences: the count, one per object (attributes and position), one about the background."""
    n = len(objects)
    sentences = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' if n != 1 else ''} in the picture."]
    for obj in objects:
        sentences.append(
            f"The {obj.colour} {obj.shape} is {obj.size} and sits {position_words(obj, width, height)} of the picture."
        )
    sentences.append(background.describe())
    return " ".join(sentences)


def _listing(objects: Sequence[SceneObject], order: Sequence[int]) -> str:
    phrases = [object_phrase(objects[k]) for k in order]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def eval_captions(objects: Sequence[SceneObject], rng: np.random.Generator) -> List[str]:
    """Five distinct captions: relational, ``there is`` with the reversed order (so inverse relations), ``a
    picture of`` listing, relational without sizes, and ``{n} shapes:`` listing."""
    n = len(objects)
    order = [int(k) for k in rng.permutation(n)]
    first = _compose(objects, order)[0]
    reversed_text = _compose(objects, order[::-1])[0]
    listing = _listing(objects, [int(k) for k in rng.permutation(n)])
    no_size = _compose(objects, [int(k) for k in rng.permutation(n)], with_size=False)[0]
    counted = _listing(objects, [int(k) for k in rng.permutation(n)])
    return [
        first,
        f"there is {reversed_text}",
        f"a picture of {listing}",
        no_size,
        f"{NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}: {counted}",
    ]


def tokenize(text: str) -> List[str]:
    """Karpathy-style tokens: lowercased alphanumeric words."""
    return re.findall(r"[a-z0-9]+", text.lower())


def referring_expressions(objects: Sequence[SceneObject], rng: np.random.Generator) -> List[Tuple[str, int]]:
    """One expression per object, unique within the image: ``the {size} {colour} {shape}``, ``the {colour}
    {shape}``, or (when the shape kind is unique) ``the {shape}`` / ``the {shape} {relation} the {colour} {shape}``."""
    kinds = [o.shape for o in objects]
    out = []
    for k, obj in enumerate(objects):
        options = [f"the {obj.size} {obj.colour} {obj.shape}", f"the {obj.colour} {obj.shape}"]
        if kinds.count(obj.shape) == 1:
            options.append(f"the {obj.shape}")
            others = [j for j in range(len(objects)) if j != k]
            if others:
                j = others[int(rng.integers(len(others)))]
                options.append(
                    f"the {obj.shape} {relation(obj, objects[j])} the {objects[j].colour} {objects[j].shape}"
                )
        out.append((options[int(rng.integers(len(options)))], k))
    return out


def vqa_questions(objects: Sequence[SceneObject], rng: np.random.Generator) -> List[Dict[str, str]]:
    """Questions with one answer each: count, colour of a unique shape kind, shape of a unique colour, and a
    balanced yes/no presence question. Keys: ``question``, ``answer``, ``question_type``, ``answer_type``."""
    n = len(objects)
    qs = [
        {
            "question": "how many shapes are there?",
            "answer": str(n),
            "question_type": "how many",
            "answer_type": "number",
        }
    ]
    unique_kind = [o for o in objects if [p.shape for p in objects].count(o.shape) == 1]
    if unique_kind:
        obj = unique_kind[int(rng.integers(len(unique_kind)))]
        qs.append(
            {
                "question": f"what colour is the {obj.shape}?",
                "answer": obj.colour,
                "question_type": "what colour is the",
                "answer_type": "other",
            }
        )
    unique_colour = [o for o in objects if [p.colour for p in objects].count(o.colour) == 1]
    if unique_colour:
        obj = unique_colour[int(rng.integers(len(unique_colour)))]
        qs.append(
            {
                "question": f"what shape is the {obj.colour} one?",
                "answer": obj.shape,
                "question_type": "what shape is the",
                "answer_type": "other",
            }
        )
    present = [o.combo for o in objects]
    if rng.random() < 0.5:
        combo, answer = present[int(rng.integers(n))], "yes"
    else:
        absent = [c for c in all_combos() if c not in present]
        combo, answer = absent[int(rng.integers(len(absent)))], "no"
    qs.append(
        {
            "question": f"is there {indefinite(combo)}?",
            "answer": answer,
            "question_type": "is there a",
            "answer_type": "yes/no",
        }
    )
    return qs


def _words(objects: Sequence[SceneObject]) -> Dict[int, Tuple[str, str, str]]:
    return {k: (o.size, o.colour, o.shape) for k, o in enumerate(objects)}


def sugarcrepe_pairs(objects: Sequence[SceneObject], rng: np.random.Generator) -> Dict[str, Tuple[str, str]]:
    """SugarCrepe (positive, negative) caption pairs per category this scene supports.

    Every negative is false for the image: a replaced or swapped attribute yields a combination absent from the
    image, a replaced relation is the opposite one, an added attribute is the wrong size word.
    """
    n = len(objects)
    present = {o.combo for o in objects}
    order = [int(k) for k in rng.permutation(n)]
    positive = _compose(objects, order)[0]
    out: Dict[str, Tuple[str, str]] = {}

    k = order[int(rng.integers(n))]
    obj = objects[k]
    if rng.random() < 0.3:
        flipped = SIZES[1 - SIZES.index(obj.size)]
        out["replace_att"] = (
            positive,
            _compose(objects, order, words={**_words(objects), k: (flipped, obj.colour, obj.shape)})[0],
        )
    else:
        colours = [c for c in COLOURS if (c, obj.shape) not in present]
        colour = colours[int(rng.integers(len(colours)))]
        out["replace_att"] = (
            positive,
            _compose(objects, order, words={**_words(objects), k: (obj.size, colour, obj.shape)})[0],
        )
    shapes = [s for s in SHAPES if (obj.colour, s) not in present]
    shape = shapes[int(rng.integers(len(shapes)))]
    out["replace_obj"] = (
        positive,
        _compose(objects, order, words={**_words(objects), k: (obj.size, obj.colour, shape)})[0],
    )
    if n >= 2:
        lead = order[0]
        flipped_rel = INVERSE_RELATION[relation(objects[lead], objects[order[1]])]
        out["replace_rel"] = (positive, _compose(objects, order, relations={lead: flipped_rel})[0])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    swappable = [
        (i, j)
        for i, j in pairs
        if objects[i].colour != objects[j].colour
        and (objects[j].colour, objects[i].shape) not in present
        and (objects[i].colour, objects[j].shape) not in present
    ]
    if swappable:
        i, j = swappable[int(rng.integers(len(swappable)))]
        words = _words(objects)
        words[i] = (objects[i].size, objects[j].colour, objects[i].shape)
        words[j] = (objects[j].size, objects[i].colour, objects[j].shape)
        out["swap_att"] = (positive, _compose(objects, order, words=words)[0])
    swappable = [
        (i, j)
        for i, j in pairs
        if objects[i].shape != objects[j].shape
        and (objects[i].colour, objects[j].shape) not in present
        and (objects[j].colour, objects[i].shape) not in present
    ]
    if swappable:
        i, j = swappable[int(rng.integers(len(swappable)))]
        words = _words(objects)
        words[i] = (objects[i].size, objects[i].colour, objects[j].shape)
        words[j] = (objects[j].size, objects[j].colour, objects[i].shape)
        out["swap_obj"] = (positive, _compose(objects, order, words=words)[0])
    k = order[int(rng.integers(n))]
    wrong = SIZES[1 - SIZES.index(objects[k].size)]
    words = {**_words(objects), k: (wrong, objects[k].colour, objects[k].shape)}
    out["add_att"] = (
        _compose(objects, order, with_size=False)[0],
        _compose(objects, order, with_size={k}, words=words)[0],
    )
    return out
