"""Task ``cosa_pretrain``: COSA pretraining data, image-text and video-text sources mixed by ratio (COSA, Chen et al.
2023, "COSA: Concatenated Sample Pretrained Vision-Language Foundation Model"; TXH-mercury/COSA ``model/pretrain.py``,
``data/``).

Sample format (after collation; :mod:`unilm_vl.data.cosa`)::

    {"id": [keys], "nsentences": B, "ntokens": int, "raw_text": [caption], "references": [[captions]],
     "net_input": {"frames": B x T x 3 x H x W float (normalised), "text_ids": B x L long,
                   "text_mask": B x L long (1 = real token)}}

Text is WordPiece ``[CLS] ... [SEP]`` padded with ``[PAD]`` to ``L = --max-text-tokens`` (40 as released).
Images are 1-frame clips; video clips give ``--num-frames`` frames (1 in the released pretraining: a WebVid
clip contributes one random frame, like an image), sampled as released: the frame list is split into
``num_frames`` segments, a random frame per segment in training and the middle one in validation, padded with the
last frame when the clip is shorter. The concatenation of samples into pseudo-videos (K = 4 as released) is done
by the model / criterion ``cosa`` on these batches, not here.

Mixing (the release's ``train_utils.py``, ``data/loader.py``): the release picks one dataset per step with probability
proportional to its ratio. Give the sources as a json mixture config (``--train-data mix.json``, a list of
``{"source", "name", "weight", "kind"?, "frames_root"?}``, weights = ratios); by default each weighted draw yields a
whole batch of one source, the release's homogeneous steps. Differences: each rank and loader worker draws its own
source (the release broadcasts rank 0's choice), and a skipped bad sample lets one batch take its last samples from
the next draw. ``--no-mix-per-batch`` mixes per sample.

Bad input: a missing or empty video directory, an entry without ``video_id`` or text, or an unreadable frame is a
counted skip whose first occurrence (and every ``--bad-sample-log-every``-th) is logged with the path.

Vocabulary: ``--vocab-file`` is a BERT ``vocab.txt`` (bert-base-uncased as released, from a local path) or one
written by ``python -m unilm_vl.data.cosa build-vocab`` for the synthetic world.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from ..data.cosa import MAX_ANSWER_TOKENS, ClipTransformFn, CollateCosa, CosaFramesDecoder, cosa_stages
from ..data.tokenizers import WordPieceTokenizer
from ._base import StreamDataConfig, StreamTaskBase

logger = logging.getLogger(__name__)

VIDEO_TRANSFORM_CHOICES = ChoiceEnum(["none", "crop_flip"])


@dataclass
class CosaPretrainConfig(StreamDataConfig):
    vocab_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "WordPiece vocab.txt: bert-base-uncased's (a local copy) or one from "
            "'python -m unilm_vl.data.cosa build-vocab'"
        },
    )
    cased: bool = field(
        default=False,
        metadata={
            "help": "keep case and accents (default: lowercase and strip accents before WordPiece, "
            "as bert-base-uncased)"
        },
    )
    max_text_tokens: int = field(
        default=40,
        metadata={
            "help": "tokens per caption / question row, [CLS] and [SEP] included (released: 40; concatenated "
            "paragraphs use max_text_tokens * ceil(K/2))"
        },
    )
    num_frames: int = field(
        default=1,
        metadata={"help": "frames sampled per training clip (released pretraining: 1; images are always 1 frame)"},
    )
    num_frames_test: Optional[int] = field(
        default=None, metadata={"help": "frames per clip in validation / evaluation (default: --num-frames)"}
    )
    video_transforms: VIDEO_TRANSFORM_CHOICES = field(
        default="none",
        metadata={
            "help": "none: squash-resize to R x R (released default); crop_flip: RandomResizedCrop(0.8-1, square) + "
            "flip in training, resize short side + centre crop in test"
        },
    )
    no_mix_per_batch: bool = field(
        default=False,
        metadata={
            "help": "draw the source of every sample by weight instead of once per batch (the released per-step "
            "dataset choice)"
        },
    )


@register_task("cosa_pretrain", dataclass=CosaPretrainConfig)
class CosaPretrainTask(StreamTaskBase):
    """COSA pretraining data (module docstring). ``tokenizer`` is a :class:`WordPieceTokenizer`; ``image_size``,
    ``image_mean`` and ``image_std`` come from the model (:meth:`StreamTaskBase.set_geometry`)."""

    cfg: CosaPretrainConfig
    qa = False

    def __init__(self, cfg: CosaPretrainConfig):
        super().__init__(cfg)
        if not cfg.vocab_file:
            raise FileNotFoundError(
                "--vocab-file is required: a WordPiece vocab.txt (bert-base-uncased, or one "
                "from 'python -m unilm_vl.data.cosa build-vocab')"
            )
        if cfg.max_text_tokens < 2:
            raise ValueError(f"--max-text-tokens must hold at least [CLS] and [SEP], got {cfg.max_text_tokens}")
        if cfg.num_frames < 1 or (cfg.num_frames_test is not None and cfg.num_frames_test < 1):
            raise ValueError("--num-frames and --num-frames-test must be positive")
        self.tokenizer = WordPieceTokenizer(cfg.vocab_file, lowercase=not cfg.cased, context_length=cfg.max_text_tokens)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        return cls(cfg)

    @property
    def num_frames_test(self) -> int:
        return self.cfg.num_frames_test or self.cfg.num_frames

    @property
    def max_answer_tokens(self) -> int:
        return MAX_ANSWER_TOKENS

    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        super().load_dataset(split, combine, epoch, **kwargs)
        for spec in self.datasets[split]:
            if spec.kind == "frames":  # list frame paths only; SampleFrames decodes the sampled ones
                spec.extra["decoder"] = CosaFramesDecoder()

    def clip_transform(self, train: bool) -> ClipTransformFn:
        self.require_geometry()
        return ClipTransformFn(self.image_size, self.image_mean, self.image_std, str(self.cfg.video_transforms), train)

    def build_stages(self, split: str):
        train = split == "train"
        return cosa_stages(
            self.tokenizer,
            self.cfg.max_text_tokens,
            self.cfg.num_frames if train else self.num_frames_test,
            train,
            self.clip_transform(train),
            qa=self.qa,
            answer_length=self.max_answer_tokens,
        )

    def build_collater(self, split: str):
        return CollateCosa(pad_id=self.tokenizer.pad_id, qa=self.qa)

    def stream_options(self, split: str, batch_size: int) -> dict:
        return {"mix_block": batch_size if split == "train" and not self.cfg.no_mix_per_batch else 1}
