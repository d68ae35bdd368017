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
