"""Task ``cosa_finetune``: COSA finetuning on frame datasets, ``--finetune-task retrieval | caption | qa``
(COSA, Chen et al. 2023; TXH-mercury/COSA ``data/data.py``, ``scripts/finetune_*.sh``, ``test.py``).

Data: annotation jsons in the released layout (:mod:`unilm_vl.data.cosa`; ``--train-data train.json
--valid-data test.json``, frames in ``--frames-root`` or ``frames/`` beside the json), image sources as 1-frame
clips. Frames as released: ``--num-frames`` segments (8 for video benchmarks), a random frame per segment in
training, the middle one in validation with ``--num-frames-test`` (8-32), padded with the last frame;
``--video-transforms crop_flip`` for the MSRVTT / MSVD-QA configs.

Sample format, retrieval and caption (one text per video: a seeded random one of its ``desc`` list in training,
the first in validation; ``references`` keeps them all)::

    {"id", "nsentences", "ntokens", "raw_text", "references",
     "net_input": {"frames": B x T x 3 x H x W, "text_ids": B x L, "text_mask": B x L}}

QA adds ``net_input["question_ids" | "question_mask"]`` (B x L, equal to ``text_ids`` / ``text_mask``),
``net_input["answer_ids" | "answer_mask"]`` (B x 10: ``[CLS] answer [SEP]``, the released answer length),
``"answers"`` (all human answers of each question; training draws one of them for ``answer_ids``, as the
release's VQAv2 loader) and ``"question_id"``.

The losses of each finetuning task (ITC + itm_ratio x ITM, masked-causal captioning, prefix-causal QA) are the
``cosa`` criterion's; the benchmark scores come from :mod:`unilm_vl.eval.cosa_retrieval`,
:mod:`unilm_vl.eval.cosa_caption` and :mod:`unilm_vl.eval.cosa_qa`. Concatenation is off in finetuning (K = 1).
"""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from .cosa_pretrain import CosaPretrainConfig, CosaPretrainTask

FINETUNE_TASK_CHOICES = ChoiceEnum(["retrieval", "caption", "qa"])


@dataclass
class CosaFinetuneConfig(CosaPretrainConfig):
    finetune_task: FINETUNE_TASK_CHOICES = field(
        default="retrieval",
        metadata={
            "help": "retrieval (ITC + ITM), caption (masked-causal LM) or qa (answer generation); selects the batch "
            "layout here and the losses in the cosa criterion"
        },
    )
    num_frames: int = field(
        default=8,
        metadata={"help": "frames sampled per training clip (released video finetuning: 8; 4 for TGIF; images 1)"},
    )
    max_answer_tokens: int = field(
        default=10,
        metadata={"help": "answer row length for --finetune-task qa, [CLS] and [SEP] included (released: 10)"},
    )


@register_task("cosa_finetune", dataclass=CosaFinetuneConfig)
class CosaFinetuneTask(CosaPretrainTask):
    """COSA finetuning data (module docstring)."""

    cfg: CosaFinetuneConfig

    @property
    def qa(self) -> bool:
        return str(self.cfg.finetune_task) == "qa"

    @property
    def max_answer_tokens(self) -> int:
        return self.cfg.max_answer_tokens
