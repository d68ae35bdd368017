"""Loading checkpoints for every tool: the one place where a user-supplied file becomes a state dict or a model.

Three levels, each built on the one before:

- :func:`load_checkpoint_file`: any ``.pt``/``.bin`` -> the object it holds, read without running code from it
  (also used by ``modules/`` and ``models/`` for released weights, so this module imports only torch at load
  time; the fairseq side is imported by the functions that need it);
- :func:`read_fairseq_state`: a fairseq checkpoint as saved (``model``, ``cfg``/``args``, ...), with one clear
  error for a file that is not one and for a sharded ``--fsdp2`` checkpoint (``convert``, ``export_open_clip``,
  ``wise_ft``); :func:`load_fairseq_checkpoint` prepares it as fairseq's ``load_checkpoint_to_cpu`` does;
- :func:`load_model`: a checkpoint -> ``(model, cfg, task)`` in eval mode (the ``eval`` modules, ``kosmos2_infer``;
  ``python -m unilm_vl.generate`` reads through :func:`fairseq_reads_safely`).

HF directories are checkpoints too: wherever a path is read through :func:`load_fairseq_checkpoint` (so
:func:`load_model` and :func:`fairseq_reads_safely`), a directory written by HF's ``save_pretrained`` of
``Kosmos2ForConditionalGeneration`` and its processor (``config.json``, safetensors or ``pytorch_model.bin``,
``sentencepiece.bpe.model``) is converted in memory into the checkpoint ``python -m unilm_vl.convert kosmos2
--from-hf`` would write (:func:`read_hf_dir_state`).

``torch.load(path, weights_only=False)`` unpickles whatever the file holds, and unpickling may call any function
the file names: a crafted ``.pt`` runs code as it loads. Every tool of this package reads a user-supplied
``.pt``/``.bin`` through :func:`load_checkpoint_file` (``python -m unilm_vl.convert``, ``export_open_clip``,
``wise_ft``, ``kosmos2_infer`` and the ``eval`` modules through :func:`load_fairseq_checkpoint`, the COSA release
weights and HF BERT ``pytorch_model.bin``). It uses torch's restricted unpickler (``weights_only=True``), which
builds tensors, numbers, strings, lists, tuples, dicts and OrderedDicts, plus the classes of :data:`SAFE_GLOBALS`,
and nothing else. A file that needs another global is refused with :class:`UnsafeCheckpointError`, naming the file
and the globals, before anything in it has run.

What our own checkpoints hold (tests/test_checkpoint.py loads one written by ``fairseq-train``): fairseq 0.12's
trainer stores ``cfg`` as a plain dict (``OmegaConf.to_container``) and ``args`` as None, its metrics as
OrderedDicts of numbers, our iterator's position as a dict of ints; ``convert`` and ``wise_ft`` write the same
kinds. fairseq before 0.10 (and checkpoints released with it) stored ``args`` as an ``argparse.Namespace``, which
is allowed: rebuilding one only sets attributes.

``fairseq-train --restore-file`` and the plain ``fairseq-generate --path`` read checkpoints with fairseq's own
``torch.load(f)``, which is restricted too since torch 2.6 made ``weights_only=True`` the default (the pinned
torch is newer); a refused file then stops with torch's message instead of our one-line error.
``python -m unilm_vl.generate`` (fairseq-generate with this package) reads through :func:`load_fairseq_checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from .safe_load import SAFE_GLOBALS, UnsafeCheckpointError, load_checkpoint_file  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # annotations only: inference/ is a floor below, imported where it is used
    from .inference.kosmos2 import Kosmos2Inference
    from .modules.generation import SearchConfig

logger = logging.getLogger(__name__)


def check_fairseq_state(state: Any, path: str) -> Dict[str, Any]:
    """``state`` (read from ``path``) if it is a complete fairseq checkpoint: a dict with ``model`` and ``cfg`` or
    ``args``. Raises ``ValueError`` naming ``path`` otherwise, and for a sharded ``--fsdp2`` checkpoint (whose
    weights are in a directory beside it) with the command that makes one file of it."""
    if not isinstance(state, dict) or not ("cfg" in state or "args" in state) or "model" not in state:
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' and 'cfg' or 'args' entries)")
    if isinstance(state.get("sharded"), dict) and state["model"] is None:
        raise ValueError(
            f"{path} is a sharded --fsdp2 checkpoint (its weights are in {state['sharded'].get('dir')}/ "
            f"beside it); make one file first: python -m unilm_vl.consolidate {path} --out FULL.pt"
        )
    return state


def read_fairseq_state(path: str) -> Dict[str, Any]:
    """The fairseq checkpoint at ``path`` as saved (``cfg`` a plain dict), read by :func:`load_checkpoint_file` and
    checked by :func:`check_fairseq_state`; for tools that edit or convert its tensors without building a model."""
    return check_fairseq_state(load_checkpoint_file(path), path)


# ----------------------------------------------------------------------------------------------------------------
# HF directories (save_pretrained of Kosmos2ForConditionalGeneration and its processor)
# ----------------------------------------------------------------------------------------------------------------
HF_SPM_NAME = "sentencepiece.bpe.model"
"""The sentencepiece model in an HF Kosmos-2 directory (the vocabulary file of HF's Kosmos-2 / XLM-R tokenizer)."""
HF_PROCESSOR_CONFIG, HF_IMAGE_PROCESSOR_CONFIG = "processor_config.json", "preprocessor_config.json"
HF_GENERATION_CONFIG, HF_TOKENIZER_CONFIG = "generation_config.json", "tokenizer_config.json"
_PIL_BICUBIC = 3


def is_hf_dir(path: str) -> bool:
    """Whether ``path`` is a directory with a ``config.json`` (what ``save_pretrained`` writes); the model type
    is checked when it is read (:func:`unilm_vl.convert.load_hf`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def hf_generation_config(hf_dir: str) -> Dict[str, Any]:
    """The ``generation_config.json`` of an HF directory (``{}`` without one): the decoding settings HF's
    ``generate`` starts from (:func:`unilm_vl.inference.kosmos2.preset_search_options` reads them)."""
    from .data.jsonio import read_json

    path = os.path.join(hf_dir, HF_GENERATION_CONFIG)
    return dict(read_json(path, "HF generation config")) if os.path.isfile(path) else {}


def hf_tokenizer_config(hf_dir: str) -> Dict[str, Any]:
    """The ``tokenizer_config.json`` of an HF directory (``{}`` without one); its ``clean_up_tokenization_spaces``
    changes how HF decodes text (:func:`unilm_vl.inference.kosmos2.hf_text`)."""
    from .data.jsonio import read_json

    path = os.path.join(hf_dir, HF_TOKENIZER_CONFIG)
    return dict(read_json(path, "HF tokenizer config")) if os.path.isfile(path) else {}


def hf_image_view(hf_dir: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Optional[str]:
    """The image view (``"squash"`` or ``"crop"``, :data:`unilm_vl.inference.kosmos2.IMAGE_VIEWS`) that the HF
    directory's image processor (a ``CLIPImageProcessor``: ``preprocessor_config.json`` as transformers 4 writes
    it, else the ``image_processor`` entry of ``processor_config.json`` as transformers 5 does) describes, or None
    without one:
    ``size = {height: S, width: S}`` is a squash to S x S, ``size = {shortest_edge: S}`` + centre crop S the crop
    view; both bicubic, scaled by 1/255 and normalised. Settings our views do not reproduce (another resampling,
    mean/std or size) are logged as a warning: decoding then sees other pixels than HF's processor gives."""
    from .data.jsonio import read_json

    path = os.path.join(hf_dir, HF_IMAGE_PROCESSOR_CONFIG)
    if os.path.isfile(path):
        p = read_json(path, "HF image processor config")
    else:
        path = os.path.join(hf_dir, HF_PROCESSOR_CONFIG)
        p = read_json(path, "HF processor config").get("image_processor") if os.path.isfile(path) else None
        if not isinstance(p, dict):
            return None
    size, crop = p.get("size") or {}, p.get("crop_size") or {}
    view, problems = None, []
    if size.get("height") == size.get("width") == image_size and (
        not p.get("do_center_crop", True) or crop.get("height") == crop.get("width") == image_size
    ):
        view = "squash"
    elif (
        size.get("shortest_edge") == image_size
        and p.get("do_center_crop", True)
        and crop.get("height", image_size) == crop.get("width", image_size) == image_size
    ):
        view = "crop"
    else:
        problems.append(
            f"size {size} / crop {crop if p.get('do_center_crop', True) else None} (the model takes "
            f"{image_size} x {image_size})"
        )
    if p.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
        problems.append(f"resample {p.get('resample')} (ours: bicubic)")
    if not p.get("do_resize", True) or not p.get("do_rescale", True) or not p.get("do_normalize", True):
        problems.append("do_resize / do_rescale / do_normalize off")
    if abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor {p.get('rescale_factor')}")
    for name, ours in (("image_mean", mean), ("image_std", std)):
        theirs = p.get(name)
        if theirs is not None and any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(theirs, ours)):
            problems.append(f"{name} {theirs} (ours: {list(ours)})")
    if problems:
        logger.warning(
            "%s: the image processor's %s differ from what decoding uses (%s view): images reach the "
            "model differently than through HF's processor",
            path,
            "; ".join(problems),
            view or "squash",
        )
    return view


def read_hf_dir_state(path: str, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The fairseq checkpoint dict of the HF Kosmos-2 directory ``path`` (``save_pretrained`` of
    ``Kosmos2ForConditionalGeneration`` and its processor), converted in memory by
    :func:`unilm_vl.convert.hf_dir_checkpoint_state`: the vocabulary files and grid are those of the directory
    unless ``overrides`` names ``spm_model`` / ``dict_path`` / ``location_bin_size``. Raises ``ValueError``
    naming ``path`` for a directory that is not an HF model directory or not a convertible Kosmos-2."""
    from .convert import hf_dir_checkpoint_state

    if not is_hf_dir(path):
        raise ValueError(
            f"{path} is a directory without config.json: a checkpoint is a .pt file or a directory "
            "written by HF's save_pretrained"
        )
    overrides = overrides or {}
    return hf_dir_checkpoint_state(
        path,
        spm_model=overrides.get("spm_model"),
        dict_path=overrides.get("dict_path"),
        location_bin_size=overrides.get("location_bin_size"),
    )


def load_fairseq_checkpoint(path: str, arg_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A fairseq checkpoint read by :func:`read_fairseq_state` (a directory: :func:`read_hf_dir_state`) and
    prepared as fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` prepares it (``cfg`` as an OmegaConf config
    with ``arg_overrides`` applied, old layouts upgraded), for ``load_model_ensemble_and_task([path], state=...)``."""
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name
    from omegaconf import OmegaConf

    state = read_hf_dir_state(path, arg_overrides) if os.path.isdir(path) else read_fairseq_state(path)
    if state.get("args") is not None and arg_overrides:
        for name, value in arg_overrides.items():
            setattr(state["args"], name, value)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    # fairseq's own upgrade of old checkpoint layouts (the last step of load_checkpoint_to_cpu)
    return checkpoint_utils._upgrade_state_dict(state)


def load_model(path: str, overrides: Optional[Mapping[str, Any]] = None, device: str = "cpu") -> Tuple[Any, Any, Any]:
    """``(model, cfg, task)`` of the unilm_vl checkpoint at ``path``: the task and model that fairseq builds from
    its config (``overrides`` replace config fields by name, e.g. ``{"vision_pretrained": None}``), the weights
    loaded, the model on ``device`` in eval mode. ``path`` may also be an HF Kosmos-2 directory
    (:func:`read_hf_dir_state`: converted on load, nothing written).

    The file is read by :func:`load_fairseq_checkpoint` (no code from it runs; a missing file, a file that is not
    a fairseq checkpoint and a sharded ``--fsdp2`` checkpoint raise naming it). A ``ValueError`` raised while
    the task or model is built from it (e.g. a vocabulary that is not the checkpoint's) is re-raised with the
    same type and ``path`` in front of its message."""
    from fairseq import checkpoint_utils

    overrides = dict(overrides) if overrides else None
    state = load_fairseq_checkpoint(path, overrides)
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides, state=state)
    except ValueError as exc:
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc
    return models[0].to(device).eval(), cfg, task


def _naming(exc: ValueError, path: str) -> ValueError:
    """A new exception of ``exc``'s type with ``path`` in front of its message, or ``exc`` itself when the message
    already starts with the path or the type cannot be rebuilt from one message."""
    if str(exc).startswith(str(path)):
        return exc
    try:
        return type(exc)(f"{path}: {exc}")
    except TypeError:
        return exc


@contextlib.contextmanager
def fairseq_reads_safely() -> Iterator[None]:
    """Within the block, fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (what ``fairseq-generate`` and
    ``load_model_ensemble`` call) is :func:`load_fairseq_checkpoint`, so a fairseq command line run by this
    package reads checkpoints as every other tool does: no code from the file runs, and a refused, foreign or
    sharded file raises one ``ValueError`` naming it. A shim because fairseq has no hook for its checkpoint
    reader; only local files are read (fairseq's ``PathManager`` URLs are not)."""
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        return load_fairseq_checkpoint(path, arg_overrides)

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    try:
        yield
    finally:
        checkpoint_utils.load_checkpoint_to_cpu = original


def load_kosmos2_inference(
    checkpoint: str,
    search: "SearchConfig",
    image_view: Optional[str] = None,
    seed: int = 1,
    cpu: bool = False,
    fp16: bool = False,
    spm_model: Optional[str] = None,
    dict_path: Optional[str] = None,
    device: Optional[str] = None,
) -> "Kosmos2Inference":
    """The :class:`~unilm_vl.inference.kosmos2.Kosmos2Inference` engine of a ``kosmos2`` checkpoint (a ``.pt``
    file or an HF Kosmos-2 directory, converted on load) on ``device`` (default: CUDA when available, unless
    ``cpu``), in half precision with ``fp16``; ``spm_model`` / ``dict_path`` replace the vocabulary files the
    checkpoint names. ``image_view`` None: the view of an HF directory's image processor (:func:`hf_image_view`),
    else ``"squash"``. The vision tower's pretrained weights are not fetched (the checkpoint holds them). A
    vocabulary that does not fit the checkpoint raises :class:`unilm_vl.models.kosmos2.VocabularyMismatchError`
    naming the checkpoint."""
    import torch

    from .inference.kosmos2 import Kosmos2Inference

    overrides = {"vision_pretrained": None}  # the checkpoint holds the tower's weights
    if spm_model:
        overrides["spm_model"] = spm_model
    if dict_path:
        overrides["dict_path"] = dict_path
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    model, _, task = load_model(checkpoint, overrides, str(device))
    if fp16:
        model.half()
    hf_dir = is_hf_dir(checkpoint)
    if image_view is None:
        image_view = hf_dir and hf_image_view(checkpoint, task.image_size, task.image_mean, task.image_std) or "squash"
    generation_config = hf_generation_config(checkpoint) if hf_dir else None
    clean_up_spaces = bool(hf_tokenizer_config(checkpoint).get("clean_up_tokenization_spaces")) if hf_dir else False
    return Kosmos2Inference(
        model, task, search, image_view, seed, torch.device(device), generation_config, clean_up_spaces
    )
