"""The Python API of Kosmos-2 grounding: :class:`Kosmos2Grounder` (also ``unilm_vl.Kosmos2Grounder``).

::

    from unilm_vl import Kosmos2Grounder

    grounder = Kosmos2Grounder.load("kosmos2_hf_dir")      # an HF save_pretrained directory, or our .pt checkpoint
    [(text, clean_text, entities)] = grounder.ground("snowman.jpg")          # prompt "<grounding>An image of"
    # text       '<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>...</object> ...'
    # clean_text 'An image of a snowman warming himself by a fire.'
    # entities   [('a snowman', (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]), ...]
    results = grounder.ground([image_a, image_b], ["<grounding>An image of", "<grounding><phrase> a dog</phrase>"],
                              decoding="release", max_new_tokens=100)

The three fields are those of HF's ``Kosmos2Processor.post_process_generation`` (``text`` with
``cleanup_and_extract=False``; ``clean_text, entities`` with the default), so code written against HF's output
runs unchanged: ``entities`` is a list of ``(phrase, (start, end), [(x0, y0, x1, y1), ...])`` with ``start:end``
indexing ``clean_text`` and boxes normalised to the model's view of the image (the whole image in the default
squash view; draw them with :func:`unilm_vl.data.grounding.box_to_pixels`).

Decoding presets (:func:`unilm_vl.inference.kosmos2.preset_search_options`): ``decoding="hf"`` (the default,
:attr:`Kosmos2Grounder.HF_GREEDY`) is HF's ``generate`` as HF's Kosmos-2 example calls it (greedy, 64 new
tokens, the directory's ``generation_config.json``) and gives HF's tokens on the same weights;
``decoding="release"`` (:attr:`Kosmos2Grounder.RELEASE`) is the released demo's (greedy, no repeated trigram, up
to 500 new tokens). Keyword options then change single settings: the fields of
:class:`unilm_vl.modules.generation.SearchConfig` (``beam``, ``no_repeat_ngram_size``, ``sampling``,
``sampling_topp``, ``temperature``, ...) and ``max_new_tokens`` (HF's name: tokens generated, ``</s>``
included; ``max_len_b`` + 1).

Prompts of different lengths are decoded together (left-padded, :mod:`unilm_vl.modules.generation`); the result
of a batch is the result of each prompt alone. Bad input is one ``ValueError`` with a one-line message, raised
before anything is decoded: no image for a prompt (``None``: every prompt has image slots, and decoding the
placeholder ids as text would be silent nonsense), counts of images and prompts that do not pair up, a tensor
image that is not the model's ``3 x S x S`` input, an empty or unreadable image.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import load_kosmos2_inference
from .data.decode import BadSample, load_image
from .data.grounding import Entity, parse_grounded_text
from .inference.kosmos2 import DECODING_PRESETS, Kosmos2Inference, preset_search_options
from .modules.generation import SearchConfig

GroundingResult = Tuple[str, str, List[Entity]]
"""``(text, clean_text, entities)`` of one prompt: HF ``post_process_generation``'s raw text and its parse."""

ImageInput = Union[str, os.PathLike, "PIL.Image.Image", "numpy.ndarray", torch.Tensor]  # noqa: F821
"""A path, a PIL image, an ``H x W x 3`` uint8 array, or a ``3 x S x S`` float tensor already transformed
(normalised pixels of the model's input size)."""

DEFAULT_PROMPT = "<grounding>An image of"
"""The released demo's grounded-caption prompt (microsoft/unilm ``kosmos-2/demo/gradio_app.py``); HF's example
writes ``"<grounding> An image of"``, which gives the same tokens."""

_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))


class Kosmos2Grounder:
    """Grounded generation with a Kosmos-2 checkpoint: :meth:`load` it, then :meth:`ground` images (module
    docstring). Wraps a :class:`unilm_vl.inference.kosmos2.Kosmos2Inference` (:attr:`engine`), the decoding engine
    of ``kosmos2_infer`` and the grounding evaluations."""

    HF_GREEDY = "hf"
    """Decoding preset: HF transformers' ``generate`` as HF's Kosmos-2 example calls it (greedy,
    ``max_new_tokens=64``, ``no_repeat_ngram_size`` / ``min_new_tokens`` from ``generation_config.json``)."""
    RELEASE = "release"
    """Decoding preset: the released demo (greedy, ``no_repeat_ngram_size=3``, up to 500 new tokens)."""
    DEFAULT_PROMPT = DEFAULT_PROMPT

    def __init__(self, engine: Kosmos2Inference, batch_size: int = 8):
        self.engine = engine
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def load(
        cls,
        path_or_hf_dir: str,
        device: Optional[str] = None,
        *,
        image_view: Optional[str] = None,
        spm_model: Optional[str] = None,
        dict_path: Optional[str] = None,
        fp16: bool = False,
        batch_size: int = 8,
        seed: int = 1,
    ) -> "Kosmos2Grounder":
        """A grounder for ``path_or_hf_dir``: our ``kosmos2`` checkpoint (``.pt``) or a directory written by HF's
        ``save_pretrained`` of ``Kosmos2ForConditionalGeneration`` and its processor (converted on load, nothing
        written; see :func:`unilm_vl.checkpoint.read_hf_dir_state`).

        ``device``: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available). ``image_view``: ``"squash"`` (the
        release's) or ``"crop"``; default: the HF directory's image processor, else ``"squash"``.
        ``spm_model`` / ``dict_path`` replace the vocabulary files (the dictionary is derived from the sentencepiece
        model when no ``dict.txt`` is given). ``fp16`` halves the model (CUDA). ``batch_size``: prompts decoded
        together. ``seed``: the seed of sampling. Raises ``FileNotFoundError`` / ``ValueError`` naming the path
        for a missing or unusable checkpoint."""
        if not os.path.exists(path_or_hf_dir):
            raise FileNotFoundError(f"checkpoint not found: {path_or_hf_dir}")
        # the engine's own search settings are unused: ground() passes its decoding to each call
        engine = load_kosmos2_inference(
            path_or_hf_dir,
            SearchConfig(**preset_search_options("release")),
            image_view=image_view,
            seed=seed,
            fp16=fp16,
            spm_model=spm_model,
            dict_path=dict_path,
            device=device,
        )
        return cls(engine, batch_size)

    # ---- decoding options ----------------------------------------------------------------------------------------
    def search_config(self, decoding: str = HF_GREEDY, **options: Any) -> SearchConfig:
        """The :class:`SearchConfig` that :meth:`ground` decodes with: preset ``decoding`` (``"hf"`` or
        ``"release"``) with ``options`` replacing single fields (``max_new_tokens`` = ``max_len_b`` + 1). Raises
        ``ValueError`` for an unknown preset or option, or values ``SearchConfig`` refuses."""
        if decoding not in DECODING_PRESETS:
            raise ValueError(f"decoding must be one of {', '.join(DECODING_PRESETS)}, got {decoding!r}")
        fields = self.engine.preset(decoding)
        options = dict(options)
        if "max_new_tokens" in options:
            if "max_len_b" in options:
                raise ValueError("give max_new_tokens or max_len_b, not both")
            max_new = options.pop("max_new_tokens")
            if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
                raise ValueError(f"max_new_tokens must be a positive integer, got {max_new!r}")
            options["max_len_b"] = max_new - 1
        unknown = sorted(set(options) - set(_SEARCH_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown decoding option(s) {', '.join(unknown)}; known: max_new_tokens, {', '.join(_SEARCH_FIELDS)}"
            )
        if options.get("nbest", 1) != 1:
            raise ValueError(
                "ground() returns the best hypothesis of each prompt (nbest 1); use "
                "Kosmos2Inference.decode or python -m unilm_vl.kosmos2_infer --nbest for more"
            )
        fields.update(options)
        return SearchConfig(**fields)

    # ---- grounding ------------------------------------------------------------------------------------------------
    def ground(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        prompts: Union[str, Sequence[str], None] = None,
        decoding: str = HF_GREEDY,
        **options: Any,
    ) -> List[GroundingResult]:
        """``[(text, clean_text, entities)]``, one per (image, prompt) pair, in input order.

        ``images``: one image or a list (paths, PIL images, ``H x W x 3`` uint8 arrays, or transformed
        ``3 x S x S`` tensors). ``prompts``: one text or a list (default :data:`DEFAULT_PROMPT`); one image with
        several prompts, or several images with one prompt, pair up by repetition, otherwise the counts must be
        equal. ``decoding`` / ``options``: see :meth:`search_config`."""
        search = self.search_config(decoding, **options)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        if prompts is None:
            prompts = DEFAULT_PROMPT
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not image_list or not prompt_list:
            raise ValueError("ground() needs at least one image and one prompt")
        bad_prompts = [i for i, p in enumerate(prompt_list) if not isinstance(p, str)]
        if bad_prompts:
            raise ValueError(
                f"prompts must be strings; prompt {bad_prompts[0]} is a {type(prompt_list[bad_prompts[0]]).__name__}"
            )
        if len(image_list) == 1 and len(prompt_list) > 1:
            image_list = image_list * len(prompt_list)
        elif len(prompt_list) == 1 and len(image_list) > 1:
            prompt_list = prompt_list * len(image_list)
        elif len(image_list) != len(prompt_list):
            raise ValueError(
                f"{len(image_list)} images for {len(prompt_list)} prompts: give one image per prompt "
                "(or one image, or one prompt)"
            )
        pixels = torch.stack([self._pixels(image, i) for i, image in enumerate(image_list)])  # N x 3 x S x S
        results: List[GroundingResult] = []
        for start in range(0, len(prompt_list), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            for hypotheses in self.engine.decode(prompt_list[chunk], pixels[chunk], search):
                text = hypotheses[0]["hf_text"]
                clean_text, entities = parse_grounded_text(text, self.engine.num_bins)
                results.append((text, clean_text, [_entity(e) for e in entities]))
        return results

    def _pixels(self, image: ImageInput, index: int) -> torch.Tensor:
        """The model input (3 x S x S) of one image argument; ``ValueError`` naming ``index`` when it cannot be."""
        size = int(self.engine.task.image_size)
        if image is None:
            raise ValueError(
                f"image {index} is None: every Kosmos-2 prompt holds image slots, so each needs an "
                "image (a path, PIL image, H x W x 3 uint8 array or 3 x S x S tensor)"
            )
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or tuple(image.shape) != (3, size, size) or not image.is_floating_point():
                raise ValueError(
                    f"image {index}: a tensor image must be the model's transformed input, a float "
                    f"3 x {size} x {size} tensor; got {image.dtype} {' x '.join(map(str, image.shape))}"
                    " (pass a PIL image or a path to have it resized)"
                )
            return image.float()
        if isinstance(image, (str, os.PathLike)):
            try:
                image = load_image(os.fspath(image))
            except (BadSample, OSError) as exc:
                raise ValueError(f"image {index}: {exc}") from None
        else:
            image = _as_pil(image, index)
        if min(image.size) < 1:
            raise ValueError(f"image {index} is empty ({image.size[0]} x {image.size[1]} pixels)")
        return self.engine.transform(image.convert("RGB"))


def _as_pil(image: Any, index: int):
    """A PIL image of a PIL image or an ``H x W x 3`` (or ``H x W``) uint8 array."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    try:
        import numpy as np
    except ImportError:  # pragma: no cover  (numpy comes with torch)
        np = None
    if np is not None and isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"image {index}: an array image must be H x W x 3 (or 4, or H x W) uint8, got "
                f"{image.dtype} {' x '.join(map(str, image.shape))}"
            )
        return Image.fromarray(image)
    raise ValueError(f"image {index}: expected a path, PIL image, uint8 array or tensor, got {type(image).__name__}")


def _entity(entity: Entity) -> Entity:
    """``(phrase, (start, end), [box, ...])`` as plain tuples of Python numbers, as HF returns them."""
    phrase, (start, end), boxes = entity
    return (phrase, (int(start), int(end)), [tuple(float(v) for v in box) for box in boxes])
