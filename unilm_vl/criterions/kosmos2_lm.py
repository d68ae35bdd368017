"""Criterion ``kosmos2_lm``: token-mean negative log-likelihood of the caption tokens of Kosmos-2 (Peng et al.
2023, "Kosmos-2: Grounding Multimodal Large Language Models to the World"; reference criterion ``unigpt``,
``microsoft/unilm`` ``kosmos-2/unilm/criterions/unigpt.py``). Maths: :func:`unilm_vl.losses.kosmos2.masked_token_nll`.

Sample: the ``kosmos2`` task's batch (``src_tokens``, ``image``, ``image_mask``, ``target``, ``loss_mask``). The
loss is summed over the positions where ``loss_mask`` is set and the target is not padding: the caption tokens
(``<grounding>``, words, phrase/object/patch-index tokens and ``</s>``), never ``<image>``, the image placeholders
nor the prediction of ``</image>``; text-only rows count every token. ``sample_size`` is that token count, so
fairseq's division gives the token mean over all ranks and micro-batches of an update.

Logged, in bits per token as fairseq's language-model criteria: ``loss`` and, per data source, ``<source>_loss``
over that source's own caption tokens (the reference divided by all tokens, image placeholders included).
"""

import math
from collections import defaultdict
from dataclasses import dataclass

from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..losses.kosmos2 import masked_token_nll


@dataclass
class Kosmos2LmCriterionConfig(FairseqDataclass):
    pass


@register_criterion("kosmos2_lm", dataclass=Kosmos2LmCriterionConfig)
class Kosmos2LmCriterion(FairseqCriterion):
    def __init__(self, cfg: Kosmos2LmCriterionConfig, task):
        super().__init__(task)
        self.pad_id = task.target_dictionary.pad()

    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        target = sample["target"]
        mask = sample["loss_mask"] & target.ne(self.pad_id)
        nll = masked_token_nll(out["lm_logits"], target, mask)  # B x T
        loss = nll.sum()
        sample_size = int(mask.sum())
        logging_output = {
            "loss": loss.detach().item(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        per_row_loss, per_row_tokens = nll.detach().sum(1).tolist(), mask.sum(1).tolist()
        by_source = defaultdict(lambda: [0.0, 0])
        for source, row_loss, row_tokens in zip(sample.get("source", []), per_row_loss, per_row_tokens):
            by_source[source][0] += row_loss
            by_source[source][1] += row_tokens
        for source, (src_loss, src_tokens) in by_source.items():
            logging_output[f"src:{source}:loss"] = src_loss
            logging_output[f"src:{source}:tokens"] = src_tokens
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        sources = sorted({key.split(":")[1] for log in logging_outputs for key in log if key.startswith("src:")})
        for source in sources:
            tokens = sum(log.get(f"src:{source}:tokens", 0) for log in logging_outputs)
            if tokens:
                src_loss = sum(log.get(f"src:{source}:loss", 0) for log in logging_outputs)
                metrics.log_scalar(f"{source}_loss", src_loss / tokens / math.log(2), tokens, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # per-source keys differ between batches: gather the dicts instead of summing fixed-key tensors
        return False
