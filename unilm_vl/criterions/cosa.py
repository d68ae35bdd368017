"""Criterion ``cosa``: the objectives of COSA (Chen et al. 2023, "COSA: Concatenated Sample Pretrained
Vision-Language Foundation Model"; release ``TXH-mercury/COSA``, ``model/pretrain.py``).

Sample: the batches of the ``cosa_pretrain`` / ``cosa_finetune`` tasks (``net_input`` with ``frames`` B x T x 3 x
H x W, ``text_ids``/``text_mask`` B x L, for QA the question/answer ids and masks); model ``cosa``.

``--cosa-tasks`` is the release's task string, split on ``_``: ``ret`` (ITC + ITM), ``mlm``, ``cap``
(masked-causal captioning), ``qa`` run on the batch; ``cret``, ``cmlm``, ``ccap`` on the concatenated batch (K
samples joined, see the model). Terms, each logged with its pass suffix (``itc_loss_origin``,
``caption_loss_concatenated``, ...):

- ITC: ``0.5 [CE_0.1(v T_all^T / temp) + CE_0.1(t V_all^T / temp)]``, label smoothing 0.1, raw learnable temp
  (init 0.07), local rows against the gathered batch;
- ITM: ``itm_ratio * CE`` over 3n fused sequences (positives, ITC-guided hard-negative videos, hard-negative
  texts) with labels [1]*n + [0]*2n (n = B, or B // 3 in the concatenated pass);
- MLM (15%, 80/10/10), captioning (60% masked, predicted at the same position under the causal mask), QA (answer
  99% masked, prefix-causal mask): mean CE over the masked positions.

The loss is the plain sum of the logged terms (ITM already weighted). ``sample_size`` is 1 per rank: fairseq sums
the gradients over ranks and divides by the summed sample size, so the applied gradient is the mean over ranks
(the release sums over ranks under ``--checkpointing``); with ``--gather-gradient full`` (default) the ITC gradient
then equals that of one rank holding the whole global batch. ``--gather-gradient query`` detaches the gathered side
at every world size, one process included, as the release (always under torch.distributed) does; ``own`` keeps the
own rows live (table in :mod:`unilm_vl.losses.distributed`). Maths: :mod:`unilm_vl.losses.cosa`.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..losses.cosa import itc_loss, itm_loss, parse_cosa_tasks, token_loss
from ._gathering import GATHER_GRADIENT_CHOICES, GATHER_GRADIENT_HELP, resolve_gather_gradient

LOSS_NAMES = {"mlm": "mlm_loss", "cap": "caption_loss", "qa": "vqa_loss"}


@dataclass
class CosaCriterionConfig(FairseqDataclass):
    cosa_tasks: str = field(
        default="ret_cret_ccap_cmlm",
        metadata={
            "help": "objectives, '_'-separated: ret, mlm, cap, qa on the batch; cret, cmlm, ccap on the concatenated "
            "batch (release pretraining: ret_cret_ccap_cmlm; large: ret_ccap_cmlm; finetuning: ret, cap or qa)"
        },
    )
    itm_ratio: float = field(
        default=1.0, metadata={"help": "weight of the ITM terms (release: 1.0 pretraining, 0.1 retrieval finetuning)"}
    )
    itc_label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of both ITC cross-entropies"})
    gather_gradient: GATHER_GRADIENT_CHOICES = field(
        default="full",
        metadata={"help": GATHER_GRADIENT_HELP + " (the ITC features; query is the release's ddp_allgather)"},
    )
    itc_gather_gradient: Optional[ChoiceEnum(["full", "reference"])] = field(
        default=None, metadata={"help": "deprecated: use --gather-gradient full|query (reference = query)"}
    )


@register_criterion("cosa", dataclass=CosaCriterionConfig)
class CosaCriterion(FairseqCriterion):
    def __init__(self, cfg: CosaCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.origin, self.concatenated = parse_cosa_tasks(cfg.cosa_tasks)
        self.gather_gradient = resolve_gather_gradient(cfg, "cosa")

    def compute_losses(self, out) -> dict:
        """``{"<term>_loss_<origin|concatenated>": tensor}`` in task-string order (origin pass first)."""
        losses = {}
        for suffix, objectives in (("origin", self.origin), ("concatenated", self.concatenated)):
            res = out.get(suffix, {})
            for objective in objectives:
                if objective == "ret":
                    losses[f"itc_loss_{suffix}"] = itc_loss(
                        res["video_features"],
                        res["text_features"],
                        out["contra_temp"],
                        out["rank"],
                        out["world_size"],
                        self.cfg.itc_label_smoothing,
                        self.gather_gradient,
                        out.get("local_sizes"),
                    )
                    losses[f"itm_loss_{suffix}"] = itm_loss(res["itm_logits"], res["itm_labels"], self.cfg.itm_ratio)
                else:
                    name = {"mlm": "mlm", "cap": "caption", "qa": "qa"}[objective]
                    losses[f"{LOSS_NAMES[objective]}_{suffix}"] = token_loss(
                        res[f"{name}_logits"], res[f"{name}_labels"]
                    )
        return losses

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"], tasks=self.cfg.cosa_tasks)
        losses = self.compute_losses(out)
        loss = sum(losses.values())
        logging_output = {
            "loss": loss.detach().item(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": 1,
            "contra_temp": out["contra_temp"].detach().float().item(),
        }
        for name, value in losses.items():
            logging_output[name] = value.detach().item()
        return loss, 1, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Every term and the temperature are averaged over ranks (sample_size 1 each)."""
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs) or 1
        keys = set().union(*(log.keys() for log in logging_outputs)) if logging_outputs else set()
        for key in sorted(keys):
            if key == "loss" or "_loss_" in key or key == "contra_temp":
                metrics.log_scalar(
                    key, sum(log.get(key, 0) for log in logging_outputs) / sample_size, sample_size, round=4
                )

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
