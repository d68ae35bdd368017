"""Task ``image_text_contrastive``: image-caption pairs for CLIP-style training.

Sample format (after collation)::

    {"id": [keys], "nsentences": B, "ntokens": int,
     "net_input": {"image": B x 3 x H x W float, "text": B x L long}}

With ``--num-augs A > 0`` (the improved CLIP recipe of clip-rocket) training batches also carry
``net_input["image_views"]`` (A x B x 3 x H x W, strong augmentations) and ``net_input["text_views"]`` (A x B x L,
EDA-augmented captions); ``text`` is then the weak global caption view (stop-words dropped with
``--remove-stopwords-prob``). Validation batches stay plain.

With ``--use-imagecrop-aug`` (COSMOS) training batches are multi-crop, view-major: ``image`` G x B x 3 x S x S
(2 global crops), ``image_local`` N x B x 3 x s x s (``--local-crops-number`` crops of ``--local-crop-size``) and
``text`` K x B x L caption views (``--caption-sampling-mode textcrop``: 2 global + K-2 local text crops of the json
long caption); see :mod:`unilm_vl.data.multicrop`.

With ``--hard-negatives STYLE`` (NegCLIP / FSC-CLIP) train and valid batches also carry T negative captions per
sample, type-major: ``net_input["neg_text"]`` (T*B) x L (row t*B + b = type t of sample b, all pad id when that
negative does not exist) and ``net_input["neg_mask"]`` (T*B,) long 0/1; see :mod:`unilm_vl.data.hard_negatives`.

Any source of :mod:`unilm_vl.data` feeds it (TSV, img2dataset webdataset, frame folders via their middle frame,
weighted json mixtures). Image size and normalisation come from the built model; captions are tokenised with the
configured tokenizer (open_clip's BPE by default).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task

from ..data.hard_negatives import CollateHardNegatives, HardNegatives, Lexicon, TokenizeHardNegatives, parse_style
from ..data.multicrop import CAPTION_SAMPLING_MODES, CollateMultiCrop, multicrop_stages
from ..data.stages import (
    CollateImageText,
    CollateMultiView,
    FramesToImage,
    ImageTransform,
    MultiViewImage,
    Tokenize,
    TokenizeViews,
)
from ..data.text_augment import TextAugmentConfig, TextViews
from ..data.tokenizers import TokenizerConfig, build_tokenizer
from ..data.transforms import ClipTrainView, clip_image_transform, rocket_global_transform, rocket_view_transform
from ._base import ModelGeometry, StreamDataConfig, StreamTaskBase

logger = logging.getLogger(__name__)

CAPTION_SAMPLING_CHOICES = ChoiceEnum(list(CAPTION_SAMPLING_MODES))


@dataclass
class ImageTextContrastiveConfig(TokenizerConfig, StreamDataConfig):
    """The stream data options, the caption tokeniser's (:class:`TokenizerConfig`: ``--text-tokenizer``,
    ``--context-length`` ...) and the contrastive batches' own."""

    train_crop_scale_min: float = field(
        default=0.9,
        metadata={
            "help": "training RandomResizedCrop scale lower bound (open_clip default 0.9); 1.0 = resize + centre crop"
        },
    )
    full_jpeg_decode: bool = field(
        default=False,
        metadata={
            "help": "decode training JPEGs at full size, giving open_clip's training pixels exactly; by default a JPEG "
            "is decoded at the smallest DCT scale M/8 at which its crop keeps >= the image size on each side "
            "(faster; pixels differ slightly, see benchmarks/README.md)"
        },
    )
    num_augs: int = field(
        default=0,
        metadata={
            "help": "improved CLIP recipe (clip-rocket): A strong image and text views per training sample besides the "
            "weak global view (the reference uses 2); 0 = plain CLIP batches"
        },
    )
    text_augment: bool = field(
        default=False,
        metadata={
            "help": "apply one EDA op (synonym replacement / swap / deletion, weights .4/.4/.2) to "
            "each strong caption view"
        },
    )
    remove_stopwords_prob: float = field(
        default=0.8,
        metadata={"help": "probability of dropping English stop-words from each caption view (with --num-augs > 0)"},
    )
    clean_before_augment: bool = field(
        default=False,
        metadata={"help": "html-unescape, collapse whitespace and lowercase captions before augmenting them"},
    )
    synonym_lexicon: Optional[str] = field(
        default=None,
        metadata={
            "help": "synonym file for EDA synonym replacement, 'word<TAB>syn1,syn2' per line (no WordNet download)"
        },
    )
    hard_negatives: Optional[str] = field(
        default=None,
        metadata={
            "help": "hard-negative captions for NegCLIP / FSC-CLIP batches (net_input neg_text / "
            "neg_mask, type-major): "
            "negclip | replace | svlc | given | ngram_shuffle_1..5 | fsc-clip (= negclip,replace,"
            "ngram_shuffle_2) or a comma list; unset = none"
        },
    )
    negatives_lexicon: Optional[str] = field(
        default=None,
        metadata={
            "help": "extra word groups for --hard-negatives, 'category<TAB>word1,word2=weight,...' per line "
            "(categories: colour size material state shape noun action count relation adverb)"
        },
    )
    spacy_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "installed spaCy English model (e.g. en_core_web_sm) to parse captions for --hard-negatives "
            "instead of the built-in rule-based tagger; never downloaded"
        },
    )
    use_imagecrop_aug: bool = field(
        default=False,
        metadata={"help": "COSMOS multi-crop training batches: global + local image crops and caption views"},
    )
    global_crops_number: int = field(
        default=2, metadata={"help": "global image crops at the model's image size (COSMOS: must be 2)"}
    )
    local_crops_number: int = field(default=0, metadata={"help": "local image crops per sample (COSMOS recipes: 6)"})
    crop_scale: float = field(
        default=0.14,
        metadata={
            "help": "area split of the crops: global RandomResizedCrop scale (s, 1), local (0.05, s) "
            "(COSMOS recipes: 0.4)"
        },
    )
    local_crop_size: int = field(
        default=96,
        metadata={
            "help": "side of the local crops in pixels (a multiple of the ViT patch; reference 96 at 224 px globals)"
        },
    )
    caption_sampling_mode: CAPTION_SAMPLING_CHOICES = field(
        default="raw",
        metadata={
            "help": "caption views: raw (the caption only) or textcrop (2 global crops of 1-5 sentences + local "
            "one-sentence crops of the raw caption and the json long caption)"
        },
    )
    num_sampled_captions: int = field(
        default=0, metadata={"help": "caption views per sample with textcrop (COSMOS recipes: 8 = 2 global + 6 local)"}
    )
    long_caption_key: str = field(
        default="long_caption",
        metadata={
            "help": "comma-separated fields of the webdataset json holding the long caption (a string, split into "
            "sentences) or sentence lists, for textcrop"
        },
    )


@register_task("image_text_contrastive", dataclass=ImageTextContrastiveConfig)
class ImageTextContrastiveTask(StreamTaskBase):
    cfg: ImageTextContrastiveConfig

    def __init__(self, cfg: ImageTextContrastiveConfig):
        super().__init__(cfg)
        self.tokenizer = build_tokenizer(cfg)
        self.context_length: Optional[int] = cfg.context_length
        self.hard_negative_lexicon: Optional[Lexicon] = None
        if cfg.hard_negatives:
            parse_style(cfg.hard_negatives)
            if cfg.num_augs > 0 or getattr(cfg, "use_imagecrop_aug", False):
                raise ValueError(
                    "--hard-negatives needs plain image-text batches: it cannot be combined with "
                    "--num-augs > 0 or --use-imagecrop-aug"
                )
            self.hard_negative_lexicon = Lexicon.build(cfg.negatives_lexicon, cfg.spacy_model)
        elif cfg.negatives_lexicon or cfg.spacy_model:
            logger.warning("--negatives-lexicon / --spacy-model are ignored without --hard-negatives")

    @classmethod
    def setup_task(cls, cfg: ImageTextContrastiveConfig, **kwargs):
        return cls(cfg)

    def set_geometry(self, geometry: ModelGeometry) -> None:
        """The image geometry, and the text tower's context length unless ``--context-length`` sets a shorter one."""
        super().set_geometry(geometry)
        if self.context_length is None:
            self.context_length = geometry.context_length
        elif self.context_length > geometry.context_length:
            raise ValueError(
                f"--context-length {self.context_length} exceeds the text tower's {geometry.context_length} positions"
            )

    def image_transform(self, train: bool):
        self.require_geometry()
        return clip_image_transform(
            self.image_size, train, self.image_mean, self.image_std, self.cfg.train_crop_scale_min
        )

    def multiview(self, split: str) -> bool:
        return split == "train" and self.cfg.num_augs > 0

    def multicrop(self, split: str) -> bool:
        return split == "train" and self.cfg.use_imagecrop_aug

    def build_stages(self, split: str):
        if self.multicrop(split):
            cfg = self.cfg
            if cfg.num_augs > 0:
                raise ValueError("--use-imagecrop-aug (COSMOS multi-crop) cannot be combined with --num-augs > 0")
            return multicrop_stages(
                self.image_size,
                cfg.local_crop_size,
                self.image_mean,
                self.image_std,
                self.tokenizer,
                self.context_length,
                crop_scale=cfg.crop_scale,
                num_global=cfg.global_crops_number,
                num_local=cfg.local_crops_number,
                caption_mode=str(cfg.caption_sampling_mode),
                num_captions=cfg.num_sampled_captions,
                long_caption_keys=[k.strip() for k in cfg.long_caption_key.split(",") if k.strip()],
            )
        if self.multiview(split):
            size, mean, std = self.image_size, self.image_mean, self.image_std
            text_cfg = TextAugmentConfig(
                num_augs=self.cfg.num_augs,
                remove_stopwords_prob=self.cfg.remove_stopwords_prob,
                text_augment=self.cfg.text_augment,
                clean_before_augment=self.cfg.clean_before_augment,
                lexicon_path=self.cfg.synonym_lexicon,
            )
            return [
                FramesToImage(),
                MultiViewImage(
                    rocket_global_transform(size, mean, std), rocket_view_transform(size, mean, std), self.cfg.num_augs
                ),
                TextViews(text_cfg),
                TokenizeViews(self.tokenizer, self.context_length),
            ]
        image = self.train_view() if split == "train" else self.image_transform(train=False)
        return [
            FramesToImage(),
            ImageTransform(image),
            Tokenize(self.tokenizer, self.context_length),
        ] + self.hard_negative_stages()

    def train_view(self) -> ClipTrainView:
        """The plain training view: open_clip's training transform as uint8, normalised per batch by the collater;
        JPEGs decoded at a reduced DCT scale unless ``--full-jpeg-decode``."""
        self.require_geometry()
        return ClipTrainView(
            self.image_size, scale=(self.cfg.train_crop_scale_min, 1.0), draft=not self.cfg.full_jpeg_decode
        )

    def stream_options(self, split: str, batch_size: int) -> dict:
        """Plain training batches hand their JPEGs undecoded to :class:`ClipTrainView` (draft decoding)."""
        plain = split == "train" and not (self.multicrop(split) or self.multiview(split))
        return {"defer_jpeg": plain and not self.cfg.full_jpeg_decode}

    def hard_negative_stages(self) -> list:
        """Per-sample negative captions (seeded by the sample) and their token rows; empty without them."""
        if self.hard_negative_lexicon is None:
            return []
        return [
            HardNegatives(self.cfg.hard_negatives, self.hard_negative_lexicon),
            TokenizeHardNegatives(self.tokenizer, self.context_length),
        ]

    def build_collater(self, split: str):
        if self.multicrop(split):
            return CollateMultiCrop(pad_id=self.tokenizer.pad_id)
        if self.multiview(split):
            return CollateMultiView(pad_id=self.tokenizer.pad_id)
        norm = {"image_mean": self.image_mean, "image_std": self.image_std}  # uint8 training views -> normalised
        if self.hard_negative_lexicon is not None:
            return CollateHardNegatives(pad_id=self.tokenizer.pad_id, **norm)
        return CollateImageText(pad_id=self.tokenizer.pad_id, **norm)
