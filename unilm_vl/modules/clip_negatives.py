"""The CLIP forward of hard-negative fine-tuning (NegCLIP, FSC-CLIP): positives and the existing hard-negative
captions go through the text tower in one batch (as the reference, up to (1+T) B captions), optionally with the
dense patch / token outputs the FSC-CLIP local loss needs (ytaek-oh/fsc-clip ``src/training/text_negatives/``,
``src/open_clip/model.py``).

Batch contract: ``neg_text`` (T*B) x L, type-major (row ``t*B + b`` = negative type t of sample b; missing ones are
all-padding rows), ``neg_mask`` (T*B,) 0/1. Only the rows with ``neg_mask = 1`` are encoded; the criterion puts
zeros where the others were (:func:`unilm_vl.losses.negatives.fill_missing`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .clip import ClipModule


def forward_with_negatives(
    towers: ClipModule,
    image: torch.Tensor,
    text: torch.Tensor,
    neg_text: Optional[torch.Tensor] = None,
    neg_mask: Optional[torch.Tensor] = None,
    return_dense_tokens: bool = False,
) -> Dict[str, torch.Tensor]:
    """``{"image_features", "text_features" (positives), "logit_scale"}`` plus, with negatives,
    ``"neg_text_features"`` (M x D, the M = neg_mask.sum() valid negatives in type-major order) and ``"neg_mask"``,
    and with ``return_dense_tokens`` ``"image_tokens"`` (B x P x D), ``"text_tokens"`` (B x L x D) and
    ``"neg_text_tokens"`` (M x L x D), all projected and un-normalised."""
    batch = text.shape[0]
    texts = text
    if neg_text is not None:
        if neg_mask is None:
            raise ValueError("net_input has neg_text but no neg_mask")
        if neg_text.shape[0] != neg_mask.shape[0] or neg_text.shape[0] % batch:
            raise ValueError(
                f"neg_text {tuple(neg_text.shape)} / neg_mask {tuple(neg_mask.shape)} must hold T x B "
                f"type-major rows for a batch of {batch}"
            )
        texts = torch.cat([text, neg_text[neg_mask > 0]], dim=0)  # (B + M) x L
    out: Dict[str, torch.Tensor] = {"logit_scale": towers.clip.logit_scale.exp()}
    if return_dense_tokens:
        out["image_features"], out["image_tokens"] = towers.encode_image_dense(image)  # B x D, B x P x D
        features, tokens = towers.encode_text_dense(texts)  # (B + M) x D, (B + M) x L x D
        out["text_tokens"] = tokens[:batch]
    else:
        out["image_features"] = towers.encode_image(image)  # B x D
        features = towers.encode_text(texts)  # (B + M) x D
    out["text_features"] = features[:batch]
    if neg_text is not None:
        out["neg_text_features"] = features[batch:]  # M x D
        out["neg_mask"] = neg_mask
        if return_dense_tokens:
            out["neg_text_tokens"] = tokens[batch:]  # M x L x D
    return out
