"""Videos of the synthetic world: clips of 1-2 shapes that move, grow or shrink, their descriptions and frames."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from .language import object_phrase
from .scenes import Background, SceneSpec, ShapeSpec, render_scene, sample_background, sample_canvas, sample_combos
from .vocabulary import MOTIONS, SIZE_RANGES, SIZES


# ------------------------------------------------------------------------------------------------------- videos
@dataclass(frozen=True)
class Track:
    """One shape of a clip moving linearly from ``(cx0, cy0, extent0)`` to ``(cx1, cy1, extent1)``."""

    shape: str
    colour: str
    size: str
    motion: str
    cx0: float
    cy0: float
    extent0: float
    cx1: float
    cy1: float
    extent1: float

    def at(self, t: float) -> ShapeSpec:
        """The shape at time ``t`` in [0, 1]."""
        return ShapeSpec(
            self.shape,
            self.colour,
            self.size,
            cx=self.cx0 + t * (self.cx1 - self.cx0),
            cy=self.cy0 + t * (self.cy1 - self.cy0),
            extent=self.extent0 + t * (self.extent1 - self.extent0),
        )


@dataclass(frozen=True)
class ClipSpec:
    """A clip: canvas, background, frame count, tracks and the seed of its (static) background texture."""

    width: int
    height: int
    background: Background
    num_frames: int
    tracks: Tuple[Track, ...]
    texture_seed: int

    def descriptions(self) -> Tuple[str, str]:
        """``a small red circle moves to the right and ...`` and ``the red circle moves to the right while ...``."""
        first = " and ".join(f"{object_phrase(t)} {t.motion}" for t in self.tracks)
        second = " while ".join(f"the {t.colour} {t.shape} {t.motion}" for t in self.tracks)
        return first, second


def _sample_track(
    rng: np.random.Generator,
    combo: Tuple[str, str],
    region: Tuple[float, float, float, float],
    scale: float,
    allow_large: bool,
) -> Track:
    """A track confined to ``region`` (x0, y0, x1, y1) whose motion covers at least a third of the free room."""
    colour, shape = combo
    rx0, ry0, rx1, ry1 = region
    room = min(rx1 - rx0, ry1 - ry0) - 4.0
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    if motion == "grows":
        size, e0 = "small", float(rng.uniform(*SIZE_RANGES["small"])) * scale
        e0 = min(e0, room / 1.5)
        e1 = min(e0 * float(rng.uniform(1.5, 1.8)), room)
    elif motion == "shrinks":
        size, e0 = "large", min(float(rng.uniform(*SIZE_RANGES["large"])) * scale, room)
        e1 = e0 / float(rng.uniform(1.5, 1.8))
    else:
        size = SIZES[int(rng.integers(2))] if allow_large else "small"
        e0 = e1 = min(float(rng.uniform(*SIZE_RANGES[size])) * scale, room, 0.6 * max(rx1 - rx0, ry1 - ry0) - 4.0)
    half = max(e0, e1) / 2.0
    xs = (rx0 + half + 1, rx1 - half - 1)
    ys = (ry0 + half + 1, ry1 - half - 1)
    cx0 = cx1 = float(rng.uniform(*xs))
    cy0 = cy1 = float(rng.uniform(*ys))
    slack = float(rng.uniform(0.0, 0.15))
    if motion in ("moves to the right", "moves to the left"):
        a, b = xs[0] + slack * (xs[1] - xs[0]), xs[1] - slack * (xs[1] - xs[0])
        cx0, cx1 = (a, b) if motion == "moves to the right" else (b, a)
    elif motion in ("moves down", "moves up"):
        a, b = ys[0] + slack * (ys[1] - ys[0]), ys[1] - slack * (ys[1] - ys[0])
        cy0, cy1 = (a, b) if motion == "moves down" else (b, a)
    return Track(shape, colour, size, motion, cx0, cy0, e0, cx1, cy1, e1)


def sample_clip(
    rng: np.random.Generator, image_size: int, pool: Sequence[Tuple[str, str]], required: Sequence[Tuple[str, str]] = ()
) -> ClipSpec:
    """A clip of 6-12 frames (8 half of the time) with 1-2 tracks; two tracks get one half of the canvas each so
    they never overlap."""
    width, height = sample_canvas(rng, image_size)
    background = sample_background(rng)
    num_frames = 8 if rng.random() < 0.5 else int(rng.integers(6, 13))
    count = max(int(rng.integers(1, 3)), len(required))
    combos = sample_combos(rng, pool, count, required)
    if count == 1:
        regions = [(0.0, 0.0, float(width), float(height))]
    elif rng.random() < 0.5:
        regions = [(0.0, 0.0, width / 2.0, float(height)), (width / 2.0, 0.0, float(width), float(height))]
    else:
        regions = [(0.0, 0.0, float(width), height / 2.0), (0.0, height / 2.0, float(width), float(height))]
    order = rng.permutation(count)
    scale = math.sqrt(width * height)
    tracks = tuple(_sample_track(rng, combos[i], regions[int(order[i])], scale, count == 1) for i in range(count))
    return ClipSpec(width, height, background, num_frames, tracks, int(rng.integers(2**31)))


def render_clip(clip: ClipSpec) -> List[Image.Image]:
    """The frames of a clip; the background texture is identical in every frame."""
    frames = []
    for f in range(clip.num_frames):
        t = f / (clip.num_frames - 1)
        spec = SceneSpec(clip.width, clip.height, clip.background, tuple(tr.at(t) for tr in clip.tracks))
        img, _ = render_scene(np.random.default_rng(clip.texture_seed), spec)
        frames.append(img)
    return frames
