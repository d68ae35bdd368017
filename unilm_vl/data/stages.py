"""Small picklable per-sample stages and collaters. Each stage maps a sample dict to a sample dict and may raise
:class:`~unilm_vl.data.decode.BadSample` to have the sample skipped and counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .decode import BadSample
from .pipeline import stack_rows
from .transforms import normalize_images


@dataclass
class FramesToImage:
    """Use the middle frame of a frames sample as its image (lets video sources feed image-text tasks)."""

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if "image" not in sample and "frames" in sample:
            frames = sample.pop("frames")
            sample["image"] = frames[(len(frames) + 1) // 2 - 1]
        return sample


@dataclass
class ImageTransform:
    """Apply a PIL -> tensor transform to ``sample[field]``."""

    transform: Callable
    field: str = "image"
    optional: bool = False
    """pass samples without the field through (text-only documents mixed into image-text data)"""

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if self.field not in sample:
            if self.optional:
                return sample
            raise BadSample(f"sample has no {self.field!r}", sample.get("__where__", "?"), self.field)
        try:
            sample[self.field] = self.transform(sample[self.field])
        except BadSample as exc:  # a deferred image that fails to decode inside the transform: name the sample
            if exc.source != "?":
                raise
            raise BadSample(exc.reason, sample.get("__where__", "?"), self.field) from None
        return sample


@dataclass
class Tokenize:
    """``sample[out] = tokenizer.encode_batch([sample[field]], context_length)[0]`` (a LongTensor of fixed length)."""

    tokenizer: Any
    context_length: int
    field: str = "caption"
    out: str = "text"

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        sample[self.out] = self.tokenizer.encode_batch([sample[self.field]], self.context_length)[0]
        return sample


@dataclass
class CollateImageText:
    """Stack images and token rows into fairseq's sample layout::

        {"id": [keys], "nsentences": B, "ntokens": non-pad tokens,
         "net_input": {"image": B x 3 x H x W, "text": B x L}}

    uint8 images (:class:`~unilm_vl.data.transforms.ClipTrainView`) are normalised here, once per batch, with
    ``image_mean`` / ``image_std`` (:func:`~unilm_vl.data.transforms.normalize_images`: the same float32 values
    as normalising each sample); float images pass as they are.
    """

    pad_id: int = 0
    image_field: str = "image"
    text_field: str = "text"
    image_mean: Optional[Sequence[float]] = None
    image_std: Optional[Sequence[float]] = None

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        images = stack_rows([s[self.image_field] for s in samples])  # B x 3 x H x W
        if images.dtype == torch.uint8:
            if self.image_mean is None or self.image_std is None:
                raise ValueError("uint8 images need the collater's image_mean and image_std to be normalised")
            images = normalize_images(images, self.image_mean, self.image_std)
        texts = torch.stack([s[self.text_field] for s in samples])  # B x L
        return {
            "id": [s["__key__"] for s in samples],
            "nsentences": len(samples),
            "ntokens": int((texts != self.pad_id).sum()),
            "net_input": {"image": images, "text": texts},
        }


def compose(stages: List[Callable]) -> Callable:
    def run(sample):
        for stage in stages:
            sample = stage(sample)
        return sample

    return run


@dataclass
class MultiViewImage:
    """``sample["image"] = global_transform(img)`` and ``sample["image_views"] = [view_transform(img)] * A``
    (independent draws): the weak global view and A strong views of the improved CLIP recipe."""

    global_transform: Callable
    view_transform: Callable
    num_views: int = 2

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        image = sample["image"]
        sample["image"] = self.global_transform(image)
        sample["image_views"] = [self.view_transform(image) for _ in range(self.num_views)]
        return sample


@dataclass
class TokenizeViews:
    """``sample[out] = tokenizer.encode_batch(sample[field], context_length)``: (1 + A) x L token rows."""

    tokenizer: Any
    context_length: int
    field: str = "captions"
    out: str = "text_views"

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        sample[self.out] = self.tokenizer.encode_batch(list(sample[self.field]), self.context_length)
        return sample


@dataclass
class CollateMultiView(CollateImageText):
    """:class:`CollateImageText` plus the augmented views, view-major (view ``a`` of sample ``b`` at ``[a, b]``)::

    net_input: {"image": B x 3 x H x W (global), "text": B x L (weak caption, row 0),
                "image_views": A x B x 3 x H x W, "text_views": A x B x L (strong captions)}
    """

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        rows = torch.stack([s["text_views"] for s in samples])  # B x (1+A) x L
        for s, r in zip(samples, rows):
            s[self.text_field] = r[0]
        batch = super().__call__(samples)
        batch["net_input"]["text_views"] = rows[:, 1:].transpose(0, 1).contiguous()  # A x B x L
        batch["net_input"]["image_views"] = torch.stack(
            [torch.stack(views) for views in zip(*(s["image_views"] for s in samples))]
        )  # A x B x 3 x H x W
        return batch
