"""The synthetic world: a seeded generator of shape scenes in the public data formats the recipes read.

The world
---------
Every image is a muted background (a plain colour, a linear gradient, or a light noise texture, named from a small
palette so it can be described) with 1-4 non-overlapping flat shapes. A shape has a *kind* (:data:`SHAPES`), a
*colour* (:data:`COLOURS`) and a *size* word (:data:`SIZES`, two disjoint extent ranges relative to the image).
Canvases vary in aspect ratio (0.75-1.33) around ``--image-size`` so that resize and crop maths matter. Each
object records its exact bounding box, normalised ``[x0, y0, x1, y1]`` (``x1``/``y1`` exclusive, divided by the
width/height) and in pixels.

Text is derived from the scene: an object phrase ``a {size} {colour} {shape}``; a caption that joins phrases with
spatial relations computed from the box centres in pixels (``a small red circle to the left of a large blue square
and a green star``: objects are paired, each pair is ``A <relation> B``, pairs and a leftover phrase are joined by
``and``); GRIT noun chunks and referring expressions with character spans; a multi-sentence long caption; five
differently worded evaluation captions; RefCOCO expressions, VQA questions and SugarCrepe hard negatives.

No (colour, shape) combination repeats inside one image, so ``the red circle`` is always unique. Unless held-out
combinations are disabled, about 15% of the combinations (at least one per shape kind) never occur in train/val;
every test image and test video contains at least one of them, so the evaluation files measure generalisation.

Determinism: every sample draws from its own ``numpy`` generator seeded by ``SeedSequence(seed, spawn_key=(stream,
index))``. The output is therefore byte-identical for any number of workers and a split does not change when
another split's count does. ``world.json`` is the only file that differs between identical runs (it records the
generation time and worker count).

Layout under ``DIR`` (paths downstream code reads)::

    world.json                       manifest, written last: args, vocab, heldout, counts, relative paths, seconds
    train/grit/part-00000.tsv ...    GRIT_TSV rows, 1000 per shard, + sizes.json
    train/grit.json                  Kosmos-2 data config (shard paths relative to train/)
    train/wds/part-00000.tar ...     img2dataset tars (<key>.jpg|png, .txt, .json), 1000 per shard, + sizes.json
    val/grit/..., val/grit.json, val/wds/...     the same for the in-distribution val split
    eval/images/<id>.jpg             test images, id = f"{index:06d}" (held-out split)
    eval/karpathy.json               5 captions per test image (Karpathy layout, paths relative to eval/)
    eval/zeroshot/classnames.txt, templates.txt, test/<class:03d>/<n>.jpg   ImageFolder of single shapes
    eval/refcoco/finetune_refcoco_testA.json     MDETR-style referring expressions
    eval/vqa/questions.json, annotations.json    VQAv2 layout; image_id = test index (file f"{image_id:06d}.jpg")
    eval/sugarcrepe/<category>.json  replace_att, replace_obj, replace_rel, swap_att, swap_obj, add_att
    eval/segmentation/JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/val.txt,
                      classnames.txt (VOC layout: 0 background, 1..S shape kinds, 255 on object boundaries)
    eval/segmentation_colour/...     the same images and layout, pixels labelled by the object's colour
                                     (0 background, 1..C colour names, 255 on object boundaries)
    videos/frames/<video_id>/frame_0001.jpg ...  6-12 frame clips of 1-2 moving / growing / shrinking shapes
    videos/train.json, videos/test.json          COSA lists: {"video_id", "desc": str} / {"video_id", "desc": [2]}

Command line::

    python -m unilm_vl.data.synthetic --out DIR --seed 0 [--num-train 10000] [--num-val 500] [--num-test 500]
        [--num-videos 400] [--image-size 64] [--no-heldout] [--workers 2]

Modules
-------
:mod:`~.vocabulary` (the words: shape kinds, colours, sizes, relations, motions; no dependency, the only part the
rest of :mod:`unilm_vl.data` imports), :mod:`~.scenes` (sampling, placement, rendering), :mod:`~.language`
(captions, expressions, questions, hard negatives), :mod:`~.video` (clips), :mod:`~.writers` (shards and evaluation
files), :mod:`~.world` (config, seeded tasks, worker pool, :func:`generate_world`, :func:`ensure_world`) and
:mod:`~.cli`. The public names of these modules are importable from this package
(``from unilm_vl.data.synthetic import generate_world``); each loads its module on first use, so importing
:mod:`~.vocabulary` does not import the generator.
"""

import importlib
from typing import Any, Dict, List, Tuple

_EXPORTS: Dict[str, Tuple[str, ...]] = {
    "vocabulary": (
        "SHAPES",
        "COLOURS",
        "SIZES",
        "SIZE_RANGES",
        "RELATIONS",
        "INVERSE_RELATION",
        "MOTIONS",
        "BACKGROUND_COLOURS",
        "BACKGROUND_KINDS",
        "ZEROSHOT_TEMPLATES",
        "SUGARCREPE_CATEGORIES",
        "SEGMENTATION_SETS",
        "NUMBER_WORDS",
        "all_combos",
        "class_name",
    ),
    "scenes": (
        "HELDOUT_FRACTION",
        "JPEG_QUALITY",
        "SEGMENTATION_IGNORE",
        "Background",
        "ShapeSpec",
        "SceneSpec",
        "SceneObject",
        "sample_rng",
        "heldout_combos",
        "sample_canvas",
        "sample_background",
        "sample_combos",
        "sample_scene",
        "extent_range",
        "place_shapes",
        "render_background",
        "draw_shape",
        "render_layers",
        "render_scene",
        "encode_image",
        "segmentation_mask",
        "segmentation_palette",
    ),
    "language": (
        "GroundedCaption",
        "indefinite",
        "object_phrase",
        "relation",
        "position_words",
        "caption_for",
        "long_caption_for",
        "eval_captions",
        "tokenize",
        "referring_expressions",
        "vqa_questions",
        "sugarcrepe_pairs",
    ),
    "video": ("Track", "ClipSpec", "sample_clip", "render_clip"),
    "writers": ("ROWS_PER_SHARD", "TAR_MTIME"),
    "world": (
        "FORMAT_VERSION",
        "PNG_EVERY",
        "CHUNK",
        "ZEROSHOT_PER_CLASS_AT_500",
        "MANAGED_DIRS",
        "WorldConfig",
        "make_train_sample",
        "make_test_sample",
        "make_zeroshot_image",
        "make_video",
        "generate_world",
        "ensure_world",
    ),
    "cli": ("build_arg_parser", "main"),
}
"""Submodule -> the public names this package re-exports from it."""
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Load the submodule that defines ``name`` (PEP 562) and keep the value here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
