"""Image transforms. The CLIP family uses open_clip's own (``open_clip.image_transform``) so our numbers match
open_clip: training = RandomResizedCrop(scale=(s_min, 1)) bicubic; evaluation = resize shortest side + centre crop;
both normalised with the model's mean/std."""
from __future__ import annotations

from typing import Sequence

import open_clip


def clip_image_transform(image_size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                         scale_min: float = 0.9):
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
