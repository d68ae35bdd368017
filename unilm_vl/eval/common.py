"""What every image-text benchmark needs from a model: an encoder with a fixed small interface.

``load_encoder(checkpoint)`` restores a trained unilm_vl checkpoint (any contrastive model) as an
:class:`ImageTextEncoder` (through :func:`unilm_vl.checkpoint.load_model`, the loader of every tool); benchmark
code depends only on this protocol, so it can be tested with a fake encoder.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Protocol, Sequence

import torch
from PIL import Image

from unilm_vl.checkpoint import load_model


class ImageTextEncoder(Protocol):
    image_transform: Callable[[Image.Image], torch.Tensor]
    """PIL RGB image -> 3 x H x W tensor (the evaluation transform: resize short side, centre crop, normalise)."""

    logit_scale: float
    """exp(learned logit scale); similarity logits are ``logit_scale * image @ text.T``."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x D, L2-normalised."""

    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        """B strings -> B x D, L2-normalised."""


class DenseImageTextEncoder(ImageTextEncoder, Protocol):
    """An :class:`ImageTextEncoder` that also returns patch tokens (zero-shot segmentation needs them)."""

    image_size: int
    """Side of the square input the image tower takes."""

    image_mean: Sequence[float]
    image_std: Sequence[float]
    """Per-channel normalisation of the image tower's input (applied to RGB values in [0, 1])."""

    def encode_image_dense(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S (S = ``image_size``) -> projected, un-normalised patch tokens B x P x D, row-major over a
        square grid of sqrt(P) x sqrt(P) patches, in the space of the text embeddings."""


class FairseqContrastiveEncoder:
    """:class:`ImageTextEncoder` over a trained unilm_vl contrastive model and its task (tokenizer, transform)."""

    def __init__(self, model, task, device: str = "cpu", head: str = "clip"):
        if head not in ("clip", "l2l"):
            raise ValueError(f"head must be 'clip' or 'l2l', got {head!r}")
        if head == "l2l" and not getattr(model, "has_l2l_head", False):
            raise ValueError(f"{type(model).__name__} has no l2l head (a clip_rocket model with --separate-proj has)")
        self.model = model.to(device).eval()
        self.task = task
        self.device = torch.device(device)
        self.image_transform = task.image_transform(train=False)
        self.logit_scale = float(model.logit_scale_value())
        self._encode_image = model.encode_image_l2l if head == "l2l" else model.encode_image
        self._encode_text = model.encode_text_l2l if head == "l2l" else model.encode_text

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode_image(images.to(self.device)).float()

    @torch.no_grad()
    def encode_texts(self, texts: List[str]) -> torch.Tensor:
        tokens = self.task.tokenizer.encode_batch(list(texts), self.task.context_length)
        return self._encode_text(tokens.to(self.device)).float()

    @property
    def image_size(self) -> int:
        return int(self.task.image_size)

    @property
    def image_mean(self) -> Sequence[float]:
        return tuple(self.task.image_mean)

    @property
    def image_std(self) -> Sequence[float]:
        return tuple(self.task.image_std)

    dense_csa: bool = False
    """With True, :meth:`encode_image_dense` runs the towers' last block with correlative self-attention
    (:func:`unilm_vl.modules.clip.csa_last_block`, the reference's ``--use-csa``)."""

    @torch.no_grad()
    def encode_image_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens B x P x D of the model's ``encode_image_dense`` (which returns (pooled, tokens)); raises
        ``TypeError`` naming the model class when the model has no dense image output."""
        dense = getattr(self.model, "encode_image_dense", None)
        if dense is None:
            raise TypeError(
                f"{type(self.model).__name__} has no dense image output (encode_image_dense); zero-shot "
                "segmentation needs patch tokens, e.g. from a clip or cosmos model"
            )
        from unilm_vl.modules.clip import csa_last_block

        with csa_last_block(self.model) if self.dense_csa else contextlib.nullcontext():
            _, tokens = dense(images.to(self.device))  # B x D, B x P x D
        return tokens.float()


def load_encoder(checkpoint: str, device: str = "cpu", head: str = "clip") -> ImageTextEncoder:
    """An :class:`ImageTextEncoder` for a checkpoint of any contrastive unilm_vl model; ``head="l2l"`` encodes
    with a clip_rocket model's l2l heads instead of the CLIP projectors."""
    model, _, task = load_model(checkpoint, device=device)
    return FairseqContrastiveEncoder(model, task, device, head=head)


def add_common_eval_args(parser) -> None:
    """The options every benchmark CLI shares: the checkpoint, device, batch size, loader workers, output file."""
    parser.add_argument("--checkpoint", required=True, help="unilm_vl fairseq checkpoint (.pt)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts encoded per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for image decoding")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")


def write_metrics(metrics: dict, path: Optional[str]) -> None:
    """Write ``metrics`` as indented json when ``path`` is given."""
    if not path:
        return
    import json
    import logging

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    logging.getLogger(__name__).info("wrote %s", path)
