"""Image transforms. The CLIP family uses open_clip's own (``open_clip.image_transform``) so our numbers match
open_clip: training = RandomResizedCrop(scale=(s_min, 1)) bicubic; evaluation = resize shortest side + centre crop;
both normalised with the model's mean/std. :class:`ClipTrainView` is the same training view computed with less
work: the JPEG decoded at a reduced DCT scale where the crop allows it, crop + resize in one call, uint8 output
normalised per batch (:func:`normalize_images`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .decode import finish_image, is_deferred

JPEG_SCALES = (8, 4, 2)
"""The DCT scale reductions libjpeg decodes at (1/8, 1/4, 1/2), largest first."""


def clip_image_transform(image_size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                         scale_min: float = 0.9):
    import open_clip

    aug = open_clip.AugmentationCfg(scale=(scale_min, 1.0)) if train else None
    return open_clip.image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std), aug_cfg=aug)


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 else k + 1


def rocket_global_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """clip-rocket's weak global view: RandomResizedCrop(scale 0.5-1), bicubic, no flip or colour."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(), T.Normalize(mean, std)])


def rocket_view_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """clip-rocket's strong views: RandomResizedCrop(scale 0.08-1), colour jitter (p .8), grayscale (p .2), Gaussian
    blur sigma U(0.1, 2) (p .5; kernel ~10% of the side, odd), horizontal flip (p .5)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(_odd(0.1 * image_size), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(mean, std)])


def kosmos2_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                            only_resize: bool = False):
    """Kosmos-2's image view (train and eval alike, no augmentation): ``Resize(size)`` of the short side (bicubic)
    + ``CenterCrop(size)``, or with ``only_resize`` a squash to ``size x size`` (the release's
    ``--training-image-only-resize``); then ToTensor and normalisation. Box maths must match the choice
    (:func:`unilm_vl.data.kosmos2_samples.center_crop_box`)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    resize = ([T.Resize((image_size, image_size), interpolation=bicubic)] if only_resize
              else [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)])
    return T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])


def draft_reduction(crop_w: int, crop_h: int, size: int, scales: Sequence[int] = JPEG_SCALES) -> int:
    """The largest JPEG DCT reduction ``r`` (8, 4, 2, else 1) after which a ``crop_w x crop_h`` crop still has at
    least ``size`` pixels on each side, so the resize to ``size x size`` never upsamples."""
    return next((r for r in scales if min(crop_w, crop_h) >= size * r), 1)


@dataclass
class ClipTrainView:
    """open_clip's training view (``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic)``, RGB, ToTensor,
    Normalize) as a ``3 x size x size`` uint8 tensor; normalise it per batch with :func:`normalize_images` (or set
    ``mean``/``std`` to get the normalised float tensor here).

    The crop box is drawn by torchvision's ``RandomResizedCrop.get_params`` on the full image size, so it is the
    box open_clip's transform draws from the same random state. Without ``draft`` (or for an image that is already
    decoded, or when no reduction fits) the pixels are those of open_clip's transform: crop, then bicubic resize of
    the crop. With ``draft``, a JPEG left undecoded by ``decode_image(..., defer_jpeg=True)`` is decoded at the
    largest DCT reduction (1/2, 1/4, 1/8) that keeps the crop at least ``size`` pixels on each side
    (:func:`draft_reduction`), and the crop box, scaled to the reduced image, is resized in the same call
    (``Image.resize(box=...)``, so the crop is not copied). The DCT scaling replaces part of the bicubic
    downscaling, which changes pixels slightly: the bound measured on the real-size benchmark world is in
    ``benchmarks/README.md`` and tested in ``tests/test_data_speed.py``."""

    size: int
    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    draft: bool = True
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        reduction = draft_reduction(w, h, self.size) if self.draft and is_deferred(img) else 1
        if reduction > 1:
            width, height = img.size
            # libjpeg decodes at exactly 1/reduction: pixel k of the reduced image covers source pixels
            # [k * reduction, (k + 1) * reduction), the last one clipped (size ceil(width / reduction))
            img.draft("RGB", (width // reduction, height // reduction))
            if img.size != (-(-width // reduction), -(-height // reduction)):
                raise RuntimeError(f"JPEG draft gave {img.size} for {width}x{height} at 1/{reduction}")
            img = finish_image(img)
            k = 1.0 / reduction
            box = (left * k, top * k, (left + w) * k, (top + h) * k)
            out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        else:
            img = finish_image(img)
            out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)  # 3 x size x size uint8
        if self.mean is None:
            return pixels
        return normalize_images(pixels[None], self.mean, self.std)[0]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``... x 3 x H x W`` images -> float32 ``(x / 255 - mean) / std``, the operations of torchvision's
    ``ToTensor`` + ``Normalize`` in their order, so each element equals the per-sample result exactly."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return images.to(torch.float32).div_(255).sub_(m).div_(s)
