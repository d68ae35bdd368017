"""What every image-text benchmark needs from a model: an encoder with a fixed small interface.

``load_encoder(checkpoint)`` restores a trained unilm_vl checkpoint (any contrastive model) as an
:class:`ImageTextEncoder`; benchmark code depends only on this protocol, so it can be tested with a fake encoder.
"""
from __future__ import annotations

from typing import Callable, List, Protocol

import torch
from PIL import Image


class ImageTextEncoder(Protocol):
    image_transform: Callable[[Image.Image], torch.Tensor]
    """PIL RGB image -> 3 x H x W tensor (the evaluation transform: resize short side, centre crop, normalise)."""

    logit_scale: float
    """exp(learned logit scale); similarity logits are ``logit_scale * image @ text.T``."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x D, L2-normalised."""

    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        """B strings -> B x D, L2-normalised."""
