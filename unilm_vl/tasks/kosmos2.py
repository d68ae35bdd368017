"""Task ``kosmos2``: grounded image-caption language modelling of Kosmos-2 (Peng et al. 2023, "Kosmos-2:
Grounding Multimodal Large Language Models to the World"; reference task ``image_gpt_interleaved_laion_obj`` with
the GRIT loader: microsoft/unilm ``kosmos-2/unilm/tasks/gpt_interleaved_laion_obj.py`` and
``kosmos-2/unilm/data/vl/laion2b_obj_loader.py``).

Data: GRIT-style samples from any source of the data layer (the GRIT TSV layout with its annotation column,
img2dataset webdataset shards whose json holds ``noun_chunks``/``ref_exps``, the synthetic world), mixed by weight
through a json source config. Each sample becomes ``<s> <image> [L image slots] </image> caption </s>`` (every
slot holds the ``<image>`` id, as in the released training loader) where the caption is grounded
(``<grounding> ... <phrase> ..</phrase><object><patch_index_UL><patch_index_LR></object>``) with probability
``--use-object-bbox-prob`` when it has boxes (:mod:`unilm_vl.data.kosmos2_samples`).
Vocabulary: sentencepiece + fairseq ``dict.txt`` (``--spm-model``, ``--dict-path``: the released files, or those
of ``python -m unilm_vl.data.build_vocab``) plus the grounding symbols for a ``--location-bin-size`` grid.

Batch: ``net_input = {src_tokens B x T, image B_img x 3 x S x S, image_mask B x T}``, ``target``, ``loss_mask``;
criterion ``kosmos2_lm``; model ``kosmos2``.

Generation (``fairseq-generate``; the prompt reading, prompt dataset and generator are
:mod:`unilm_vl.inference.kosmos2`, shared with :mod:`unilm_vl.kosmos2_infer`): ``--prompts FILE`` is a TSV of
``image_path<TAB>prompt`` lines (image paths relative to the file's directory), read as any ``--gen-subset`` other
than ``train``/``valid``. Each line becomes ``<s> <image> [L image slots] </image> prompt_ids`` (no ``</s>``; the
prompt may hold tags: ``<grounding>An image of``); the slots hold the ids 4 .. L+3 as in the released inference
and HF's processor (:func:`~unilm_vl.inference.kosmos2.generation_slot_ids`), which only
``--no-repeat-ngram-size`` sees. Batches are LEFT-padded, and ``build_generator`` returns a
:class:`~unilm_vl.inference.kosmos2.Kosmos2Generator` (greedy / beam / sampling with a KV cache,
:mod:`unilm_vl.modules.generation`). A missing image is an error naming the file and line; so is a line without a
tab or without an image path (no text-only generation). Images are squashed to S x S by default as the released
inference does (``--gen-image-view``)::

    fairseq-generate DIR --user-dir unilm_vl --task kosmos2 --path ckpt.pt --spm-model M --dict-path D \
        --prompts prompts.tsv --gen-subset test --batch-size 8 --beam 1 --no-repeat-ngram-size 3 \
        --max-len-b 500 --post-process sentencepiece
    # H-<id> <score> <grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>...</object>.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask, register_task

from ..data.decode import BadSample
from ..data.grounding import DEFAULT_NUM_BINS, build_kosmos2_tokenizer
from ..data.kosmos2_samples import CollateKosmos2, GritGroundedCaption
from ..data.stages import FramesToImage, ImageTransform
from ..data.transforms import kosmos2_image_transform
from ..inference import kosmos2 as inference
from ..inference.kosmos2 import Kosmos2Generator, Kosmos2PromptDataset, PromptLine, read_prompt_file
from ..modules.generation import SearchConfig
from ._base import ModelGeometry, StreamDataConfig, StreamTaskBase

logger = logging.getLogger(__name__)


@dataclass
class Kosmos2Config(StreamDataConfig):
    spm_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "sentencepiece model (the released sentencepiece.bpe.model, or one from unilm_vl.data.build_vocab)"
        },
    )
    dict_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "fairseq dict.txt matching --spm-model (index = sentencepiece id + 1); default: derived from "
            "--spm-model (its pieces but <unk> <s> </s>, in id order: the released dict.txt for the released "
            "model; `python -m unilm_vl.convert kosmos2 --write-dict` writes it)"
        },
    )
    location_bin_size: int = field(
        default=DEFAULT_NUM_BINS,
        metadata={"help": "P: boxes are coded on a P x P grid of <patch_index_k> tokens (the released checkpoint: 32)"},
    )
    image_token_length: int = field(
        default=64, metadata={"help": "image slots per sample; must equal the model's --latent-query-num"}
    )
    phrase_mode: ChoiceEnum(["expression", "phrase"]) = field(
        default="expression",
        metadata={"help": "ground GRIT referring expressions (outermost spans; the release's train.sh) or noun chunks"},
    )
    box_score_threshold: float = field(default=0.65, metadata={"help": "keep GRIT boxes with at least this score"})
    use_object_bbox_prob: float = field(
        default=0.5,
        metadata={
            "help": "probability that a sample with boxes trains as a grounded caption (else as its plain caption)"
        },
    )
    drop_crop_threshold: float = field(
        default=0.2,
        metadata={"help": "drop a box that keeps less than this fraction of its area after the centre crop"},
    )
    training_image_only_resize: bool = field(
        default=False,
        metadata={"help": "squash images to S x S instead of resize + centre crop (boxes are then kept as they are)"},
    )
    box_encoder: ChoiceEnum(["release", "hf"]) = field(
        default="release",
        metadata={
            "help": "box -> patch-index encoder: the released training encoder or HF's (they differ for box edges "
            "exactly on grid lines; see unilm_vl.data.grounding.box_to_patch_indices)"
        },
    )
    tokens_per_sample: int = field(
        default=2048, metadata={"help": "longest sequence; longer samples are skipped and counted"}
    )
    prompts: Optional[str] = field(
        default=None,
        metadata={
            "help": "generation: TSV of image_path<TAB>prompt lines (relative to --data; image paths relative to the "
            "file's directory), read as any --gen-subset other than train/valid"
        },
    )
    gen_image_view: ChoiceEnum(["squash", "crop"]) = field(
        default="squash",
        metadata={
            "help": "generation: squash images to S x S (the released inference; boxes cover the whole image) or "
            "resize + centre-crop as in training (boxes refer to the central square)"
        },
    )
    gen_continuation_only: bool = field(
        default=False,
        metadata={
            "help": "generation: hypotheses hold only the generated tokens (default: the prompt text after </image> "
            "followed by them, so phrases given in the prompt stay attached to their boxes)"
        },
    )
    gen_beam_rule: ChoiceEnum(["fairseq", "hf"]) = field(
        default="fairseq",
        metadata={
            "help": "generation: how beam search ends and ranks its hypotheses: fairseq's (</s> forced and scored at "
            "the length limit; the release decodes with it) or HF transformers' generate (no forced </s>, its "
            "early-stopping heuristic; HF's max_new_tokens = --max-len-b + 1); see "
            "unilm_vl.modules.generation"
        },
    )


@register_task("kosmos2", dataclass=Kosmos2Config)
class Kosmos2Task(StreamTaskBase):
    cfg: Kosmos2Config

    def __init__(self, cfg: Kosmos2Config):
        super().__init__(cfg)
        if not cfg.spm_model:
            raise ValueError(
                "the kosmos2 task needs --spm-model (and --dict-path, or the dictionary is derived from "
                "it): the released vocabulary files, or those written by "
                "`python -m unilm_vl.data.build_vocab`"
            )
        self.tokenizer = build_kosmos2_tokenizer(cfg.spm_model, cfg.dict_path, cfg.location_bin_size)
        self.dictionary = self.tokenizer.dictionary

    @classmethod
    def setup_task(cls, cfg: Kosmos2Config, **kwargs):
        return cls(cfg)

    def set_geometry(self, geometry: ModelGeometry) -> None:
        """The image geometry, once the model's latent queries match ``--image-token-length``."""
        if geometry.num_image_tokens != self.cfg.image_token_length:
            raise ValueError(
                f"--image-token-length {self.cfg.image_token_length} must equal the model's "
                f"{geometry.num_image_tokens} latent queries"
            )
        super().set_geometry(geometry)

    def image_transform(self, train: bool = True):
        self.require_geometry()
        return kosmos2_image_transform(
            self.image_size, self.image_mean, self.image_std, self.cfg.training_image_only_resize
        )

    def build_stages(self, split: str):
        cfg = self.cfg
        return [
            FramesToImage(),
            GritGroundedCaption(
                self.tokenizer,
                mode=str(cfg.phrase_mode),
                num_bins=cfg.location_bin_size,
                score_threshold=cfg.box_score_threshold,
                use_object_bbox_prob=cfg.use_object_bbox_prob,
                center_crop=not cfg.training_image_only_resize,
                size=self.image_size,
                drop_threshold=cfg.drop_crop_threshold,
                box_encoder=str(cfg.box_encoder),
            ),
            ImageTransform(self.image_transform(), optional=True),  # text-only documents have no image
            SequenceLength(cfg.tokens_per_sample, cfg.image_token_length + 3),
        ]

    def build_collater(self, split: str):
        d = self.dictionary
        return CollateKosmos2(
            bos_id=d.bos(),
            pad_id=d.pad(),
            image_id=d.index("<image>"),
            image_end_id=d.index("</image>"),
            num_image_tokens=self.cfg.image_token_length,
        )

    # ---- generation
    def load_dataset(self, split: str, combine: bool = False, epoch: int = 1, **kwargs):
        if split in ("train", "valid") or getattr(self.cfg, f"{split}_data", None) is not None:
            return super().load_dataset(split, combine, epoch, **kwargs)
        if not self.cfg.prompts:
            raise ValueError(f"split {split!r}: pass --prompts FILE (image_path<TAB>prompt lines) to generate")
        path = os.path.join(self.cfg.data, self.cfg.prompts)
        lines = read_prompt_file(path)
        self.datasets[split] = self.build_prompt_dataset(lines)
        logger.info("%s: %d prompts from %s", split, len(lines), path)

    def get_batch_iterator(self, dataset, **kwargs):
        if isinstance(dataset, Kosmos2PromptDataset):  # a plain indexed dataset: fairseq's own batching
            # fairseq's batch_by_size yields NO batch when --batch-size is below --required-batch-size-multiple
            # (default 8), and generation gains nothing from the multiple
            kwargs["required_batch_size_multiple"] = 1
            return FairseqTask.get_batch_iterator(self, dataset, **kwargs)
        return super().get_batch_iterator(dataset, **kwargs)

    def prompt_tokens(self, prompt: str) -> List[int]:
        """The generation prompt of ``prompt`` with this task's vocabulary and image slots
        (:func:`unilm_vl.inference.kosmos2.prompt_tokens`)."""
        return inference.prompt_tokens(self.tokenizer, self.cfg.image_token_length, prompt)

    def build_prompt_dataset(self, lines: Sequence[PromptLine]) -> Kosmos2PromptDataset:
        """The generation dataset of parsed prompt lines (images are read when items are accessed)."""
        return inference.build_prompt_dataset(
            lines, self.tokenizer, self.cfg.image_token_length, self.generation_image_transform()
        )

    def generation_image_transform(self):
        self.require_geometry("loading prompts")
        return kosmos2_image_transform(
            self.image_size, self.image_mean, self.image_std, only_resize=str(self.cfg.gen_image_view) == "squash"
        )

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        """A :class:`Kosmos2Generator` from fairseq's generation options (beam, nbest, max_len_a/b, min_len,
        lenpen, unnormalized, unkpen, sampling, sampling_topk/topp, temperature, no_repeat_ngram_size) and the
        task's ``--gen-beam-rule``; options it cannot honour raise ``NotImplementedError``."""
        unsupported = {
            "score_reference": getattr(args, "score_reference", False),
            "diverse_beam_groups": getattr(args, "diverse_beam_groups", -1) > 0,
            "diversity_rate": getattr(args, "diversity_rate", -1.0) > 0,
            "match_source_len": getattr(args, "match_source_len", False),
            "constraints": getattr(args, "constraints", None),
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn is not None,
            "lm_path": (extra_gen_cls_kwargs or {}).get("lm_model") is not None,
            "print_alignment": getattr(args, "print_alignment", None),
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise NotImplementedError(f"the kosmos2 generator does not support: {', '.join(named)}")
        search = SearchConfig(
            beam=args.beam,
            nbest=args.nbest,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
            min_len=args.min_len,
            lenpen=0.0 if getattr(args, "unnormalized", False) else args.lenpen,
            unkpen=getattr(args, "unkpen", 0.0),
            sampling=args.sampling,
            sampling_topk=args.sampling_topk,
            sampling_topp=args.sampling_topp,
            temperature=args.temperature,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            beam_rule=str(self.cfg.gen_beam_rule),
        )
        return Kosmos2Generator(
            search, self.dictionary, continuation_only=self.cfg.gen_continuation_only, seed=self.cfg.seed
        )

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
            raise BadSample(
                f"sequence of {n} tokens exceeds --tokens-per-sample {self.max_tokens}",
                sample.get("__where__", "?"),
                "caption",
            )
        return sample
