"""Task ``kosmos2``: grounded image-caption language modelling of Kosmos-2 (Peng et al. 2023, "Kosmos-2:
Grounding Multimodal Large Language Models to the World"; reference task ``image_gpt_interleaved_laion_obj`` with
the GRIT loader, notes kosmos2.md sections 2-5).

Data: GRIT-style samples from any source of the data layer (the GRIT TSV layout with its annotation column,
img2dataset webdataset shards whose json holds ``noun_chunks``/``ref_exps``, the synthetic world), mixed by weight
through a json source config. Each sample becomes ``<s> <image> [L image slots] </image> caption </s>`` where the
caption is grounded (``<grounding> ... <phrase> ..</phrase><object><patch_index_UL><patch_index_LR></object>``)
with probability ``--use-object-bbox-prob`` when it has boxes (:mod:`unilm_vl.data.kosmos2_samples`).
Vocabulary: sentencepiece + fairseq ``dict.txt`` (``--spm-model``, ``--dict-path``: the released files, or those
of ``python -m unilm_vl.data.build_vocab``) plus the grounding symbols for a ``--location-bin-size`` grid.

Batch: ``net_input = {src_tokens B x T, image B_img x 3 x S x S, image_mask B x T}``, ``target``, ``loss_mask``;
criterion ``kosmos2_lm``; model ``kosmos2``.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from ..data.decode import BadSample
from ..data.grounding import DEFAULT_NUM_BINS, build_kosmos2_tokenizer
from ..data.kosmos2_samples import CollateKosmos2, GritGroundedCaption
from ..data.stages import FramesToImage, ImageTransform
from ..data.transforms import kosmos2_image_transform
from ._base import StreamDataConfig, StreamTaskBase

logger = logging.getLogger(__name__)


@dataclass
class Kosmos2Config(StreamDataConfig):
    spm_model: Optional[str] = field(default=None, metadata={
        "help": "sentencepiece model (the released sentencepiece.bpe.model, or one from unilm_vl.data.build_vocab)"})
    dict_path: Optional[str] = field(default=None, metadata={
        "help": "fairseq dict.txt matching --spm-model (index = sentencepiece id + 1)"})
    location_bin_size: int = field(default=DEFAULT_NUM_BINS, metadata={
        "help": "P: boxes are coded on a P x P grid of <patch_index_k> tokens (the released checkpoint: 32)"})
    image_token_length: int = field(default=64, metadata={
        "help": "image slots per sample; must equal the model's --latent-query-num"})
    phrase_mode: ChoiceEnum(["expression", "phrase"]) = field(default="expression", metadata={
        "help": "ground GRIT referring expressions (outermost spans; the release's train.sh) or noun chunks"})
    box_score_threshold: float = field(default=0.65, metadata={"help": "keep GRIT boxes with at least this score"})
    use_object_bbox_prob: float = field(default=0.5, metadata={
        "help": "probability that a sample with boxes trains as a grounded caption (else as its plain caption)"})
    drop_crop_threshold: float = field(default=0.2, metadata={
        "help": "drop a box that keeps less than this fraction of its area after the centre crop"})
    training_image_only_resize: bool = field(default=False, metadata={
        "help": "squash images to S x S instead of resize + centre crop (boxes are then kept as they are)"})
    box_encoder: ChoiceEnum(["release", "hf"]) = field(default="release", metadata={
        "help": "box -> patch-index encoder: the released training encoder or HF's (they differ for box edges "
                "exactly on grid lines; see unilm_vl.data.grounding.box_to_patch_indices)"})
    tokens_per_sample: int = field(default=2048, metadata={
        "help": "longest sequence; longer samples are skipped and counted"})


@register_task("kosmos2", dataclass=Kosmos2Config)
class Kosmos2Task(StreamTaskBase):
    cfg: Kosmos2Config

    def __init__(self, cfg: Kosmos2Config):
        super().__init__(cfg)
        if not cfg.spm_model or not cfg.dict_path:
            raise ValueError("the kosmos2 task needs --spm-model and --dict-path (the released vocabulary files, "
                             "or those written by `python -m unilm_vl.data.build_vocab`)")
        self.tokenizer = build_kosmos2_tokenizer(cfg.spm_model, cfg.dict_path, cfg.location_bin_size)
        self.dictionary = self.tokenizer.dictionary
        self.image_size: Optional[int] = None
        self.image_mean = self.image_std = None

    @classmethod
    def setup_task(cls, cfg: Kosmos2Config, **kwargs):
        return cls(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if model.num_image_tokens != self.cfg.image_token_length:
            raise ValueError(f"--image-token-length {self.cfg.image_token_length} must equal the model's "
                             f"{model.num_image_tokens} latent queries")
        self.image_size = model.image_size
        self.image_mean, self.image_std = model.image_mean, model.image_std
        return model

    def image_transform(self, train: bool = True):
        if self.image_size is None:
            raise RuntimeError("build the model before loading data: the image size comes from the model")
        return kosmos2_image_transform(self.image_size, self.image_mean, self.image_std,
                                       self.cfg.training_image_only_resize)

    def build_stages(self, split: str):
        cfg = self.cfg
        return [FramesToImage(),
                GritGroundedCaption(self.tokenizer, mode=str(cfg.phrase_mode), num_bins=cfg.location_bin_size,
                                    score_threshold=cfg.box_score_threshold,
                                    use_object_bbox_prob=cfg.use_object_bbox_prob,
                                    center_crop=not cfg.training_image_only_resize, size=self.image_size,
                                    drop_threshold=cfg.drop_crop_threshold, box_encoder=str(cfg.box_encoder)),
                ImageTransform(self.image_transform()),
                SequenceLength(cfg.tokens_per_sample, cfg.image_token_length + 3)]

    def build_collater(self, split: str):
        d = self.dictionary
        return CollateKosmos2(bos_id=d.bos(), pad_id=d.pad(), image_id=d.index("<image>"),
                              image_end_id=d.index("</image>"), num_image_tokens=self.cfg.image_token_length)

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary


@dataclass
class SequenceLength:
    """Skip (counted) samples whose full sequence would exceed ``max_tokens``."""

    max_tokens: int
    prefix_tokens: int

    def __call__(self, sample):
        n = len(sample["tokens"]) + self.prefix_tokens
        if n > self.max_tokens:
            raise BadSample(f"sequence of {n} tokens exceeds --tokens-per-sample {self.max_tokens}",
                            sample.get("__where__", "?"), "caption")
        return sample
