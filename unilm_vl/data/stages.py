"""Small picklable per-sample stages and collaters. Each stage maps a sample dict to a sample dict and may raise
:class:`~unilm_vl.data.decode.BadSample` to have the sample skipped and counted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch

from .decode import BadSample


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

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if self.field not in sample:
            raise BadSample(f"sample has no {self.field!r}", sample.get("__where__", "?"), self.field)
        sample[self.field] = self.transform(sample[self.field])
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
    """

    pad_id: int = 0
    image_field: str = "image"
    text_field: str = "text"

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        images = torch.stack([s[self.image_field] for s in samples])  # B x 3 x H x W
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
