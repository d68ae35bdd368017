"""The words of the synthetic world: shape kinds, colours, sizes, relations, motions, backgrounds, templates and
class names. Plain constants with no dependency, so that the data layer (e.g. :mod:`unilm_vl.data.hard_negatives`)
can use the world's vocabulary without importing the generator."""

from typing import Dict, List, Tuple

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 175),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES: Tuple[str, ...] = ("small", "large")
SIZE_RANGES: Dict[str, Tuple[float, float]] = {"small": (0.18, 0.25), "large": (0.32, 0.42)}
"""Shape extent as a fraction of ``sqrt(width * height)``; the ranges are disjoint."""
RELATIONS: Tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
INVERSE_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
MOTIONS: Tuple[str, ...] = ("moves to the right", "moves to the left", "moves up", "moves down", "grows", "shrinks")
BACKGROUND_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "light grey": (165, 165, 160),
    "dark grey": (95, 95, 100),
    "beige": (170, 160, 132),
    "sage": (128, 150, 125),
    "slate": (108, 118, 140),
    "sand": (165, 145, 115),
    "taupe": (130, 115, 110),
}
"""Muted backgrounds: far enough in chroma or brightness from every shape colour that shapes stay visible."""
BACKGROUND_KINDS: Tuple[str, ...] = ("solid", "gradient", "noise")
ZEROSHOT_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a {} on a plain background.",
)
SUGARCREPE_CATEGORIES: Tuple[str, ...] = (
    "replace_att",
    "replace_obj",
    "replace_rel",
    "swap_att",
    "swap_obj",
    "add_att",
)
SEGMENTATION_SETS = {"segmentation": ("shape", SHAPES), "segmentation_colour": ("colour", tuple(COLOURS))}
"""``eval/<folder>``: the object attribute its masks label, and that attribute's class names (labels 1..)."""
NUMBER_WORDS: Tuple[str, ...] = ("zero", "one", "two", "three", "four")
"""Object counts in words (scenes hold 1-4 objects)."""


def all_combos() -> List[Tuple[str, str]]:
    """Every (colour, shape) pair, colour-major; the zero-shot class order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def class_name(combo: Tuple[str, str]) -> str:
    """The zero-shot class name of a combo: ``red circle``."""
    return f"{combo[0]} {combo[1]}"
