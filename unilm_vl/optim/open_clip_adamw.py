"""Optimizer ``open_clip_adamw``: ``torch.optim.AdamW`` with open_clip's weight-decay exclusion.

open_clip (and the COSMOS / FSC-CLIP / clip-rocket training scripts built on it: mlfoundations/open_clip
``src/open_clip_train/main.py``, ExplainableML/cosmos ``src/main.py``, facebookresearch/clip-rocket ``main.py``)
decays only the weight matrices: parameters with ``ndim < 2`` or whose name contains ``bn``, ``ln``, ``bias`` or
``logit_scale`` (gains, biases, class embeddings, every learnable temperature) get no weight decay. fairseq's ``adam``
decays every parameter, so ``--weight-decay 0.5`` there also pulls the logit scale and the LayerNorm gains towards 0.
Parameter names come from the tasks, which tag every parameter of the model and the criterion with its name when they
build them (:func:`tag_parameter_names`); an untagged parameter falls back to the ``ndim < 2`` part of the rule.
Written here because fairseq's optimizers take a flat parameter list without names. Flat parameters are not supported
(one flattened 1-D vector would fall entirely under ``ndim < 2``): with ``--fp16`` fairseq then asks for
``--fp16-no-flatten-grads``, whose fp32 copies carry no names, so only the ``ndim < 2`` part applies there; ``--amp``
and ``--memory-efficient-fp16`` keep the named parameters.
"""

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Iterable, List

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

logger = logging.getLogger(__name__)

NAME_ATTR = "unilm_vl_name"
"""Attribute under which :func:`tag_parameter_names` stores a parameter's qualified name."""


def tag_parameter_names(module: torch.nn.Module, prefix: str = "") -> None:
    """Store each parameter's qualified name on the parameter (shared parameters keep their first name)."""
    for name, param in module.named_parameters():
        if not hasattr(param, NAME_ATTR):
            setattr(param, NAME_ATTR, prefix + name)


def excluded_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: no weight decay for ``ndim < 2`` or names containing ``bn``/``ln``/``bias``/``logit_scale``
    (so ``distill_logit_scale`` too)."""
    return param.ndim < 2 or any(key in name for key in ("bn", "ln", "bias", "logit_scale"))


def weight_decay_groups(params: Iterable[torch.Tensor], exclude: bool = True) -> List[dict]:
    """``[{"params": decayed}, {"params": excluded, "weight_decay": 0.0}]`` (empty groups dropped)."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if exclude and excluded_from_weight_decay(getattr(p, NAME_ATTR, ""), p) else decay).append(p)
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


@dataclass
class OpenClipAdamWConfig(FairseqDataclass):
    adam_betas: str = field(
        default="(0.9, 0.98)", metadata={"help": "AdamW betas (open_clip's ViT defaults: 0.9, 0.98)"}
    )
    adam_eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon (open_clip's ViT default 1e-6)"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "decoupled weight decay of the weight matrices (the excluded parameters get none)"},
    )
    wd_exclude: ChoiceEnum(["open_clip", "none"]) = field(
        default="open_clip",
        metadata={
            "help": "open_clip: no weight decay for ndim<2 / bn / ln / bias / logit_scale parameters; none: decay all "
            "(fairseq adam's behaviour)"
        },
    )
    lr: List[float] = field(default=II("optimization.lr"), metadata={"help": "learning rate (fairseq's --lr)"})


@register_optimizer("open_clip_adamw", dataclass=OpenClipAdamWConfig)
class OpenClipAdamW(FairseqOptimizer):
    def __init__(self, cfg: OpenClipAdamWConfig, params):
        super().__init__(cfg)
        groups = weight_decay_groups(params, exclude=str(cfg.wd_exclude) == "open_clip")
        if not groups:
            raise ValueError("open_clip_adamw: no trainable parameters")
        sizes = [sum(p.numel() for p in g["params"]) for g in groups]
        logger.info(
            "open_clip_adamw: %s",
            ", ".join(
                f"{'no ' if 'weight_decay' in g else ''}weight decay on {len(g['params'])} tensors ({n} values)"
                for g, n in zip(groups, sizes)
            ),
        )
        self._optimizer = torch.optim.AdamW(groups, **self.optimizer_config)

    @property
    def optimizer_config(self):
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        betas = (
            eval(self.cfg.adam_betas)
            if isinstance(self.cfg.adam_betas, str)
            else OmegaConf.to_container(self.cfg.adam_betas)
        )
        return {"lr": lr, "betas": tuple(betas), "eps": self.cfg.adam_eps, "weight_decay": self.cfg.weight_decay}
