"""A benchmark world at real image sizes: ``train/wds`` and ``train/grit`` shards whose JPEGs are 320-640 px on
the short side, as web-scale image-text data holds them, so that the data benchmark measures what users pay for:
decoding and resizing large JPEGs to the tower's 224 px.

Each image is a scene of the synthetic world (:func:`~.scenes.sample_scene`, drawn on a canvas whose short side is
uniform in ``[320, 640]`` and aspect ratio in ``[1, 4/3]``, landscape or portrait) with photographic grain (per-pixel
Gaussian noise of standard deviation 3-6, so the JPEG entropy decoding costs what a photograph's does instead of a
flat drawing's) stored as a baseline JPEG of quality 90 with PIL's default 4:2:0 chroma subsampling (what cameras
and web images use). The caption is the scene's relational caption followed by sentences of its long caption, cut
to 10-30 words. Same seed, same bytes; the layout is the training split of a world (``train/wds/part-*.tar``,
``train/grit/part-*.tsv`` and ``train/grit.json``) with ``--shards`` shards, so open_clip's loader can run with as
many workers.

Command line::

    python -m unilm_vl.data.synthetic.real_size --out DIR [--num 2000] [--shards 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import time
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence

import numpy as np
from PIL import Image

from ...logging_utils import setup_cli_logging
from .language import caption_for, long_caption_for
from .scenes import render_scene, sample_rng, sample_scene
from .vocabulary import all_combos
from .writers import ShardSplit

logger = logging.getLogger(__name__)

SHORT_SIDE = (320, 640)
"""Range of the short side in pixels (both ends included)."""
JPEG_QUALITY = 90
GRAIN_STD = (3.0, 6.0)
"""Range of the per-pixel noise standard deviation (8-bit levels)."""
CAPTION_WORDS = (10, 30)
"""Range of caption lengths in words (both ends included)."""


def real_size_caption(caption: str, long_caption: str, rng: np.random.Generator) -> str:
    """The caption, then whole sentences of the long caption until a length drawn from :data:`CAPTION_WORDS` is
    reached (the long caption repeats for a short scene), cut to at most ``CAPTION_WORDS[1]`` words."""
    target = int(rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1))
    sentences = [s if s.endswith(".") else s + "." for s in long_caption.split(". ")]
    words = (caption.rstrip(".") + ".").split()
    k = 0
    while len(words) < target:
        words += sentences[k % len(sentences)].split()
        k += 1
    return " ".join(words[: CAPTION_WORDS[1]])


def make_real_size_sample(seed: int, index: int) -> Dict[str, Any]:
    """One sample in the layout :class:`~.writers.ShardSplit` writes."""
    rng = sample_rng(seed, "train", index)
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    long = int(round(short * rng.uniform(1.0, 4.0 / 3.0)))
    width, height = (long, short) if rng.uniform() < 0.5 else (short, long)
    spec = replace(sample_scene(rng, 64, all_combos()), width=width, height=height)
    img, objects = render_scene(rng, spec)
    grain = rng.normal(0.0, rng.uniform(*GRAIN_STD), size=(height, width, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    cap = caption_for(objects, rng)
    long_caption = long_caption_for(objects, spec.background, width, height)
    return {
        "id": f"train_{index:07d}",
        "image": buf.getvalue(),
        "ext": "jpg",
        "width": width,
        "height": height,
        "caption": real_size_caption(cap.text, long_caption, rng),
        "noun_chunks": cap.noun_chunks,
        "ref_exps": cap.ref_exps,
        "long_caption": long_caption,
        "objects": [o.to_json() for o in objects],
    }


def write_real_size_world(out_dir: str, num: int = 2000, shards: int = 16, seed: int = 0) -> Dict[str, Any]:
    """Write ``num`` samples in ``shards`` shards of each format under ``out_dir/train``; returns a summary."""
    if num <= 0 or shards <= 0 or shards > num:
        raise ValueError(f"need 0 < shards <= num, got num={num}, shards={shards}")
    start = time.perf_counter()
    split = ShardSplit(out_dir, "train", rows_per_shard=math.ceil(num / shards))
    jpeg_bytes = 0
    for index in range(num):
        sample = make_real_size_sample(seed, index)
        jpeg_bytes += len(sample["image"])
        split.write(sample)
    paths = split.close(out_dir)
    summary = {
        "samples": num,
        "shards": len(paths["wds_shards"]),
        "seed": seed,
        "mean_jpeg_kib": round(jpeg_bytes / num / 1024, 1),
        "seconds": round(time.perf_counter() - start, 1),
        **paths,
    }
    logger.info(
        "real-size world: %d samples in %d shards, mean JPEG %.1f KiB, %.1f s",
        num,
        summary["shards"],
        summary["mean_jpeg_kib"],
        summary["seconds"],
    )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (its train/ folder is written)")
    p.add_argument("--num", type=int, default=2000, help="samples")
    p.add_argument("--shards", type=int, default=16, help="shards per format (>= the loader workers to benchmark)")
    p.add_argument("--seed", type=int, default=0, help="master seed; same seed, same bytes")
    args = p.parse_args(argv)
    setup_cli_logging()
    return write_real_size_world(os.path.abspath(args.out), args.num, args.shards, args.seed)


if __name__ == "__main__":
    main()
