"""The language-model loss of Kosmos-2 (Peng et al. 2023, "Kosmos-2: Grounding Multimodal Large Language Models to
the World"; reference criterion ``unigpt``, ``microsoft/unilm`` ``kosmos-2/unilm/criterions/unigpt.py``).
No fairseq import."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import full_precision


@full_precision
def masked_token_nll(lm_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``-log p(target)`` (B x T, float32 log-softmax), zero where ``mask`` is
    False. Sum it and divide by ``mask.sum()`` for the token-mean NLL of the Kosmos-2 criterion."""
    if lm_logits.shape[:2] != target.shape or target.shape != mask.shape:
        raise ValueError(
            f"logits {tuple(lm_logits.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must agree on B x T"
        )
    lprobs = F.log_softmax(lm_logits.float(), dim=-1)  # B x T x V
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # B x T
    return nll.masked_fill(~mask, 0.0)
