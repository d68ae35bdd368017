"""Scenes of the synthetic world: per-sample random generators, held-out combinations, scene sampling, shape
placement and rendering (images, label maps, segmentation masks, encoded bytes)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    SEGMENTATION_SETS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    all_combos,
)

HELDOUT_FRACTION = 0.15
JPEG_QUALITY = 90
SEGMENTATION_IGNORE = 255

# Random streams: the first entry of every SeedSequence spawn key.
_STREAM = {"train": 0, "val": 1, "test": 2, "zeroshot": 3, "video": 4, "heldout": 5}


# --------------------------------------------------------------------------------------------- specs and objects
@dataclass(frozen=True)
class Background:
    """A background: ``kind`` in :data:`BACKGROUND_KINDS`, palette names and jittered RGB values.

    ``colour2``/``rgb2`` are the gradient's end colour (equal to the first for other kinds), ``angle`` the gradient
    direction in radians, ``noise_std`` the per-pixel noise of the ``noise`` kind.
    """

    kind: str
    colour: str
    rgb: Tuple[int, int, int]
    colour2: str
    rgb2: Tuple[int, int, int]
    angle: float = 0.0
    noise_std: float = 0.0

    def describe(self) -> str:
        """One sentence for the long caption."""
        if self.kind == "gradient":
            return f"The background is a gradient from {self.colour} to {self.colour2}."
        if self.kind == "noise":
            return f"The background is a lightly textured {self.colour}."
        return f"The background is plain {self.colour}."


@dataclass(frozen=True)
class ShapeSpec:
    """A shape to draw. ``cx``, ``cy`` (pixel centre) and ``extent`` (pixel width of its square frame) are drawn by
    :func:`place_shapes` when left ``None``."""

    shape: str
    colour: str
    size: str
    cx: Optional[float] = None
    cy: Optional[float] = None
    extent: Optional[float] = None


@dataclass(frozen=True)
class SceneSpec:
    """A canvas, its background and the shapes on it."""

    width: int
    height: int
    background: Background
    shapes: Tuple[ShapeSpec, ...]


@dataclass(frozen=True)
class SceneObject:
    """A rendered shape. ``box`` is normalised ``[x0, y0, x1, y1]``; ``box_px`` is in pixels, ``x1``/``y1``
    exclusive; ``area`` counts its pixels."""

    shape: str
    colour: str
    size: str
    box: Tuple[float, float, float, float]
    box_px: Tuple[int, int, int, int]
    area: int

    @property
    def combo(self) -> Tuple[str, str]:
        return self.colour, self.shape

    @property
    def centre_px(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.box_px
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def to_json(self) -> Dict[str, Any]:
        """The ``objects`` entry of the webdataset json: ``{"shape", "colour", "size", "box"}``."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}


# --------------------------------------------------------------------------------------------------- held-out combos
def sample_rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    """The generator of one sample: independent of chunking and of every other sample."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM[stream], *index)))


def heldout_combos(seed: int, enabled: bool = True) -> List[Tuple[str, str]]:
    """The held-out (colour, shape) pairs: one per shape kind with distinct colours, then random extra pairs up to
    ``HELDOUT_FRACTION`` of all pairs. Sorted; empty when disabled."""
    if not enabled:
        return []
    rng = sample_rng(seed, "heldout", 0)
    colours = list(COLOURS)
    perm = rng.permutation(len(colours))
    chosen = {(colours[perm[i % len(colours)]], shape) for i, shape in enumerate(SHAPES)}
    target = max(len(SHAPES), round(HELDOUT_FRACTION * len(all_combos())))
    rest = [c for c in all_combos() if c not in chosen]
    for i in rng.permutation(len(rest))[: target - len(chosen)]:
        chosen.add(rest[i])
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------- sampling
def sample_canvas(rng: np.random.Generator, image_size: int) -> Tuple[int, int]:
    """Width and height with aspect ratio in [0.75, 1.33] and area about ``image_size ** 2``."""
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(4.0 / 3.0)))
    return int(round(image_size * math.sqrt(aspect))), int(round(image_size / math.sqrt(aspect)))


def _jitter(rng: np.random.Generator, rgb: Tuple[int, int, int], amount: int = 8) -> Tuple[int, int, int]:
    shifted = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return tuple(int(v) for v in shifted)


def sample_background(rng: np.random.Generator) -> Background:
    """A random background kind and palette colour(s), each jittered by up to 8 levels per channel."""
    names = list(BACKGROUND_COLOURS)
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    first = names[int(rng.integers(len(names)))]
    second = first
    if kind == "gradient":
        second = names[int(rng.integers(len(names) - 1))]
        second = second if second != first else names[-1]
    return Background(
        kind=kind,
        colour=first,
        rgb=_jitter(rng, BACKGROUND_COLOURS[first]),
        colour2=second,
        rgb2=_jitter(rng, BACKGROUND_COLOURS[second]),
        angle=float(rng.uniform(0, 2 * math.pi)),
        noise_std=float(rng.uniform(5.0, 12.0)) if kind == "noise" else 0.0,
    )


def sample_combos(
    rng: np.random.Generator, pool: Sequence[Tuple[str, str]], count: int, required: Sequence[Tuple[str, str]] = ()
) -> List[Tuple[str, str]]:
    """``count`` distinct combos: the ``required`` ones first, the rest drawn from ``pool``."""
    chosen = list(required)
    candidates = [c for c in pool if c not in chosen]
    for i in rng.permutation(len(candidates))[: max(0, count - len(chosen))]:
        chosen.append(candidates[i])
    return chosen


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    pool: Sequence[Tuple[str, str]],
    required: Sequence[Tuple[str, str]] = (),
    max_objects: int = 4,
) -> SceneSpec:
    """A scene with 1..``max_objects`` shapes of distinct combos drawn from ``pool`` (``required`` ones first, so
    they are placed on an empty canvas and never dropped)."""
    width, height = sample_canvas(rng, image_size)
    background = sample_background(rng)
    count = int(rng.integers(1, max_objects + 1))
    combos = sample_combos(rng, pool, max(count, len(required)), required)
    shapes = tuple(ShapeSpec(shape=s, colour=c, size=SIZES[int(rng.integers(len(SIZES)))]) for c, s in combos)
    return SceneSpec(width, height, background, shapes)


def extent_range(size: str, width: int, height: int) -> Tuple[float, float]:
    """Pixel extent range of a size word on this canvas, capped so the shape fits."""
    scale = math.sqrt(width * height)
    cap = min(width, height) - 4.0
    lo, hi = SIZE_RANGES[size]
    return min(lo * scale, cap), min(hi * scale, cap)


def place_shapes(rng: np.random.Generator, spec: SceneSpec, gap: float = 2.0, tries: int = 60) -> List[ShapeSpec]:
    """Give every shape a centre and extent inside the canvas, ``gap`` pixels apart from the others' frames.

    A shape that finds no room after ``tries`` draws is dropped (never the first one, which has an empty canvas).
    Shapes that already have a position are kept as they are.
    """
    placed: List[ShapeSpec] = []
    frames: List[Tuple[float, float, float, float]] = []
    for sh in spec.shapes:
        if sh.cx is not None and sh.cy is not None and sh.extent is not None:
            placed.append(sh)
            continue
        lo, hi = extent_range(sh.size, spec.width, spec.height)
        extent = float(rng.uniform(lo, hi)) if sh.extent is None else sh.extent
        half = extent / 2.0
        candidates = rng.uniform(0.0, 1.0, size=(tries, 2))
        candidates[:, 0] = half + 1 + candidates[:, 0] * (spec.width - extent - 2)
        candidates[:, 1] = half + 1 + candidates[:, 1] * (spec.height - extent - 2)
        for cx, cy in candidates.tolist():
            frame = (cx - half, cy - half, cx + half, cy + half)
            if all(
                frame[2] + gap <= f[0] or f[2] + gap <= frame[0] or frame[3] + gap <= f[1] or f[3] + gap <= frame[1]
                for f in frames
            ):
                frames.append(frame)
                placed.append(replace(sh, cx=cx, cy=cy, extent=extent))
                break
    return placed


# --------------------------------------------------------------------------------------------------- rendering
def render_background(rng: np.random.Generator, bg: Background, width: int, height: int) -> np.ndarray:
    """H x W x 3 uint8 background; the ``noise`` kind draws its texture from ``rng``."""
    base = np.asarray(bg.rgb, dtype=np.float32)
    if bg.kind == "gradient":
        xs = np.arange(width, dtype=np.float32)[None, :]
        ys = np.arange(height, dtype=np.float32)[:, None]
        proj = xs * math.cos(bg.angle) + ys * math.sin(bg.angle)  # H x W
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        out = base * (1.0 - t[..., None]) + np.asarray(bg.rgb2, dtype=np.float32) * t[..., None]
    elif bg.kind == "noise":
        noise = rng.normal(0.0, bg.noise_std, size=(height, width, 1)).astype(np.float32)
        out = base + noise
    else:
        out = np.broadcast_to(base, (height, width, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _star_points(cx: float, cy: float, r: float, inner: float = 0.5) -> List[Tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill: int) -> None:
    """Draw one filled shape whose square frame of side ``extent`` is centred on ``(cx, cy)``."""
    r = extent / 2.0
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r), fill=fill)
    elif shape == "cross":
        t = extent * 0.18
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_layers(rng: np.random.Generator, spec: SceneSpec) -> Tuple[np.ndarray, np.ndarray, List[SceneObject]]:
    """Render a scene to ``(rgb H x W x 3 uint8, labels H x W uint8, objects)``; ``labels == k + 1`` marks
    ``objects[k]`` and 0 the background."""
    rgb = render_background(rng, spec.background, spec.width, spec.height).copy()
    placed = place_shapes(rng, spec)
    label_img = Image.new("L", (spec.width, spec.height), 0)
    draw = ImageDraw.Draw(label_img)
    for k, sh in enumerate(placed):
        draw_shape(draw, sh.shape, sh.cx, sh.cy, sh.extent, fill=k + 1)
    labels = np.asarray(label_img)
    objects: List[SceneObject] = []
    for k, sh in enumerate(placed):
        mask = labels == k + 1
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        rgb[mask] = COLOURS[sh.colour]
        box = (
            round(x0 / spec.width, 6),
            round(y0 / spec.height, 6),
            round(x1 / spec.width, 6),
            round(y1 / spec.height, 6),
        )
        objects.append(SceneObject(sh.shape, sh.colour, sh.size, box, (x0, y0, x1, y1), int(mask.sum())))
    return rgb, labels, objects


def render_scene(rng: np.random.Generator, spec: SceneSpec) -> Tuple[Image.Image, List[SceneObject]]:
    """Render a scene to an RGB image and its objects (see :func:`render_layers`)."""
    rgb, _, objects = render_layers(rng, spec)
    return Image.fromarray(rgb, mode="RGB"), objects


def encode_image(img: Image.Image, fmt: str = "jpg") -> bytes:
    """JPEG (quality 90, no chroma subsampling, so colours survive on small shapes) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def segmentation_mask(labels: np.ndarray, objects: Sequence[SceneObject], by: str = "shape") -> np.ndarray:
    """VOC-style class mask: 0 background, ``1 + index`` of each object's ``by`` attribute (``shape``: in
    ``SHAPES``; ``colour``: in ``COLOURS``) on its pixels, 255 on the object pixels that touch a pixel of another
    label (a 1-px boundary)."""
    names = dict(SEGMENTATION_SETS.values())  # attribute -> class names
    if by not in names:
        raise ValueError(f"segmentation masks label 'shape' or 'colour', not {by!r}")
    lut = np.zeros(256, dtype=np.uint8)
    for k, obj in enumerate(objects):
        lut[k + 1] = 1 + names[by].index(getattr(obj, by))
    classes = lut[labels]
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    classes[edge & (labels > 0)] = SEGMENTATION_IGNORE
    return classes


def segmentation_palette() -> List[int]:
    """A 768-entry PIL palette: black background, distinct colours per class, VOC's cream for 255."""
    colours = [
        (0, 0, 0),
        (128, 0, 0),
        (0, 128, 0),
        (128, 128, 0),
        (0, 0, 128),
        (128, 0, 128),
        (0, 128, 128),
        (128, 128, 128),
    ]
    palette = [0] * 768
    for i, rgb in enumerate(colours):
        palette[3 * i : 3 * i + 3] = rgb
    palette[3 * 255 : 3 * 256] = [224, 224, 192]
    return palette
