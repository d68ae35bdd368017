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

from .decode import BadSample, deferred_bytes, finish_image, is_deferred

JPEG_EIGHTHS = range(1, 9)
"""The DCT scales libjpeg-turbo decodes at: M/8 for M = 1..8 (simplejpeg exposes all of them; Pillow's ``draft``
only 1/8, 1/4 and 1/2)."""


def clip_image_transform(
    image_size: int, train: bool, mean: Sequence[float], std: Sequence[float], scale_min: float = 0.9
):
    import open_clip

    aug = open_clip.AugmentationCfg(scale=(scale_min, 1.0)) if train else None
    return open_clip.image_transform(image_size, is_train=train, mean=tuple(mean), std=tuple(std), aug_cfg=aug)


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 else k + 1


def rocket_global_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """clip-rocket's weak global view: RandomResizedCrop(scale 0.5-1), bicubic, no flip or colour."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def rocket_view_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """clip-rocket's strong views: RandomResizedCrop(scale 0.08-1), colour jitter (p .8), grayscale (p .2), Gaussian
    blur sigma U(0.1, 2) (p .5; kernel ~10% of the side, odd), horizontal flip (p .5)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(_odd(0.1 * image_size), sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def kosmos2_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], only_resize: bool = False):
    """Kosmos-2's image view (train and eval alike, no augmentation): ``Resize(size)`` of the short side (bicubic)
    + ``CenterCrop(size)``, or with ``only_resize`` a squash to ``size x size`` (the release's
    ``--training-image-only-resize``); then ToTensor and normalisation. Box maths must match the choice
    (:func:`unilm_vl.data.kosmos2_samples.center_crop_box`)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    resize = (
        [T.Resize((image_size, image_size), interpolation=bicubic)]
        if only_resize
        else [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    )
    return T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])


def draft_eighths(crop_w: int, crop_h: int, size: int) -> int:
    """The smallest JPEG DCT scale ``M``/8 (M = 1..8) at which a ``crop_w x crop_h`` crop still has at least
    ``size`` pixels on each side, so the resize to ``size x size`` never upsamples; 8 (full scale) when none is
    smaller."""
    return next((m for m in JPEG_EIGHTHS if min(crop_w, crop_h) * m >= size * 8), 8)


def decode_jpeg_eighths(data: bytes, width: int, height: int, eighths: int) -> Image.Image:
    """Decode JPEG ``data`` (``width x height``) at DCT scale ``eighths``/8 to an ``RGBX`` image (RGB plus a padding
    band: Pillow's own 4-byte pixel layout, so the decoded buffer is wrapped without a copy; resizing it gives the
    same R, G and B as resizing the RGB image) of ``ceil(width * eighths / 8) x ceil(height * eighths / 8)``: pixel
    ``k`` covers source pixels ``[8k / eighths, 8(k + 1) / eighths)``. Pillow's ``draft`` offers only 1/2, 1/4 and
    1/8; simplejpeg (a libjpeg-turbo binding) offers every eighth, and its full- and half-scale decodes are
    bit-identical to Pillow's (tested). ``ValueError`` on a corrupt file."""
    import simplejpeg

    min_w, min_h = -(-width * eighths // 8), -(-height * eighths // 8)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGBX", min_width=min_w, min_height=min_h)
    if pixels.shape[:2] != (min_h, min_w):
        raise RuntimeError(
            f"libjpeg-turbo gave {pixels.shape[1]}x{pixels.shape[0]} for {width}x{height} at "
            f"{eighths}/8, expected {min_w}x{min_h}"
        )
    return Image.frombuffer("RGBX", (min_w, min_h), pixels, "raw", "RGBX", 0, 1)


def image_planes(img: Image.Image) -> torch.Tensor:
    """An RGB (or RGBX) image as a contiguous ``3 x H x W`` uint8 tensor, one plane per colour band. A permuted view
    of the ``H x W x 3`` array costs the same here but makes every later stack and the per-batch normalisation a
    strided, unvectorised copy (measured in benchmarks/README.md)."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in img.split()[:3]]))


@dataclass
class ClipTrainView:
    """open_clip's training view (``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic)``, RGB, ToTensor,
    Normalize) as a ``3 x size x size`` uint8 tensor; normalise it per batch with :func:`normalize_images` (or set
    ``mean``/``std`` to get the normalised float tensor here).

    The crop box is drawn by torchvision's ``RandomResizedCrop.get_params`` on the full image size, so it is the
    box open_clip's transform draws from the same random state. Without ``draft`` (or for an image that is already
    decoded, or when no reduction fits) the pixels are those of open_clip's transform: crop, then bicubic resize of
    the crop. With ``draft``, an RGB or grayscale JPEG left undecoded by ``decode_image(..., defer_jpeg=True)`` is
    decoded at the smallest DCT scale M/8 that keeps the crop at least ``size`` pixels on each side
    (:func:`draft_eighths`, :func:`decode_jpeg_eighths`), and the crop box, scaled to the reduced image, is resized
    in the same call (``Image.resize(box=...)``, so the crop is not copied). The DCT scaling replaces part of the
    bicubic downscaling, which changes pixels slightly: the bound measured on the real-size benchmark world is in
    ``benchmarks/README.md`` and tested in ``tests/test_data_speed.py``."""

    size: int
    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    draft: bool = True
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    planes = staticmethod(image_planes)  # PIL RGB -> 3 x H x W uint8

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        eighths = draft_eighths(w, h, self.size) if self.draft and is_deferred(img) and img.mode in ("RGB", "L") else 8
        if eighths < 8:
            width, height = img.size
            try:
                img = decode_jpeg_eighths(deferred_bytes(img), width, height, eighths)
            except ValueError as exc:
                raise BadSample(f"undecodable image: {exc}") from None
            k = eighths / 8
            box = (left * k, top * k, (left + w) * k, (top + h) * k)
            out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        else:
            img = finish_image(img)
            out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        pixels = self.planes(out)
        if self.mean is None:
            return pixels
        return normalize_images(pixels[None], self.mean, self.std)[0]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``... x 3 x H x W`` images -> float32 ``(x / 255 - mean) / std``, the operations of torchvision's
    ``ToTensor`` + ``Normalize`` in their order, so each element equals the per-sample result exactly."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    # image by image: each image's 0.6 MB of floats is converted, divided, shifted and scaled while it is in the
    # cache, instead of four passes over the whole batch's memory (a batch of 50 at 224 px: 9.1 vs 11.2 ms with
    # the reader's sum, in the collating main process)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    planes = images.shape[-3:]
    for image, row in zip(images.reshape(-1, *planes), out.view(-1, *planes)):
        row.copy_(image).div_(255).sub_(m).div_(s)
    return out
