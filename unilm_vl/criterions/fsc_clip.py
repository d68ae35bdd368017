"""Criterion ``fsc_clip``: Fine-grained Selective Calibrated CLIP (Oh et al., EMNLP 2024, "Preserving Multi-Modal
Capabilities of Pre-trained VLMs for Improving Vision-Linguistic Compositionality"; reference ``Local_HNLoss`` /
``Global_HNLoss`` in ``ytaek-oh/fsc-clip`` ``src/training/losses/loss.py``).

Sample: the contrastive task's batch plus, from ``--hard-negatives fsc-clip``, ``net_input["neg_text"]`` ((T*B) x L,
type-major: row ``t*B + b`` = negative type t of sample b; the fsc-clip style has T = 3) and ``net_input["neg_mask"]``
((T*B,) 0/1). Batches without them (validation) give the CLIP term only, the hard-negative terms logged as 0.

Loss ``L = clip_loss + neg_loss_weight * clip_neg_loss + local_neg_weight * local_neg_loss`` (each term logged
weighted, as the reference's loss dict; the total is their sum):

- ``clip_loss``: the symmetric CLIP loss on the B positives only (negatives take no part), gathered like the
  ``clip`` criterion;
- ``clip_neg_loss`` (``--apply-global-neg-loss``): per local sample, the (1+T)-way classification of
  ``s [<i,t>, <i,n_1>, ..., <i,n_T>]`` with the selective calibrated regularisation (SCR: focal modulation
  ``--focal-gamma`` with ``--neg-loss-name focal_loss``, negative-side label smoothing ``--neg-label-smoothing``
  calibrated per row); rows without a valid negative dropped;
- ``local_neg_loss`` (``--apply-local-neg-loss``, needs ``--return-dense-tokens``): the same SCR over the aggregated
  token-level scores ``sigma(I, X) = logsumexp_t s <v_t, x_t>``, ``v_t`` the patches regrouped by detached min-max
  normalised token->patch similarities (``--sim-normalizer``, ``--sim-sparsify``); SOT and padding excluded.

Maths: :mod:`unilm_vl.losses.negatives`. Reference quirks reproduced by default: missing negatives
are logit-0 / score-0 columns kept in the softmax (``--mask-missing-negatives`` drops them); tied token->patch
similarities give NaN (``--sim-eps`` > 0 fixes it). The reference gathers the CLIP term without gradient (ignoring
its ``--gather-with-grad``: 1/W of the full-batch gradient); here the ``clip`` criterion's ``--gather-gradient
full`` is the default and ``--gather-gradient own`` reproduces the reference. The reference's ``--local-loss`` is
broken (no label offset, no gradient through any slot); here it is exact in every mode. The HN terms are local.

Numeric defaults are the README recipe values (argparse defaults of the reference in brackets): neg-loss-weight
0.5 [1.0], local-neg-weight 0.2 [1.0], neg-loss-name focal_loss [cross_entropy], focal-gamma 2.0 [1.0],
neg-label-smoothing 0.02 [None = 0 here]. The three switches are off by default, as the reference's store-true
flags, and the recipe passes them (``--apply-global-neg-loss --apply-local-neg-loss --return-dense-tokens``).
"""

from dataclasses import dataclass, field
from typing import Dict

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum

from ..losses.clip import clip_loss
from ..losses.distributed import data_parallel_rank_world
from ..losses.negatives import dense_token_mask, fill_missing, global_hn_loss, local_hn_loss
from .clip import ClipCriterionConfig, ContrastiveCriterion, contrastive_logging_output


@dataclass
class FscClipCriterionConfig(ClipCriterionConfig):
    neg_loss_weight: float = field(
        default=0.5,
        metadata={
            "help": "lambda_g, weight of the global hard-negative loss (README recipes 0.5, CC3M 1.0; reference "
            "argparse default 1.0)"
        },
    )
    local_neg_weight: float = field(
        default=0.2,
        metadata={
            "help": "lambda_l, weight of the local hard-negative loss (README B/32 recipes 0.2, B/16 and L/14 0.5; "
            "reference argparse default 1.0)"
        },
    )
    neg_loss_name: ChoiceEnum(["cross_entropy", "focal_loss"]) = field(
        default="focal_loss",
        metadata={
            "help": "hard-negative loss: focal_loss (focal modulation with --focal-gamma) or cross_entropy (gamma 0); "
            "reference argparse default cross_entropy, README focal_loss"
        },
    )
    focal_gamma: float = field(
        default=2.0,
        metadata={
            "help": "focal exponent gamma of the hard-negative losses (README 2.0, reference argparse default 1.0)"
        },
    )
    neg_label_smoothing: float = field(
        default=0.02,
        metadata={
            "help": "calibrated negative-side label smoothing eps of the hard-negative losses (README 0.02; 0 = hard "
            "label, the reference's default None)"
        },
    )
    apply_global_neg_loss: bool = field(
        default=False, metadata={"help": "add the global hard-negative loss (every FSC-CLIP recipe passes it)"}
    )
    apply_local_neg_loss: bool = field(
        default=False,
        metadata={
            "help": "add the local (token-patch) hard-negative loss; needs --return-dense-tokens (every FSC-CLIP "
            "recipe passes both)"
        },
    )
    return_dense_tokens: bool = field(
        default=False,
        metadata={
            "help": "compute projected patch and token outputs in the training forward (needed by the local loss)"
        },
    )
    sim_normalizer: ChoiceEnum(["minmax", "softmax"]) = field(
        default="minmax",
        metadata={
            "help": "token->patch weights of the local loss: min-max normalised similarities (reference default) or "
            "their softmax over patches"
        },
    )
    sim_sparsify: bool = field(
        default=False,
        metadata={"help": "minmax only: zero the normalised token->patch similarities below 1/num_patches"},
    )
    sim_eps: float = field(
        default=0.0,
        metadata={
            "help": "0 reproduces the reference (NaN when a token's similarities to all patches are equal); > 0 clamps "
            "the min-max range to at least this and gives such tokens uniform patch weights"
        },
    )
    mask_missing_negatives: bool = field(
        default=False,
        metadata={
            "help": "drop missing hard negatives from the HN softmaxes; the reference keeps them with logit/score 0"
        },
    )


@register_criterion("fsc_clip", dataclass=FscClipCriterionConfig)
class FscClipCriterion(ContrastiveCriterion):
    def __init__(self, cfg: FscClipCriterionConfig, task):
        super().__init__(cfg, task)
        if cfg.apply_local_neg_loss and not cfg.return_dense_tokens:
            raise ValueError(
                "criterion fsc_clip: --apply-local-neg-loss needs --return-dense-tokens (the local loss "
                "works on the projected patch and token outputs)"
            )
        if cfg.sim_sparsify and str(cfg.sim_normalizer) != "minmax":
            raise ValueError("criterion fsc_clip: --sim-sparsify applies to --sim-normalizer minmax only")
        tokenizer = getattr(task, "tokenizer", None)
        self.pad_id = int(getattr(tokenizer, "pad_id", 0))
        self.gamma = float(cfg.focal_gamma) if str(cfg.neg_loss_name) == "focal_loss" else 0.0

    def hard_negative_losses(self, out: Dict[str, torch.Tensor], net_input) -> Dict[str, torch.Tensor]:
        """The weighted HN terms of one batch with negatives (``{"clip_neg_loss", "local_neg_loss"}``, as enabled)."""
        cfg, scale, neg_mask = self.cfg, out["logit_scale"], out["neg_mask"]
        losses = {}
        if cfg.apply_global_neg_loss:
            negatives = fill_missing(out["neg_text_features"], neg_mask)  # (T*B) x D
            losses["clip_neg_loss"] = cfg.neg_loss_weight * global_hn_loss(
                out["image_features"],
                out["text_features"],
                negatives,
                neg_mask,
                scale,
                self.gamma,
                cfg.neg_label_smoothing,
                cfg.mask_missing_negatives,
            )
        if cfg.apply_local_neg_loss:
            neg_text = net_input["neg_text"]
            neg_tokens = fill_missing(out["neg_text_tokens"], neg_mask)  # (T*B) x L x D
            losses["local_neg_loss"] = cfg.local_neg_weight * local_hn_loss(
                out["image_tokens"],
                out["text_tokens"],
                dense_token_mask(net_input["text"], self.pad_id),
                neg_tokens,
                dense_token_mask(neg_text, self.pad_id),
                neg_mask,
                scale,
                self.gamma,
                cfg.neg_label_smoothing,
                str(cfg.sim_normalizer),
                cfg.sim_sparsify,
                cfg.sim_eps,
                cfg.mask_missing_negatives,
            )
        return losses

    def forward(self, model, sample, reduce=True):
        net_input = sample["net_input"]
        has_negatives = "neg_text" in net_input
        dense = has_negatives and self.cfg.apply_local_neg_loss
        out = model(**net_input, return_dense_tokens=dense)
        rank, world = data_parallel_rank_world() if model.training else (0, 1)
        losses = clip_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            rank,
            world,
            self.cfg.local_loss,
            self.gather_gradient,
            label_smoothing=self.cfg.label_smoothing,
        )
        if has_negatives:
            losses.update(self.hard_negative_losses(out, net_input))
        else:  # validation batches: the enabled HN terms are 0
            zero = out["logit_scale"].new_zeros(())
            if self.cfg.apply_global_neg_loss:
                losses["clip_neg_loss"] = zero
            if self.cfg.apply_local_neg_loss:
                losses["local_neg_loss"] = zero
        loss = sum(losses.values())
        return loss, 1, contrastive_logging_output(loss, losses, out, sample)
