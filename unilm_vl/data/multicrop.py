"""COSMOS training views: DINO-style image multi-crop and text crops of long captions, as picklable stages, plus their
collater (ExplainableML/cosmos ``src/open_clip/transform.py``, ``src/training/data.py``, ``src/training/train.py``).

Flow of one training sample (built by :func:`multicrop_stages`)::

    decoded {"image": PIL, "caption": raw caption, "meta": wds json}
      --FramesToImage--> --MultiCropImage--> "global_crops": [g1, g2] (S x S), "local_crops": [l1..lN] (s x s)
      --TextCrops-->      "captions": [global 1, global 2, local 1..local K-2]   (or [raw caption] in raw mode)
      --TokenizeViews-->  "text_views": K x L
    batch (CollateMultiCrop): net_input {"image": 2 x B x 3 x S x S, "image_local": N x B x 3 x s x s,
                                         "text": K x B x L}   view-major: view v of sample b at [v, b]

Randomness: the image crops draw from ``torch``/``random`` seeded per sample by the pipeline; the text crops keep
their own ``random.Random`` seeded from the sample's ``__seed__``, so both replay exactly on resume.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
from PIL import Image, ImageFilter, ImageOps

from .decode import BadSample
from .pipeline import derive_seed
from .stages import CollateImageText, FramesToImage, TokenizeViews

CAPTION_SAMPLING_MODES = ("raw", "textcrop")
MAX_GLOBAL_SENTENCES = 5
"""a global text crop joins randint(1, 5) sampled sentences (the reference's choice)."""


# ------------------------------------------------------------------------------------------------- image crops
@dataclass
class RandomGaussianBlur:
    """PIL Gaussian blur with radius U(radius_min, radius_max), applied with probability ``p`` (DINO's blur)."""

    p: float
    radius_min: float = 0.1
    radius_max: float = 2.0

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


@dataclass
class RandomSolarize:
    """PIL solarisation (threshold 128) with probability ``p``."""

    p: float

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def _crop_transform(size: int, scale: Tuple[float, float], extra: Sequence, mean, std):
    """RandomResizedCrop (bicubic) -> flip p .5, colour jitter (.4, .4, .2, .1) p .8, grayscale p .2 -> ``extra``
    (blur / solarise) -> tensor, normalised."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *extra,
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


@dataclass
class MultiCropTransform:
    """PIL image -> ``([g1, g2], [l1..lN])``: 2 global crops ``RandomResizedCrop(global_size, scale=(crop_scale,
    1))`` and N local crops ``RandomResizedCrop(local_size, scale=(0.05, crop_scale))``. Global 1 is always blurred,
    global 2 blurred with p .1 and solarised with p .2, each local crop blurred with p .5 (reference
    ``DataAugmentationMulticrop``)."""

    global_size: int
    local_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_scale: float = 0.4
    num_local: int = 6
    num_global: int = 2
    local_scale_min: float = 0.05

    def __post_init__(self):
        if self.num_global != 2:
            raise ValueError(
                f"--global-crops-number must be 2 (two global crops with their own augmentations, as the "
                f"reference asserts), got {self.num_global}"
            )
        if not self.local_scale_min < self.crop_scale <= 1.0:
            raise ValueError(f"--crop-scale must be in ({self.local_scale_min}, 1], got {self.crop_scale}")
        mean, std = tuple(self.mean), tuple(self.std)
        global_scale, local_scale = (self.crop_scale, 1.0), (self.local_scale_min, self.crop_scale)
        self.global_1 = _crop_transform(self.global_size, global_scale, [RandomGaussianBlur(1.0)], mean, std)
        self.global_2 = _crop_transform(
            self.global_size, global_scale, [RandomGaussianBlur(0.1), RandomSolarize(0.2)], mean, std
        )
        self.local = _crop_transform(self.local_size, local_scale, [RandomGaussianBlur(0.5)], mean, std)

    def __call__(self, image: Image.Image) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        image = image.convert("RGB")
        globals_ = [self.global_1(image), self.global_2(image)]
        return globals_, [self.local(image) for _ in range(self.num_local)]


@dataclass
class MultiCropImage:
    """``sample["global_crops"], sample["local_crops"] = transform(sample["image"])`` (the image is dropped)."""

    transform: MultiCropTransform

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if "image" not in sample:
            raise BadSample("sample has no 'image'", sample.get("__where__", "?"), "image")
        sample["global_crops"], sample["local_crops"] = self.transform(sample.pop("image"))
        return sample


# ------------------------------------------------------------------------------------------------- text crops
def split_caption(text: str) -> List[str]:
    """Sentences of a long caption: split on newlines, ``</s>`` and full stops; pieces stripped, empty ones
    dropped (the reference's ``split_caption``)."""
    return [piece.strip() for piece in re.split(r"\n|</s>|[.]", text) if piece.strip()]


def sample_from_list(items: Sequence, m: int, rng: random.Random) -> List:
    """The reference's ``random_sample_from_list``: ``rng.sample(items, m)`` when ``len(items) >= m``, otherwise
    ``m // n`` whole copies of ``items`` in their original order followed by ``rng.sample(items, m % n)``."""
    items = list(items)
    n = len(items)
    if n == 0:
        raise ValueError("cannot sample from an empty list of sentences")
    if m < 0:
        raise ValueError(f"cannot sample a negative number ({m}) of sentences")
    if n >= m:
        return rng.sample(items, m)
    return (m // n) * items + rng.sample(items, m % n)


def text_crops(sentences: Sequence[str], num_captions: int, rng: random.Random, num_global: int = 2) -> List[str]:
    """``num_global`` global captions, each ``'. '.join(sample(L, randint(1, 5)))``, then ``num_captions -
    num_global`` local captions ``sample(L, num_captions - num_global)`` (one sentence each)."""
    if num_captions < num_global:
        raise ValueError(f"text crops need at least {num_global} captions (the global ones), got {num_captions}")
    out = [". ".join(sample_from_list(sentences, rng.randint(1, MAX_GLOBAL_SENTENCES), rng)) for _ in range(num_global)]
    return out + sample_from_list(sentences, num_captions - num_global, rng)


@dataclass
class TextCrops:
    """``sample["captions"]``: the caption views of COSMOS.

    - ``raw``: ``[sample["caption"]]`` (one caption view).
    - ``textcrop``: the sentence list ``L = [raw caption] + sentences of meta[key] for key in long_caption_keys``
      (a string value is split with :func:`split_caption`, a list of strings is used as is: DreamLIP-style
      recaption lists), then :func:`text_crops` with ``num_captions`` views. A missing or empty field is a bad
      sample naming the field.
    """

    mode: str = "textcrop"
    num_captions: int = 8
    long_caption_keys: Tuple[str, ...] = ("long_caption",)
    field: str = "caption"
    out: str = "captions"

    def __post_init__(self):
        if self.mode not in CAPTION_SAMPLING_MODES:
            raise ValueError(f"--caption-sampling-mode must be one of {CAPTION_SAMPLING_MODES}, got {self.mode!r}")
        if self.mode == "textcrop" and self.num_captions < 2:
            raise ValueError(
                f"textcrop needs --num-sampled-captions >= 2 (2 global + local crops), got {self.num_captions}"
            )

    def sentences(self, sample: Dict[str, Any]) -> List[str]:
        where = sample.get("__where__", "?")
        sentences = [sample[self.field]]
        meta = sample.get("meta") or {}
        for key in self.long_caption_keys:
            value = meta.get(key)
            if isinstance(value, str):
                sentences += split_caption(value)
            elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                sentences += [v.strip() for v in value if v.strip()]
            else:
                raise BadSample(f"json lacks a long caption (a string or a list of strings) in {key!r}", where, key)
        return sentences

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if self.mode == "raw":
            sample[self.out] = [sample[self.field]]
            return sample
        rng = random.Random(derive_seed(sample.get("__seed__", 0), "text_crops"))
        sample[self.out] = text_crops(self.sentences(sample), self.num_captions, rng)
        return sample


# ------------------------------------------------------------------------------------------------- batches
@dataclass
class CollateMultiCrop(CollateImageText):
    """Stack crops and caption views view-major::

    {"id": [keys], "nsentences": B, "ntokens": non-pad tokens of all views,
     "net_input": {"image": G x B x 3 x S x S (global crops), "image_local": N x B x 3 x s x s (if N > 0),
                   "text": K x B x L}}
    """

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        texts = torch.stack([s["text_views"] for s in samples]).transpose(0, 1).contiguous()  # K x B x L
        net_input = {
            "image": torch.stack([torch.stack(v) for v in zip(*(s["global_crops"] for s in samples))]),
            "text": texts,
        }  # image: G x B x 3 x S x S
        if samples[0]["local_crops"]:
            net_input["image_local"] = torch.stack(
                [torch.stack(v) for v in zip(*(s["local_crops"] for s in samples))]
            )  # N x B x 3 x s x s
        return {
            "id": [s["__key__"] for s in samples],
            "nsentences": len(samples),
            "ntokens": int((texts != self.pad_id).sum()),
            "net_input": net_input,
        }


def multicrop_stages(
    global_size: int,
    local_size: int,
    mean,
    std,
    tokenizer,
    context_length: int,
    crop_scale: float = 0.4,
    num_global: int = 2,
    num_local: int = 6,
    caption_mode: str = "textcrop",
    num_captions: int = 8,
    long_caption_keys: Sequence[str] = ("long_caption",),
) -> list:
    """The stage list of a COSMOS training stream (see the module docstring)."""
    return [
        FramesToImage(),
        MultiCropImage(
            MultiCropTransform(global_size, local_size, tuple(mean), tuple(std), crop_scale, num_local, num_global)
        ),
        TextCrops(caption_mode, num_captions, tuple(long_caption_keys)),
        TokenizeViews(tokenizer, context_length, field="captions", out="text_views"),
    ]
