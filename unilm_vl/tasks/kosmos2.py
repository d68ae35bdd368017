"""Task ``kosmos2``: grounded image-caption language modelling of Kosmos-2 (Peng et al. 2023, "Kosmos-2:
Grounding Multimodal Large Language Models to the World"; reference task ``image_gpt_interleaved_laion_obj`` with
the GRIT loader, notes kosmos2.md sections 2-5).

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

Generation (``fairseq-generate``, :mod:`unilm_vl.kosmos2_infer`): ``--prompts FILE`` is a TSV of
``image_path<TAB>prompt`` lines (image paths relative to the file's directory), read as any ``--gen-subset`` other
than ``train``/``valid``. Each line becomes ``<s> <image> [L image slots] </image> prompt_ids`` (no ``</s>``; the
prompt may hold tags: ``<grounding>An image of``); the slots hold the ids 4 .. L+3 as in the released inference
and HF's processor (:func:`generation_slot_ids`), which only ``--no-repeat-ngram-size`` sees. Batches are
LEFT-padded, and ``build_generator`` returns a :class:`Kosmos2Generator` (greedy / beam / sampling with a KV
cache, :mod:`unilm_vl.modules.generation`). A missing image is an error naming the file and line; so is a line
without a tab or without an image path (no text-only generation). Images are squashed to S x S by default as the
released inference does (``--gen-image-view``)::

    fairseq-generate DIR --user-dir unilm_vl --task kosmos2 --path ckpt.pt --spm-model M --dict-path D \
        --prompts prompts.tsv --gen-subset test --batch-size 8 --beam 1 --no-repeat-ngram-size 3 \
        --max-len-b 500 --post-process sentencepiece
    # H-<id> <score> <grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>...</object>.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from fairseq.data import FairseqDataset
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import FairseqTask, register_task

from ..data.decode import BadSample, load_image
from ..data.grounding import DEFAULT_NUM_BINS, IMAGE_END, build_kosmos2_tokenizer
from ..data.kosmos2_samples import CollateKosmos2, GritGroundedCaption
from ..data.stages import FramesToImage, ImageTransform
from ..data.transforms import kosmos2_image_transform
from ..modules.generation import SearchConfig, generate, left_pad
from ._base import ModelGeometry, StreamDataConfig, StreamTaskBase

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
    prompts: Optional[str] = field(default=None, metadata={
        "help": "generation: TSV of image_path<TAB>prompt lines (relative to --data; image paths relative to the "
                "file's directory), read as any --gen-subset other than train/valid"})
    gen_image_view: ChoiceEnum(["squash", "crop"]) = field(default="squash", metadata={
        "help": "generation: squash images to S x S (the released inference; boxes cover the whole image) or "
                "resize + centre-crop as in training (boxes refer to the central square)"})
    gen_continuation_only: bool = field(default=False, metadata={
        "help": "generation: hypotheses hold only the generated tokens (default: the prompt text after </image> "
                "followed by them, so phrases given in the prompt stay attached to their boxes)"})
    gen_beam_rule: ChoiceEnum(["fairseq", "hf"]) = field(default="fairseq", metadata={
        "help": "generation: how beam search ends and ranks its hypotheses: fairseq's (</s> forced and scored at "
                "the length limit; the release decodes with it) or HF transformers' generate (no forced </s>, its "
                "early-stopping heuristic; HF's max_new_tokens = --max-len-b + 1); see "
                "unilm_vl.modules.generation"})


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

    @classmethod
    def setup_task(cls, cfg: Kosmos2Config, **kwargs):
        return cls(cfg)

    def set_geometry(self, geometry: ModelGeometry) -> None:
        """The image geometry, once the model's latent queries match ``--image-token-length``."""
        if geometry.num_image_tokens != self.cfg.image_token_length:
            raise ValueError(f"--image-token-length {self.cfg.image_token_length} must equal the model's "
                             f"{geometry.num_image_tokens} latent queries")
        super().set_geometry(geometry)

    def image_transform(self, train: bool = True):
        self.require_geometry()
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
                ImageTransform(self.image_transform(), optional=True),  # text-only documents have no image
                SequenceLength(cfg.tokens_per_sample, cfg.image_token_length + 3)]

    def build_collater(self, split: str):
        d = self.dictionary
        return CollateKosmos2(bos_id=d.bos(), pad_id=d.pad(), image_id=d.index("<image>"),
                              image_end_id=d.index("</image>"), num_image_tokens=self.cfg.image_token_length)

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
        """``<s> <image> [L image slots] </image> prompt_ids`` for a prompt text that may hold tags (kept whole:
        ``<grounding>An image of`` -> ``... 64012, 712, 1648, 9``); the slots hold :func:`generation_slot_ids`
        (4 .. L+3, as the released inference); no ``</s>``."""
        d = self.dictionary
        return [d.bos(), d.index("<image>")] + generation_slot_ids(d, self.cfg.image_token_length) + \
            [d.index(IMAGE_END)] + self.tokenizer.encode(prompt, split_symbols=True)

    def build_prompt_dataset(self, lines: Sequence["PromptLine"]) -> "Kosmos2PromptDataset":
        """The generation dataset of parsed prompt lines (images are read when items are accessed)."""
        return Kosmos2PromptDataset([self.prompt_tokens(line.prompt) for line in lines],
                                    [line.image for line in lines], [line.where for line in lines],
                                    self.generation_image_transform(), self.dictionary.pad(),
                                    self.cfg.image_token_length)

    def generation_image_transform(self):
        self.require_geometry("loading prompts")
        return kosmos2_image_transform(self.image_size, self.image_mean, self.image_std,
                                       only_resize=str(self.cfg.gen_image_view) == "squash")

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
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
            beam=args.beam, nbest=args.nbest, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
            min_len=args.min_len, lenpen=0.0 if getattr(args, "unnormalized", False) else args.lenpen,
            unkpen=getattr(args, "unkpen", 0.0), sampling=args.sampling, sampling_topk=args.sampling_topk,
            sampling_topp=args.sampling_topp, temperature=args.temperature,
            no_repeat_ngram_size=args.no_repeat_ngram_size, beam_rule=str(self.cfg.gen_beam_rule))
        return Kosmos2Generator(search, self.dictionary, continuation_only=self.cfg.gen_continuation_only,
                                seed=self.cfg.seed)

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


# ---- generation data -------------------------------------------------------------------------------------------


def generation_slot_ids(dictionary, num_slots: int) -> List[int]:
    """The ids written into the ``num_slots`` image slots of a generation prompt: ``unk + 1 .. unk + num_slots``
    (4 .. 67 for the released L = 64), as the released inference (``list(range(4, image_feature_length + 4))`` in
    microsoft/unilm ``kosmos-2/evaluation/caption_obj_few_shot.py`` and ``kosmos-2/demo/gradio_app.py``) and HF's
    ``Kosmos2Processor`` (``first_image_token_id = unk_id + 1``) write them.

    The model never reads these ids (the slots' embedding rows are replaced by the image features), but
    ``--no-repeat-ngram-size`` counts them as history, so with the same ids as the release and HF the same
    continuations are banned. Training batches hold ``<image>`` in every slot, as the released training loader
    does (``_prepare`` in ``kosmos-2/unilm/data/vl/laion2b_obj_loader.py``); nothing is banned there. Raises
    ``ValueError`` when the dictionary is too small to hold them as ordinary symbols."""
    first = dictionary.unk() + 1
    if first + num_slots > len(dictionary):
        raise ValueError(f"{num_slots} image slots need the ids {first}..{first + num_slots - 1}, but the dictionary "
                         f"has only {len(dictionary)} symbols")
    return list(range(first, first + num_slots))


class PromptLine(NamedTuple):
    image: str
    """Image path (made absolute against the prompt file's directory)."""
    prompt: str
    where: str
    """``file:line`` for error messages."""


def parse_prompt_line(line: str, where: str, base_dir: str = ".") -> PromptLine:
    """``image_path<TAB>prompt`` (the literal ``<tab>`` of the released scripts also separates). Raises
    ``ValueError`` naming ``where`` for a line without a separator or without an image path."""
    line = line.rstrip("\r\n")
    sep = "\t" if "\t" in line else "<tab>" if "<tab>" in line else None
    if sep is None:
        raise ValueError(f"{where}: expected 'image_path<TAB>prompt', found no tab in {line!r}")
    image, prompt = line.split(sep, 1)
    image = image.strip()
    if not image:
        raise ValueError(f"{where}: no image path before the tab (kosmos2 generation needs an image per prompt)")
    return PromptLine(os.path.join(base_dir, os.path.expanduser(image)), prompt, where)


def read_prompt_file(path: str) -> List[PromptLine]:
    """All non-empty lines of a prompt TSV; every image must exist (``FileNotFoundError`` naming file, line and
    image path)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    lines = []
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, 1):
            if not text.strip():
                continue
            line = parse_prompt_line(text, f"{path}:{number}", base)
            if not os.path.isfile(line.image):
                raise FileNotFoundError(f"{line.where}: image not found: {line.image}")
            lines.append(line)
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return lines


class Kosmos2PromptDataset(FairseqDataset):
    """Generation inputs: item ``i`` = its tokens ``<s> <image> [L slots] </image> prompt_ids``
    (:meth:`Kosmos2Task.prompt_tokens`) and its image, loaded and transformed on access (an unreadable image raises
    ``ValueError`` naming the file line and the path). The collater LEFT-pads: ``{"id", "nsentences", "ntokens",
    "net_input": {"src_tokens" B x T, "image" B x 3 x S x S, "image_mask" B x T}, "target": None}``."""

    def __init__(self, tokens: Sequence[Sequence[int]], images: Sequence[str], wheres: Sequence[str], transform,
                 pad_idx: int, num_image_tokens: int):
        self.tokens = [list(t) for t in tokens]
        self.images, self.wheres, self.transform = list(images), list(wheres), transform
        self.pad, self.num_image_tokens = pad_idx, num_image_tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            image = load_image(self.images[index])
        except (BadSample, OSError) as exc:
            raise ValueError(f"{self.wheres[index]}: cannot read image {self.images[index]}: {exc}") from exc
        return {"id": index, "tokens": self.tokens[index], "image": self.transform(image)}

    def num_tokens(self, index: int) -> int:
        return len(self.tokens[index])

    def size(self, index: int) -> int:
        return self.num_tokens(index)

    def collater(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        L = self.num_image_tokens
        masks = [[False, False] + [True] * L + [False] * (len(s["tokens"]) - L - 2) for s in samples]
        src_tokens, image_mask = left_pad([s["tokens"] for s in samples], self.pad, masks)
        return {"id": torch.tensor([s["id"] for s in samples], dtype=torch.long), "nsentences": len(samples),
                "ntokens": sum(len(s["tokens"]) for s in samples),
                "net_input": {"src_tokens": src_tokens, "image": torch.stack([s["image"] for s in samples]),
                              "image_mask": image_mask},
                "target": None}


class Kosmos2Generator:
    """fairseq-style generator over :func:`unilm_vl.modules.generation.generate`: ``generate(models, sample)``
    returns, per sample, a list of ``{"tokens", "score", "positional_scores", "alignment": None}`` best first.

    ``tokens`` are the prompt text (after ``</image>``) followed by the generated tokens ending in ``</s>`` (no
    ``</s>`` on a hypothesis cut at the length limit under ``--gen-beam-rule hf``), with
    ``positional_scores`` of the same length (the prompt text's own log-probs, then the generated tokens'); with
    ``continuation_only`` just the generated part. ``score`` is the search score of the generated part. Sampling
    draws from a ``torch.Generator`` seeded once with ``seed``.
    """

    def __init__(self, search: SearchConfig, dictionary, continuation_only: bool = False, seed: int = 1):
        self.search, self.dictionary = search, dictionary
        self.continuation_only, self.seed = continuation_only, seed
        self.image_end_id = dictionary.index(IMAGE_END)
        self._rng: Optional[torch.Generator] = None

    @property
    def eos(self) -> int:
        return self.dictionary.eos()

    @property
    def symbols_to_strip_from_output(self) -> set:
        return {self.dictionary.eos(), self.dictionary.bos()}

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device).manual_seed(self.seed)
        return self._rng

    def generate(self, models, sample, prefix_tokens=None, constraints=None, **kwargs) -> List[List[Dict]]:
        if len(models) != 1:
            raise NotImplementedError(f"the kosmos2 generator takes one model, not an ensemble of {len(models)}")
        if prefix_tokens is not None or constraints is not None:
            raise NotImplementedError("the kosmos2 generator takes no --prefix-size / --constraints: put the "
                                      "prefix in the prompt")
        model = models[0]
        net = getattr(model, "net", model)
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        d = self.dictionary
        image = net_input.get("image")
        if image is not None:  # fairseq-generate --fp16 halves the model, not the batch
            image = image.to(next(net.parameters()).dtype)
        hyps = generate(net, src_tokens, image, net_input.get("image_mask"), self.search,
                        pad_idx=d.pad(), eos_idx=d.eos(), unk_idx=d.unk(),
                        generator=self._generator(src_tokens.device) if self.search.sampling else None,
                        return_prompt_scores=not self.continuation_only)
        out = []
        for i, sample_hyps in enumerate(hyps):
            prompt = self.prompt_text_tokens(src_tokens[i]).cpu()
            rows = []
            for h in sample_hyps:
                tokens, scores = h.tokens, h.positional_scores
                if not self.continuation_only and len(prompt):
                    tokens = torch.cat([prompt, tokens])
                    scores = torch.cat([h.prompt_scores[-len(prompt):], scores])
                rows.append({"tokens": tokens, "score": h.score, "positional_scores": scores, "alignment": None})
            out.append(rows)
        return out

    def prompt_text_tokens(self, row: torch.Tensor) -> torch.Tensor:
        """The prompt ids after the last ``</image>`` of one (left-padded) row."""
        ends = (row == self.image_end_id).nonzero().flatten()
        start = int(ends[-1]) + 1 if len(ends) else int((row == self.dictionary.bos()).nonzero().flatten()[0]) + 1
        return row[start:]
