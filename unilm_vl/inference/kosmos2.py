"""Kosmos-2 inference (Peng et al. 2023, "Kosmos-2: Grounding Multimodal Large Language Models to the World"):
prompt files, the prompt dataset, the fairseq-style generator and a decoding engine over a loaded checkpoint.

Prompts are ``image_path<TAB>prompt`` lines (the released scripts' literal ``<tab>`` also separates; image paths
relative to the prompt file's directory; :func:`read_prompt_file`). Each becomes
``<s> <image> [L image slots] </image> prompt_ids`` (no ``</s>``; the prompt may hold tags:
``<grounding>An image of``) where the slots hold the ids 4 .. L+3 as in the released inference and HF's processor
(:func:`generation_slot_ids`), which only ``no_repeat_ngram_size`` sees. Batches are LEFT-padded
(:class:`Kosmos2PromptDataset`); :class:`Kosmos2Generator` decodes them (greedy / beam / sampling with a KV cache,
:mod:`unilm_vl.modules.generation`). Images are squashed to S x S by default as the released inference does
(``image_view="squash"``; ``"crop"`` = resize + centre crop, the training view).

Users: the ``kosmos2`` task's ``fairseq-generate`` path (``--prompts``, ``build_generator``), and through
:class:`Kosmos2Inference` the CLI :mod:`unilm_vl.kosmos2_infer` and the grounding evaluations
(:mod:`unilm_vl.eval.refcoco`, :mod:`unilm_vl.eval.flickr_entities`). The dictionary, tokenizer and image geometry
are passed in; nothing here imports a task.
"""

import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from fairseq.data import FairseqDataset

from ..data.decode import BadSample, load_image
from ..data.grounding import IMAGE_END, MASK_TOKEN, parse_grounded_text
from ..data.tokenizers import SPM_SPACE
from ..data.transforms import kosmos2_image_transform
from ..modules.generation import SearchConfig, generate, left_pad

IMAGE_VIEWS = ("squash", "crop")
"""The model's view of a generation image: squashed to S x S (the released inference; boxes cover the whole
image) or resized + centre-cropped as in training (boxes refer to the central square)."""

DECODING_PRESETS = ("release", "hf")
"""Names of :func:`preset_search_options`."""

HF_EXAMPLE_MAX_NEW_TOKENS = 64
"""``max_new_tokens`` of the generation call in HF's Kosmos-2 example (``model.generate(..., use_cache=True,
max_new_tokens=64)``, the docstring of ``Kosmos2ForConditionalGeneration.forward`` in transformers
``models/kosmos2/modeling_kosmos2.py``)."""

_HF_GREEDY_SETTINGS: Dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "min_length": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "constraints": None,
    "eos_token_id": 2,
}
"""``generation_config.json`` settings (with HF's defaults) that would change HF's greedy tokens in ways the
``"hf"`` preset does not reproduce; a directory that sets another value is refused by name."""


def preset_search_options(preset: str, generation_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """:class:`~unilm_vl.modules.generation.SearchConfig` fields of a decoding preset (:data:`DECODING_PRESETS`):

    - ``"release"``: the released demo and evaluation scripts (microsoft/unilm ``kosmos-2/demo/gradio_app.py``,
      ``kosmos-2/evaluation/*.sh``): greedy, ``no_repeat_ngram_size`` 3, at most 500 new tokens (the release
      counts its 71 prompt tokens in that budget; we do not), fairseq's length rule, at least 1 token.
    - ``"hf"``: HF transformers' ``generate`` as HF's Kosmos-2 example calls it (greedy, ``max_new_tokens=64``,
      :data:`HF_EXAMPLE_MAX_NEW_TOKENS`): at most 64 new tokens, the last one the model's choice (HF's length rule,
      ``max_len_b`` 63), ``</s>`` allowed from the first step, and the ``no_repeat_ngram_size`` and
      ``min_new_tokens`` of the model directory's ``generation_config.json`` (``generation_config``; HF's defaults,
      0, without one). A generation config whose other settings would change HF's greedy tokens (sampling,
      beams, repetition penalty, ``min_length``, forced or banned tokens, another ``</s>``; see
      :data:`_HF_GREEDY_SETTINGS`) raises ``ValueError`` naming them, rather than decoding differently from HF.
    """
    if preset == "release":
        return dict(
            beam=1,
            nbest=1,
            max_len_a=0.0,
            max_len_b=500,
            min_len=1,
            lenpen=1.0,
            sampling=False,
            no_repeat_ngram_size=3,
            beam_rule="fairseq",
        )
    if preset != "hf":
        raise ValueError(f"decoding preset must be one of {', '.join(DECODING_PRESETS)}, got {preset!r}")
    gen = dict(generation_config or {})
    other = [
        f"{key}={gen[key]!r}"
        for key, default in _HF_GREEDY_SETTINGS.items()
        if gen.get(key, default) not in (default, [default]) and not (key == "min_length" and not gen[key])
    ]
    if other:
        raise ValueError(
            f"generation_config.json sets {', '.join(other)}: the 'hf' preset reproduces HF's greedy "
            "generate without them; pass decoding options explicitly instead"
        )
    return dict(
        beam=1,
        nbest=1,
        max_len_a=0.0,
        max_len_b=HF_EXAMPLE_MAX_NEW_TOKENS - 1,
        min_len=int(gen.get("min_new_tokens") or 0),
        lenpen=1.0,
        sampling=False,
        no_repeat_ngram_size=int(gen.get("no_repeat_ngram_size") or 0),
        beam_rule="hf",
    )


# ---- prompts -------------------------------------------------------------------------------------------------------


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
        raise ValueError(
            f"{num_slots} image slots need the ids {first}..{first + num_slots - 1}, but the dictionary "
            f"has only {len(dictionary)} symbols"
        )
    return list(range(first, first + num_slots))


def prompt_tokens(tokenizer, num_image_tokens: int, prompt: str) -> List[int]:
    """``<s> <image> [L image slots] </image> prompt_ids`` for a prompt text that may hold tags (kept whole:
    ``<grounding>An image of`` -> ``... 64012, 712, 1648, 9`` with the released vocabulary); the slots hold
    :func:`generation_slot_ids`; no ``</s>``. ``tokenizer`` is the kosmos2 tokenizer
    (:func:`unilm_vl.data.grounding.build_kosmos2_tokenizer`), ``num_image_tokens`` = L."""
    d = tokenizer.dictionary
    return (
        [d.bos(), d.index("<image>")]
        + generation_slot_ids(d, num_image_tokens)
        + [d.index(IMAGE_END)]
        + tokenizer.encode(prompt, split_symbols=True)
    )


def generation_image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], view: str = "squash"):
    """The image transform of generation prompts for ``view`` (one of :data:`IMAGE_VIEWS`)."""
    if view not in IMAGE_VIEWS:
        raise ValueError(f"image view must be one of {', '.join(IMAGE_VIEWS)}, got {view!r}")
    return kosmos2_image_transform(image_size, mean, std, only_resize=view == "squash")


# ---- the prompt dataset ------------------------------------------------------------------------------------------


class Kosmos2PromptDataset(FairseqDataset):
    """Generation inputs: item ``i`` = its tokens ``<s> <image> [L slots] </image> prompt_ids``
    (:func:`prompt_tokens`) and its image, loaded and transformed on access (an unreadable image raises
    ``ValueError`` naming the file line and the path). The collater LEFT-pads: ``{"id", "nsentences", "ntokens",
    "net_input": {"src_tokens" B x T, "image" B x 3 x S x S, "image_mask" B x T}, "target": None}``."""

    def __init__(
        self,
        tokens: Sequence[Sequence[int]],
        images: Sequence[str],
        wheres: Sequence[str],
        transform,
        pad_idx: int,
        num_image_tokens: int,
    ):
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
        return collate_prompts(samples, self.pad, self.num_image_tokens)


def collate_prompts(samples: Sequence[Dict[str, Any]], pad_idx: int, num_image_tokens: int) -> Dict[str, Any]:
    """A generation batch of ``{"id", "tokens", "image"}`` items (:func:`prompt_tokens`, one transformed image
    each), LEFT-padded: ``{"id", "nsentences", "ntokens", "net_input": {"src_tokens" B x T, "image" B x 3 x S x S,
    "image_mask" B x T}, "target": None}``."""
    L = num_image_tokens
    masks = [[False, False] + [True] * L + [False] * (len(s["tokens"]) - L - 2) for s in samples]
    src_tokens, image_mask = left_pad([s["tokens"] for s in samples], pad_idx, masks)
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "nsentences": len(samples),
        "ntokens": sum(len(s["tokens"]) for s in samples),
        "net_input": {
            "src_tokens": src_tokens,
            "image": torch.stack([s["image"] for s in samples]),
            "image_mask": image_mask,
        },
        "target": None,
    }


def build_prompt_dataset(
    lines: Sequence[PromptLine], tokenizer, num_image_tokens: int, transform
) -> Kosmos2PromptDataset:
    """The generation dataset of parsed prompt lines (images are read when items are accessed)."""
    return Kosmos2PromptDataset(
        [prompt_tokens(tokenizer, num_image_tokens, line.prompt) for line in lines],
        [line.image for line in lines],
        [line.where for line in lines],
        transform,
        tokenizer.dictionary.pad(),
        num_image_tokens,
    )


# ---- the generator -----------------------------------------------------------------------------------------------


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
            raise NotImplementedError(
                "the kosmos2 generator takes no --prefix-size / --constraints: put the prefix in the prompt"
            )
        model = models[0]
        net = getattr(model, "net", model)
        net_input = sample["net_input"]
        src_tokens = net_input["src_tokens"]
        d = self.dictionary
        image = net_input.get("image")
        if image is not None:  # fairseq-generate --fp16 halves the model, not the batch
            image = image.to(next(net.parameters()).dtype)
        hyps = generate(
            net,
            src_tokens,
            image,
            net_input.get("image_mask"),
            self.search,
            pad_idx=d.pad(),
            eos_idx=d.eos(),
            unk_idx=d.unk(),
            generator=self._generator(src_tokens.device) if self.search.sampling else None,
            return_prompt_scores=not self.continuation_only,
        )
        out = []
        for i, sample_hyps in enumerate(hyps):
            prompt = self.prompt_text_tokens(src_tokens[i]).cpu()
            rows = []
            for h in sample_hyps:
                tokens, scores = h.tokens, h.positional_scores
                if not self.continuation_only and len(prompt):
                    tokens = torch.cat([prompt, tokens])
                    scores = torch.cat([h.prompt_scores[-len(prompt) :], scores])
                rows.append({"tokens": tokens, "score": h.score, "positional_scores": scores, "alignment": None})
            out.append(rows)
        return out

    def prompt_text_tokens(self, row: torch.Tensor) -> torch.Tensor:
        """The prompt ids after the last ``</image>`` of one (left-padded) row."""
        ends = (row == self.image_end_id).nonzero().flatten()
        start = int(ends[-1]) + 1 if len(ends) else int((row == self.dictionary.bos()).nonzero().flatten()[0]) + 1
        return row[start:]


# ---- decoding a loaded checkpoint ----------------------------------------------------------------------------------


def grounded_string(dictionary, tokens) -> str:
    """Token ids -> text as fairseq's ``--post-process sentencepiece`` writes it (``<s>``/``</s>`` dropped, tags
    verbatim): ``<grounding> An image of<phrase> a snowman</phrase><object>...</object>``."""
    return dictionary.string(tokens, "sentencepiece")


HF_SPACE_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
"""The replacements, in order, of HF tokenizers' ``clean_up_tokenization`` (applied when the tokenizer config sets
``clean_up_tokenization_spaces``)."""


def hf_text(dictionary, tokens, clean_up_spaces: bool = False) -> str:
    """Token ids -> the text HF's Kosmos-2 pipeline gives for them: ``processor.batch_decode(ids,
    skip_special_tokens=True)`` (pieces joined with ``▁`` as a space, tags verbatim, ``<s> </s> <pad> <unk> <mask>``
    dropped; ``clean_up_spaces``: :data:`HF_SPACE_CLEANUP`), then ``post_process_generation(text,
    cleanup_and_extract=False)``, which keeps what follows the last ``</image>``. Unlike :func:`grounded_string`
    (the release's post-processing) nothing is stripped, so a prompt that starts with text gives a leading space
    (``' two dogs'``), and ``<unk>`` is dropped instead of written."""
    skip = {dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk(), dictionary.index(MASK_TOKEN)}
    text = "".join(dictionary[int(t)] for t in tokens if int(t) not in skip).replace(SPM_SPACE, " ")
    if clean_up_spaces:
        for old, new in HF_SPACE_CLEANUP:
            text = text.replace(old, new)
    return text.split(IMAGE_END)[-1]


class Kosmos2Inference:
    """A loaded ``kosmos2`` model ready to decode :class:`PromptLine` s into records with the entities parsed out
    (:meth:`run`), or prompts with their transformed images (:meth:`decode`). ``task`` is the task the checkpoint
    was loaded with; its ``tokenizer``, ``dictionary``, ``cfg.image_token_length``, ``cfg.location_bin_size`` and
    image geometry (``image_size``, ``image_mean``, ``image_std``) are read. ``generation_config`` holds the
    decoding settings of an HF directory's ``generation_config.json`` (for the ``"hf"`` preset),
    ``clean_up_spaces`` its tokenizer's ``clean_up_tokenization_spaces`` (for :func:`hf_text`).
    :func:`unilm_vl.checkpoint.load_kosmos2_inference` loads one from a checkpoint."""

    def __init__(
        self,
        model,
        task,
        search: SearchConfig,
        image_view: str = "squash",
        seed: int = 1,
        device: Optional[torch.device] = None,
        generation_config: Optional[Mapping[str, Any]] = None,
        clean_up_spaces: bool = False,
    ):
        self.model, self.task, self.search, self.view, self.seed = model, task, search, image_view, seed
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.transform = generation_image_transform(task.image_size, task.image_mean, task.image_std, image_view)
        self.generator = Kosmos2Generator(search, task.dictionary, seed=seed)
        self.generation_config = dict(generation_config or {})
        self.clean_up_spaces = clean_up_spaces

    def set_search(self, search: SearchConfig) -> None:
        """Decode with ``search`` from now on (the generator's sampling seed restarts)."""
        self.search = search
        self.generator = Kosmos2Generator(search, self.task.dictionary, seed=self.seed)

    def preset(self, name: str) -> Dict[str, Any]:
        """The :class:`SearchConfig` fields of decoding preset ``name`` for this model
        (:func:`preset_search_options` with its HF generation config)."""
        return preset_search_options(name, self.generation_config)

    @property
    def num_bins(self) -> int:
        """P of the P x P box grid of the model's ``<patch_index_k>`` tokens."""
        return int(self.task.cfg.location_bin_size)

    def run(self, lines: Sequence[PromptLine]) -> List[dict]:
        """Decode parsed prompt lines together; one record per (input, hypothesis): ``where``, ``image``,
        ``prompt``, ``rank``, ``text`` (prompt text + continuation, as the release's fairseq post-processing writes
        it), ``continuation``, ``clean_text``, ``entities`` (:func:`unilm_vl.data.grounding.parse_grounded_text`
        of ``text``), ``score`` and ``hf_text`` (the same tokens as HF's processor writes them: :func:`hf_text`)."""
        dataset = build_prompt_dataset(lines, self.task.tokenizer, self.task.cfg.image_token_length, self.transform)
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # B x 3 x S x S
        results = self.decode([line.prompt for line in lines], images)
        return [
            {"where": line.where, "image": line.image, "prompt": line.prompt, "rank": rank, **hypothesis}
            for line, hypotheses in zip(lines, results)
            for rank, hypothesis in enumerate(hypotheses)
        ]

    def decode(
        self, prompts: Sequence[str], images: torch.Tensor, search: Optional[SearchConfig] = None
    ) -> List[List[dict]]:
        """Decode ``prompts`` (texts such as ``"<grounding>An image of"``) with their images (B x 3 x S x S, already
        transformed: :attr:`transform`) in one left-padded batch, with ``search`` (default: the engine's). Per
        prompt, its hypotheses best first, each ``{"text", "continuation", "clean_text", "entities", "score",
        "hf_text"}`` (see :meth:`run`)."""
        tokenizer, d = self.task.tokenizer, self.task.dictionary
        L = self.task.cfg.image_token_length
        sample = collate_prompts(
            [
                {"id": i, "tokens": prompt_tokens(tokenizer, L, p), "image": image}
                for i, (p, image) in enumerate(zip(prompts, images))
            ],
            d.pad(),
            L,
        )
        net_input = sample["net_input"]
        net_input["src_tokens"] = net_input["src_tokens"].to(self.device)
        net_input["image_mask"] = net_input["image_mask"].to(self.device)
        net_input["image"] = net_input["image"].to(self.device)
        generator = self.generator if search is None else Kosmos2Generator(search, d, seed=self.seed)
        with torch.no_grad():
            hypos = generator.generate([self.model], sample)
        results = []
        for prompt, sample_hypos in zip(prompts, hypos):
            prompt_len = len(tokenizer.encode(prompt, split_symbols=True))
            rows = []
            for h in sample_hypos:
                text = grounded_string(d, h["tokens"])
                clean, entities = parse_grounded_text(text, self.num_bins)
                rows.append(
                    {
                        "text": text,
                        "continuation": grounded_string(d, h["tokens"][prompt_len:]),
                        "clean_text": clean,
                        "entities": entities,
                        "score": float(h["score"]),
                        "hf_text": hf_text(d, h["tokens"], self.clean_up_spaces),
                    }
                )
            results.append(rows)
        return results
