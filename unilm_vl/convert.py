"""Checkpoint conversion for Kosmos-2: the released ``kosmos-2.pt`` layout, our fairseq checkpoints and HF
transformers' ``Kosmos2ForConditionalGeneration`` (the ``kosmos-2.pt`` of microsoft/unilm ``kosmos-2/README.md``;
HF ``transformers/models/kosmos2/modeling_kosmos2.py``).

    python -m unilm_vl.convert kosmos2 --from-release kosmos-2.pt --out OURS.pt [--spm-model M --dict-path D]
    python -m unilm_vl.convert kosmos2 --to-hf --checkpoint OURS.pt --out HF_DIR
    python -m unilm_vl.convert kosmos2 --from-hf HF_DIR --out OURS.pt [--spm-model M --dict-path D]
    python -m unilm_vl.convert kosmos2 --write-dict --spm-model sentencepiece.bpe.model --out dict.txt

With ``--dict-path`` the written checkpoint's vocabulary must be that ``dict.txt`` plus the grounding tokens of
``--location-bin-size`` (default 32, the release's): a model with another number of token embeddings is refused
(:func:`unilm_vl.models.kosmos2.check_vocab_rows`) instead of failing later inside torch's ``load_state_dict``.
Input files are read without running code from them (:func:`unilm_vl.checkpoint.load_checkpoint_file`; our
checkpoints through :func:`unilm_vl.checkpoint.read_fairseq_state`, which also refuses a sharded ``--fsdp2`` file
with the command that consolidates it); any refused or unconvertible input stops the command with one ``error:``
line and exit code 2.

Three key layouts of the same weights (``{i}`` = layer index, ``=`` = the same name as ours under the prefix)::

    ours (Kosmos2Module)               released kosmos-2.pt             HF Kosmos2ForConditionalGeneration
    vision.visual.                     img_model.visual.                vision_model.model.
      class_embedding                    =                                embeddings.class_embedding
      positional_embedding               =                                embeddings.position_embedding.weight
      conv1.weight                       =                                embeddings.patch_embedding.weight
      ln_pre / ln_post                   =                                pre_layrnorm / post_layernorm
      transformer.resblocks.{i}.         =                                encoder.layers.{i}.
        attn.in_proj_{weight,bias}         ts_attn.{q,k,v}_proj.*           self_attn.{q,k,v}_proj.*
          (packed q;k;v rows)                (split)                          (split)
        attn.out_proj                      ts_attn.out_proj                 self_attn.out_proj
        ln_1 / ln_2                        =                                layer_norm1 / layer_norm2
        mlp.c_fc / mlp.c_proj              =                                mlp.fc1 / mlp.fc2
    connector.*                        img_connector.*                  image_to_text_projection.*
    decoder.output_projection.weight   gpt_model.decoder.(=)            text_model.lm_head.weight  (all tied)
    decoder.*                          gpt_model.decoder.*              text_model.model.*

The decoder's sub-LN names (``self_attn.inner_attn_ln``, ``ffn.ffn_layernorm``), the sqrt(D) embedding scale
(applied after the image rows are spliced in) and the sinusoid positions (pad row ``pad_idx``, first token at
``pad_idx + 1``) are the same in all three, so they convert by name only; the HF config must say
``scale_embedding=True`` and ``pad_token_id = pad_idx``. The release has two keys nothing reads
(:data:`RELEASE_UNUSED_KEYS`); every other key of every layout must be used, and a missing, unexpected or
mis-shaped key raises :class:`ConversionError` listing them.

HF limits (errors, not silent changes): the HF connector uses the text model's head count, so the connector and
the decoder must have the same number of heads; the HF text blocks always have the sub-LN norms; the HF vision
tower must be a plain open_clip ViT (learned positions, ln_pre, no LayerScale/attentional pooling) with
``gelu`` or ``quick_gelu``; HF's connector attention dropout is the text model's (training only, noted as a
warning). ``transformers`` is needed only to write an HF directory (``--to-hf``); reading one uses the json config
and safetensors files directly. Unlike HF's own conversion script, ``--to-hf`` does not write
``no_repeat_ngram_size=3`` (the original demo's decoding setting) into the config: decoding options are the
caller's, passed to ``generate``. No image processor or tokenizer files are written (weights and config only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoint import HF_PROCESSOR_CONFIG, HF_SPM_NAME, is_hf_dir, load_checkpoint_file, read_fairseq_state
from .data.grounding import DEFAULT_NUM_BINS, build_kosmos2_dictionary
from .data.jsonio import read_json
from .modules.kosmos2 import (
    Kosmos2Config,
    Kosmos2ConnectorConfig,
    Kosmos2DecoderConfig,
    Kosmos2VisionConfig,
    kosmos2_xl_config,
)

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

RELEASE_UNUSED_KEYS = ("gpt_model.decoder.embed_positions._float_tensor", "gpt_model.decoder.self_attn_sope.scale")
"""Keys of the released checkpoint that the forward never reads (microsoft/unilm kosmos-2/): fairseq's sinusoid
dtype marker buffer and the buffer of the SoPE module whose call is commented out."""

FAIRSEQ_PAD, FAIRSEQ_BOS, FAIRSEQ_EOS = 1, 0, 2
"""Special ids of every fairseq dictionary (our kosmos2 task's vocabulary included)."""

_TORCHSCALE_TO_HF_ACT = {"gelu": "gelu", "relu": "relu", "swish": "silu"}
_HF_TO_TORCHSCALE_ACT = {"gelu": "gelu", "relu": "relu", "silu": "swish", "swish": "swish"}

# Defaults of transformers 5.23.0's Kosmos2TextConfig / Kosmos2VisionConfig (models/kosmos2/configuration_kosmos2.py):
# a saved config.json may leave out values equal to these.
HF_TEXT_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=65037,
    max_position_embeddings=2048,
    embed_dim=2048,
    layers=24,
    ffn_dim=8192,
    attention_heads=32,
    activation_function="gelu",
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    layerdrop=0.0,
    layer_norm_eps=1e-5,
    scale_embedding=True,
    tie_word_embeddings=True,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    add_cross_attention=False,
)
HF_VISION_DEFAULTS: Dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
)
HF_LATENT_QUERY_DEFAULT = 64


class ConversionError(ValueError):
    """Weights or configs that cannot be converted exactly."""


# ----------------------------------------------------------------------------------------------------------------
# Geometry: every tensor shape of our module, computed from the configs (no model is built, so the 1.6B shape
# converts without allocating it)
# ----------------------------------------------------------------------------------------------------------------
_PLAIN_VIT_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "output_tokens"}


@dataclass
class VisionGeometry:
    """The open_clip ViT behind a ``Kosmos2VisionConfig``, as HF's Kosmos-2 vision model describes it."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    quick_gelu: bool
    layer_norm_eps: float = 1e-5  # open_clip's towers use nn.LayerNorm's default

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{what} {value} is not square; HF Kosmos-2 takes one size")
        value = value[0]
    return int(value)


def vision_geometry(cfg: Kosmos2VisionConfig) -> VisionGeometry:
    """Sizes of the open_clip tower of ``cfg`` (its ``open_clip_config``, else the registry config named
    ``cfg.model_name``); raises for towers HF's vision model cannot express (timm towers, LayerScale, no ln_pre,
    attentional pooling, ...)."""
    import open_clip

    from .modules import clip  # noqa: F401  (registers our open_clip_configs/)

    model_cfg = cfg.open_clip_config or open_clip.get_model_config(cfg.model_name)
    if model_cfg is None:
        raise ConversionError(f"unknown open_clip model {cfg.model_name!r}")
    vcfg = model_cfg.get("vision_cfg", {})
    extra = sorted(set(vcfg) - _PLAIN_VIT_KEYS)
    if extra:
        raise ConversionError(
            f"open_clip tower {cfg.model_name!r} uses {extra}: not a plain ViT that HF's Kosmos-2 "
            "vision model (or the released layout) can express"
        )
    width = int(vcfg["width"])
    head_width = int(vcfg.get("head_width", 64))
    if width % head_width:
        raise ConversionError(f"{cfg.model_name}: width {width} is not a multiple of head_width {head_width}")
    return VisionGeometry(
        width=width,
        layers=int(vcfg["layers"]),
        heads=width // head_width,
        mlp_dim=int(width * float(vcfg.get("mlp_ratio", 4.0))),
        patch_size=_square(vcfg["patch_size"], "patch_size"),
        image_size=_square(vcfg["image_size"], "image_size"),
        quick_gelu=bool(cfg.force_quick_gelu or model_cfg.get("quick_gelu", False)),
    )


def expected_shapes(cfg: Kosmos2Config) -> Dict[str, Tuple[int, ...]]:
    """Every key of ``Kosmos2Module(cfg).state_dict()`` with its shape."""
    g, c, d = vision_geometry(cfg.vision), cfg.connector, cfg.decoder
    W, M, D, F_, V = g.width, g.mlp_dim, d.embed_dim, d.ffn_embed_dim, d.vocab_size
    shapes: Dict[str, Tuple[int, ...]] = {}
    v = "vision.visual."
    shapes[v + "class_embedding"] = (W,)
    shapes[v + "positional_embedding"] = (g.num_tokens, W)
    shapes[v + "conv1.weight"] = (W, 3, g.patch_size, g.patch_size)
    for ln in ("ln_pre", "ln_post"):
        shapes[f"{v}{ln}.weight"] = shapes[f"{v}{ln}.bias"] = (W,)
    for i in range(g.layers):
        b = f"{v}transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[f"{b}{ln}.weight"] = shapes[f"{b}{ln}.bias"] = (W,)
        shapes[b + "attn.in_proj_weight"], shapes[b + "attn.in_proj_bias"] = (3 * W, W), (3 * W,)
        shapes[b + "attn.out_proj.weight"], shapes[b + "attn.out_proj.bias"] = (W, W), (W,)
        shapes[b + "mlp.c_fc.weight"], shapes[b + "mlp.c_fc.bias"] = (M, W), (M,)
        shapes[b + "mlp.c_proj.weight"], shapes[b + "mlp.c_proj.bias"] = (W, M), (W,)
    shapes["connector.latent_query"] = (c.latent_query_num, D)
    shapes["connector.dense.weight"], shapes["connector.dense.bias"] = (D, W), (D,)
    for p in ("q", "k", "v", "out"):
        shapes[f"connector.x_attn.{p}_proj.weight"], shapes[f"connector.x_attn.{p}_proj.bias"] = (D, D), (D,)
    shapes["decoder.embed_tokens.weight"] = shapes["decoder.output_projection.weight"] = (V, D)
    for i in range(d.layers):
        b = f"decoder.layers.{i}."
        for p in ("q", "k", "v", "out"):
            shapes[f"{b}self_attn.{p}_proj.weight"], shapes[f"{b}self_attn.{p}_proj.bias"] = (D, D), (D,)
        norms = [("self_attn_layer_norm", D), ("final_layer_norm", D)]
        if d.subln:
            norms += [("self_attn.inner_attn_ln", D), ("ffn.ffn_layernorm", F_)]
        for name, dim in norms:
            shapes[f"{b}{name}.weight"] = shapes[f"{b}{name}.bias"] = (dim,)
        shapes[b + "ffn.fc1.weight"], shapes[b + "ffn.fc1.bias"] = (F_, D), (F_,)
        shapes[b + "ffn.fc2.weight"], shapes[b + "ffn.fc2.bias"] = (D, F_), (D,)
    shapes["decoder.layer_norm.weight"] = shapes["decoder.layer_norm.bias"] = (D,)
    return shapes


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(state: Mapping[str, torch.Tensor], cfg: Kosmos2Config, what: str = "state dict") -> None:
    """Raise :class:`ConversionError` listing missing, unexpected and mis-shaped keys of a Kosmos2Module state
    dict, and when the tied embedding and output projection differ."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    bad = [f"{k} {tuple(state[k].shape)} != {want[k]}" for k in want if k in state and tuple(state[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if bad:
        problems.append(f"wrong shapes: {_listing(bad)}")
    if problems:
        raise ConversionError(f"{what} does not match the Kosmos-2 config: " + "; ".join(problems))
    emb, out = state["decoder.embed_tokens.weight"], state["decoder.output_projection.weight"]
    if emb is not out and not torch.equal(emb, out):
        raise ConversionError(
            f"{what}: decoder.output_projection.weight differs from decoder.embed_tokens.weight but Kosmos-2 ties them"
        )


# ----------------------------------------------------------------------------------------------------------------
# Renaming engine: templates with {i}; ours' packed in_proj <-> three split projections
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """How our keys are named in another layout. ``renames``: (our template, their template) pairs, first match
    wins; ``qkv``: (our in_proj template with {w} = weight|bias, their template with {p} = q|k|v and {w})."""

    name: str
    renames: Tuple[Tuple[str, str], ...]
    qkv: Tuple[str, str]


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> "re.Pattern[str]":
    return re.compile(
        re.escape(template)
        .replace(r"\{i\}", r"(?P<i>\d+)")
        .replace(r"\{w\}", r"(?P<w>weight|bias)")
        .replace(r"\{p\}", r"(?P<p>q|k|v)")
        .replace(r"\{rest\}", r"(?P<rest>.+)")
        + r"$"
    )


_VIT_BLOCK_RENAMES = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)

RELEASE_LAYOUT = _Layout(
    name="release",
    renames=(
        (
            "vision.visual.transformer.resblocks.{i}.attn.out_proj.",
            "img_model.visual.transformer.resblocks.{i}.ts_attn.out_proj.",
        ),
        ("vision.visual.", "img_model.visual."),
        ("connector.", "img_connector."),
        ("decoder.", "gpt_model.decoder."),
    ),
    qkv=(
        "vision.visual.transformer.resblocks.{i}.attn.in_proj_{w}",
        "img_model.visual.transformer.resblocks.{i}.ts_attn.{p}_proj.{w}",
    ),
)

HF_LAYOUT = _Layout(
    name="HF",
    renames=(
        ("vision.visual.class_embedding", "vision_model.model.embeddings.class_embedding"),
        ("vision.visual.positional_embedding", "vision_model.model.embeddings.position_embedding.weight"),
        ("vision.visual.conv1.weight", "vision_model.model.embeddings.patch_embedding.weight"),
        ("vision.visual.ln_pre.", "vision_model.model.pre_layrnorm."),
        ("vision.visual.ln_post.", "vision_model.model.post_layernorm."),
        *(
            (f"vision.visual.transformer.resblocks.{{i}}.{a}.", f"vision_model.model.encoder.layers.{{i}}.{b}.")
            for a, b in _VIT_BLOCK_RENAMES
        ),
        ("connector.", "image_to_text_projection."),
        ("decoder.output_projection.weight", "text_model.lm_head.weight"),
        ("decoder.", "text_model.model."),
    ),
    qkv=(
        "vision.visual.transformer.resblocks.{i}.attn.in_proj_{w}",
        "vision_model.model.encoder.layers.{i}.self_attn.{p}_proj.{w}",
    ),
)


def _rename_one(key: str, src: str, dst: str) -> Optional[str]:
    """``key`` renamed from template ``src`` to ``dst`` (a prefix template when both end in '.'), or None."""
    prefix = src.endswith(".")
    match = _pattern(src + "{rest}" if prefix else src).match(key)
    if not match:
        return None
    return dst.replace("{i}", match.groupdict().get("i") or "") + (match.group("rest") if prefix else "")


def _export(state: Mapping[str, torch.Tensor], layout: _Layout) -> StateDict:
    """Our keys -> ``layout``'s keys (packed in_proj split into q, k, v)."""
    out: StateDict = {}
    unknown = []
    qkv_ours = _pattern(layout.qkv[0])
    for key, value in state.items():
        match = qkv_ours.match(key)
        if match:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[layout.qkv[1].format(i=match.group("i"), p=part, w=match.group("w"))] = chunk.clone()
            continue
        for src, dst in layout.renames:
            new = _rename_one(key, src, dst)
            if new is not None:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"no {layout.name} name for our keys: {_listing(unknown)}")
    return out


def _import(state: Mapping[str, torch.Tensor], layout: _Layout, ignore: Sequence[str] = ()) -> StateDict:
    """``layout``'s keys -> ours (q, k, v packed back into in_proj); keys in ``ignore`` are dropped, any other key
    without a rule raises."""
    out: StateDict = {}
    unknown, pieces = [], {}
    qkv_theirs = _pattern(layout.qkv[1])
    for key, value in state.items():
        if key in ignore:
            continue
        match = qkv_theirs.match(key)
        if match:
            target = layout.qkv[0].format(i=match.group("i"), w=match.group("w"))
            pieces.setdefault(target, {})[match.group("p")] = value
            continue
        for src, dst in layout.renames:
            new = _rename_one(key, dst, src)
            if new is not None:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"unexpected {layout.name} keys (no rule maps them): {_listing(unknown)}")
    incomplete = [f"{k} (has {''.join(sorted(p))})" for k, p in pieces.items() if set(p) != set("qkv")]
    if incomplete:
        raise ConversionError(f"{layout.name} attention projections lack q, k or v for: {_listing(incomplete)}")
    for target, parts in pieces.items():
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Released kosmos-2.pt
# ----------------------------------------------------------------------------------------------------------------
def from_release_state_dict(release: Mapping[str, torch.Tensor], cfg: Optional[Kosmos2Config] = None) -> StateDict:
    """The released ``state["model"]`` -> a strict Kosmos2Module state dict for ``cfg`` (default: the released
    shape, :func:`kosmos2_xl_config`). Only :data:`RELEASE_UNUSED_KEYS` may go unused; anything else unexpected,
    missing or mis-shaped raises :class:`ConversionError` listing the keys."""
    cfg = cfg or kosmos2_xl_config()
    ours = _import(release, RELEASE_LAYOUT, ignore=RELEASE_UNUSED_KEYS)
    check_state_dict(ours, cfg, "the released checkpoint")
    return ours


def to_release_state_dict(
    state: Mapping[str, torch.Tensor], cfg: Kosmos2Config, include_unused: bool = True
) -> StateDict:
    """Inverse of :func:`from_release_state_dict`. With ``include_unused`` the two unused release buffers are added
    with the values their modules would hold (fairseq's 1-element ``_float_tensor``, written as 0, and torchscale's
    xPos ``scale`` for the decoder's head width), so the key set is the release's exactly."""
    check_state_dict(state, cfg, "our state dict")
    out = _export(state, RELEASE_LAYOUT)
    if include_unused:
        head_dim = cfg.decoder.embed_dim // cfg.decoder.attention_heads
        out[RELEASE_UNUSED_KEYS[0]] = torch.zeros(1)
        out[RELEASE_UNUSED_KEYS[1]] = (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)
    return out


# ----------------------------------------------------------------------------------------------------------------
# HF transformers Kosmos2ForConditionalGeneration
# ----------------------------------------------------------------------------------------------------------------
def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: Kosmos2Config) -> StateDict:
    """Our state dict -> ``Kosmos2ForConditionalGeneration`` keys (``text_model.lm_head.weight`` included; HF ties
    it to the embedding)."""
    check_state_dict(state, cfg, "our state dict")
    return _export(state, HF_LAYOUT)


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: Kosmos2Config) -> StateDict:
    """HF keys -> ours. A missing ``text_model.lm_head.weight`` (dropped by ``save_pretrained`` when tied) is the
    embedding; a present one must equal it."""
    ours = _import(hf_state, HF_LAYOUT)
    if "decoder.output_projection.weight" not in ours and "decoder.embed_tokens.weight" in ours:
        ours["decoder.output_projection.weight"] = ours["decoder.embed_tokens.weight"]
    check_state_dict(ours, cfg, "the HF checkpoint")
    return ours


def hf_config_dict(cfg: Kosmos2Config) -> Dict[str, Any]:
    """Keyword arguments of HF ``Kosmos2Config`` (``text_config``/``vision_config`` as dicts) for ``cfg``. Raises
    for what HF's Kosmos-2 cannot express."""
    d, c, g = cfg.decoder, cfg.connector, vision_geometry(cfg.vision)
    if c.position_embedding != "none" or c.locality_sigma > 0:
        raise ConversionError(
            f"HF's Kosmos-2 connector has neither position embeddings nor a locality prior; this "
            f"model's are {c.position_embedding!r} and sigma {c.locality_sigma}"
        )
    if not d.subln:
        raise ConversionError("HF Kosmos-2 text blocks always have the sub-LN norms; a subln=False decoder has none")
    if c.attention_heads != d.attention_heads:
        raise ConversionError(
            f"HF's connector uses the text model's {d.attention_heads} heads; ours has {c.attention_heads}"
        )
    if d.activation_fn not in _TORCHSCALE_TO_HF_ACT:
        raise ConversionError(f"decoder activation {d.activation_fn!r} has no HF name")
    if c.attention_dropout != d.attention_dropout:
        logger.warning(
            "HF's connector attention dropout is the text attention dropout %s (ours: %s); this only "
            "matters in training",
            d.attention_dropout,
            c.attention_dropout,
        )
    text = dict(
        vocab_size=d.vocab_size,
        max_position_embeddings=d.max_positions,
        embed_dim=d.embed_dim,
        layers=d.layers,
        ffn_dim=d.ffn_embed_dim,
        attention_heads=d.attention_heads,
        activation_function=_TORCHSCALE_TO_HF_ACT[d.activation_fn],
        dropout=d.dropout,
        attention_dropout=d.attention_dropout,
        activation_dropout=d.activation_dropout,
        layerdrop=0.0,
        layer_norm_eps=d.layernorm_eps,
        scale_embedding=True,
        tie_word_embeddings=True,
        pad_token_id=d.pad_idx,
        bos_token_id=FAIRSEQ_BOS,
        eos_token_id=FAIRSEQ_EOS,
        add_cross_attention=False,
    )
    vision = dict(
        hidden_size=g.width,
        intermediate_size=g.mlp_dim,
        num_hidden_layers=g.layers,
        num_attention_heads=g.heads,
        num_channels=3,
        image_size=g.image_size,
        patch_size=g.patch_size,
        hidden_act="quick_gelu" if g.quick_gelu else "gelu",
        layer_norm_eps=g.layer_norm_eps,
        attention_dropout=0.0,
    )
    return dict(text_config=text, vision_config=vision, latent_query_num=c.latent_query_num, tie_word_embeddings=True)


def open_clip_vit_config(geometry: VisionGeometry) -> Dict[str, Any]:
    """An open_clip model config (the layout of open_clip's ``model_configs/*.json``) whose plain ViT has exactly
    ``geometry``, for a tower that no registry config has. Its text tower is a stub (one 8-wide layer) that
    :class:`~unilm_vl.modules.kosmos2.Kosmos2VisionTower` discards, as it discards every CLIP text tower.
    Raises :class:`ConversionError` when open_clip's ViT cannot have the geometry (width not a multiple of the
    heads, an MLP width that ``width * mlp_ratio`` does not give back)."""
    if geometry.width % geometry.heads:
        raise ConversionError(f"vision width {geometry.width} is not a multiple of its {geometry.heads} heads")
    vision = dict(
        image_size=geometry.image_size,
        layers=geometry.layers,
        width=geometry.width,
        head_width=geometry.width // geometry.heads,
        mlp_ratio=geometry.mlp_dim / geometry.width,
        patch_size=geometry.patch_size,
    )
    if int(geometry.width * vision["mlp_ratio"]) != geometry.mlp_dim:
        raise ConversionError(
            f"open_clip's ViT cannot have an MLP width of {geometry.mlp_dim} with width "
            f"{geometry.width} (it computes int(width * mlp_ratio))"
        )
    # one text layer: open_clip's init divides by the layer count (layers=0 raised ZeroDivisionError)
    return dict(
        embed_dim=geometry.width,
        vision_cfg=vision,
        text_cfg=dict(context_length=1, vocab_size=1, width=8, heads=1, layers=1),
    )


def open_clip_vit_name(geometry: VisionGeometry) -> str:
    """The open_clip name under which :func:`open_clip_vit_config` of ``geometry`` is registered (one name per
    geometry, so a registered name always means the same tower)."""
    g = geometry
    return f"unilm-vl-kosmos2-vit-w{g.width}-l{g.layers}-h{g.heads}-m{g.mlp_dim}-p{g.patch_size}-s{g.image_size}"


def find_open_clip_tower(geometry: VisionGeometry, prefer: Optional[str] = None) -> Kosmos2VisionConfig:
    """The open_clip registry name (``prefer`` first, then the registry in order) whose plain ViT has exactly this
    geometry; when none does, a tower config carrying :func:`open_clip_vit_config` (built in memory, stored with
    the checkpoints written from it: never written into the installed open_clip). The registry entry under
    the built config's name (registered in memory by an earlier load in this process) is skipped, so the config
    goes with every checkpoint written from this geometry."""
    import open_clip

    from .modules import clip  # noqa: F401

    generated = open_clip_vit_name(geometry)
    if prefer == generated:
        prefer = None
    names = ([prefer] if prefer else []) + [n for n in open_clip.list_models() if n not in (prefer, generated)]
    for name in names:
        model_cfg = open_clip.get_model_config(name)
        if not model_cfg or "vision_cfg" not in model_cfg:
            continue
        if model_cfg.get("quick_gelu", False) and not geometry.quick_gelu:
            continue
        candidate = Kosmos2VisionConfig(model_name=name, pretrained=None, force_quick_gelu=geometry.quick_gelu)
        try:
            if vision_geometry(candidate) == geometry:
                return candidate
        except (ConversionError, KeyError, TypeError, ValueError):
            continue
    if prefer:
        raise ConversionError(f"open_clip model {prefer!r} does not have the vision geometry {geometry}")
    model_cfg = open_clip_vit_config(geometry)
    candidate = Kosmos2VisionConfig(
        model_name=generated, pretrained=None, force_quick_gelu=geometry.quick_gelu, open_clip_config=model_cfg
    )
    if vision_geometry(candidate) != geometry:
        raise ConversionError(f"no open_clip ViT config expresses the vision geometry {geometry}")
    logger.info(
        "no open_clip registry config has the vision geometry %s: using %s, built from it (stored with the checkpoint)",
        geometry,
        candidate.model_name,
    )
    return candidate


def config_from_hf(hf_config: Mapping[str, Any], vision_model: Optional[str] = None) -> Kosmos2Config:
    """Our :class:`Kosmos2Config` from an HF Kosmos-2 config (the dict of ``config.json``; absent fields take
    transformers' defaults). ``vision_model`` names the open_clip tower to try first."""
    text = {**HF_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vision = {**HF_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    problems = []
    if not text["scale_embedding"]:
        problems.append("scale_embedding=False (our decoder always scales by sqrt(D))")
    if text["add_cross_attention"]:
        problems.append("add_cross_attention=True")
    if text["activation_function"] not in _HF_TO_TORCHSCALE_ACT:
        problems.append(f"text activation {text['activation_function']!r}")
    if vision["hidden_act"] not in ("gelu", "quick_gelu"):
        problems.append(f"vision activation {vision['hidden_act']!r}")
    if float(vision["layer_norm_eps"]) != 1e-5:
        problems.append(f"vision layer_norm_eps {vision['layer_norm_eps']} (open_clip towers use 1e-5)")
    if int(vision["num_channels"]) != 3:
        problems.append(f"num_channels {vision['num_channels']}")
    if text["pad_token_id"] is None:
        problems.append("pad_token_id None (positions count from pad_token_id + 1)")
    if problems:
        raise ConversionError("HF config not expressible by our Kosmos-2: " + "; ".join(problems))
    if float(text.get("layerdrop") or 0.0) > 0:
        logger.warning("HF layerdrop %s is dropped (training only; our decoder has none)", text["layerdrop"])
    width, heads = int(vision["hidden_size"]), int(vision["num_attention_heads"])
    geometry = VisionGeometry(
        width=width,
        layers=int(vision["num_hidden_layers"]),
        heads=heads,
        mlp_dim=int(vision["intermediate_size"]),
        patch_size=_square(vision["patch_size"], "patch_size"),
        image_size=_square(vision["image_size"], "image_size"),
        quick_gelu=vision["hidden_act"] == "quick_gelu",
    )
    return Kosmos2Config(
        vision=find_open_clip_tower(geometry, vision_model),
        connector=Kosmos2ConnectorConfig(
            latent_query_num=int(hf_config.get("latent_query_num", HF_LATENT_QUERY_DEFAULT)),
            attention_heads=int(text["attention_heads"]),
            attention_dropout=float(text["attention_dropout"]),
        ),
        decoder=Kosmos2DecoderConfig(
            vocab_size=int(text["vocab_size"]),
            embed_dim=int(text["embed_dim"]),
            layers=int(text["layers"]),
            attention_heads=int(text["attention_heads"]),
            ffn_embed_dim=int(text["ffn_dim"]),
            activation_fn=_HF_TO_TORCHSCALE_ACT[text["activation_function"]],
            dropout=float(text["dropout"]),
            attention_dropout=float(text["attention_dropout"]),
            activation_dropout=float(text["activation_dropout"]),
            subln=True,
            pad_idx=int(text["pad_token_id"]),
            max_positions=int(text["max_position_embeddings"]),
            layernorm_eps=float(text["layer_norm_eps"]),
        ),
    )


def save_hf(state: Mapping[str, torch.Tensor], cfg: Kosmos2Config, out_dir: str) -> None:
    """Write ``config.json`` + safetensors weights of a ``Kosmos2ForConditionalGeneration`` into ``out_dir``
    (needs transformers). The HF model is built from the config and loaded strictly before saving."""
    from transformers import Kosmos2Config as HFKosmos2Config
    from transformers import Kosmos2ForConditionalGeneration

    hf_state = to_hf_state_dict(state, cfg)
    model = Kosmos2ForConditionalGeneration(HFKosmos2Config(**hf_config_dict(cfg)))
    result = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"HF model rejected the converted weights: missing {_listing(missing)}; "
            f"unexpected {_listing(result.unexpected_keys)}"
        )
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)


def read_hf_dir(hf_dir: str) -> Tuple[Dict[str, Any], StateDict]:
    """(config.json dict, weights) of a saved HF model directory: ``model.safetensors``, a sharded safetensors
    index, or ``pytorch_model.bin``. transformers is not needed."""
    config = read_json(os.path.join(hf_dir, "config.json"), "HF config")
    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file

        files = (
            [single]
            if os.path.isfile(single)
            else sorted({os.path.join(hf_dir, f) for f in read_json(index, "safetensors index")["weight_map"].values()})
        )
        state: StateDict = {}
        for path in files:
            state.update(load_file(path))
        return config, state
    binary = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(binary):
        return config, load_checkpoint_file(binary)
    raise FileNotFoundError(f"no model.safetensors, safetensors index or pytorch_model.bin in {hf_dir}")


def load_hf(hf_dir: str, vision_model: Optional[str] = None) -> Tuple[StateDict, Kosmos2Config]:
    """(our state dict, our config) from an HF Kosmos-2 directory."""
    config, hf_state = read_hf_dir(hf_dir)
    if config.get("model_type") not in (None, "kosmos-2"):
        raise ConversionError(f"{hf_dir}: model_type {config.get('model_type')!r} is not kosmos-2")
    cfg = config_from_hf(config, vision_model)
    return from_hf_state_dict(hf_state, cfg), cfg


# ----------------------------------------------------------------------------------------------------------------
# HF directories as checkpoints: save_pretrained of the model (+ its processor: sentencepiece model, image processor)
# ----------------------------------------------------------------------------------------------------------------
SPM_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
"""Pieces 0, 1, 2 of a Kosmos-2 sentencepiece model: the fairseq index of every other piece is then its id + 1."""


def check_spm_layout(spm_model: str) -> None:
    """Raise :class:`ConversionError` unless the sentencepiece model numbers ``<unk> <s> </s>`` 0, 1, 2: the layout
    in which a piece's fairseq index is its spm id + 1 (the release's ``dict.txt``) and HF's Kosmos-2 tokenizer
    id (spm id + ``fairseq_offset`` 1), so both sides give the model the same ids."""
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    found = tuple(spm.id_to_piece(i) for i in range(min(3, spm.get_piece_size())))
    if found != SPM_SPECIAL_PIECES:
        raise ConversionError(
            f"{spm_model}: pieces 0-2 are {found}, not {SPM_SPECIAL_PIECES}: its ids would not be "
            "the HF Kosmos-2 tokenizer's (spm id + 1)"
        )


def infer_location_bin_size(vocab_size: int, spm_model: Optional[str], dict_path: Optional[str], what: str) -> int:
    """P of the P x P grid that makes ``vocab_size`` token embeddings the kosmos2 dictionary of ``dict_path`` (None:
    derived from ``spm_model``): ``vocab_size`` = base dictionary + ``<mask>`` + 11 tags + P * P. Raises
    :class:`ConversionError` naming the sizes when no P does."""
    from .data.grounding import kosmos2_added_symbols

    non_patch = len(kosmos2_added_symbols(1)) - 1
    base = len(build_kosmos2_dictionary(dict_path, 1, spm_model)) - non_patch - 1
    cells = vocab_size - base - non_patch
    side = math.isqrt(cells) if cells > 0 else 0
    if side < 1 or side * side != cells:
        raise ConversionError(
            f"{what} has {vocab_size} token embeddings: {dict_path or spm_model} gives {base} "
            f"symbols + <mask> and {non_patch - 1} tags, which leaves {cells} for the patch "
            "tokens, not a square number: not this vocabulary's model"
        )
    return side


def hf_dir_checkpoint_state(
    hf_dir: str,
    spm_model: Optional[str] = None,
    dict_path: Optional[str] = None,
    location_bin_size: Optional[int] = None,
    vision_model: Optional[str] = None,
    require_vocabulary: bool = True,
) -> Dict[str, Any]:
    """The fairseq checkpoint dict (:func:`our_checkpoint_state`) of the HF Kosmos-2 directory ``hf_dir``, built in
    memory: what :func:`unilm_vl.checkpoint.load_model` loads for a directory and ``convert --from-hf`` writes.

    The vocabulary: ``spm_model`` or the directory's ``sentencepiece.bpe.model`` (its pieces 0-2 must be
    ``<unk> <s> </s>``, :func:`check_spm_layout`), and ``dict_path`` or the dictionary derived from that model
    (the released ``dict.txt`` for the released model). ``location_bin_size`` (P) defaults to the grid that the
    model's token embeddings leave room for (:func:`infer_location_bin_size`; the processor's
    ``num_patch_index_tokens``, when written, must be P * P). A tower geometry that open_clip's registry lacks is
    built from the HF vision config (:func:`find_open_clip_tower`) and stored in the model config. Without a
    sentencepiece model: ``ConversionError`` when ``require_vocabulary`` (loading needs one), else the task config
    names none (P defaults to the release's 32)."""
    state, cfg = load_hf(hf_dir, vision_model)
    if spm_model is None and os.path.isfile(os.path.join(hf_dir, HF_SPM_NAME)):
        spm_model = os.path.join(hf_dir, HF_SPM_NAME)
    if spm_model is None and require_vocabulary:
        raise ConversionError(
            f"{hf_dir} has no {HF_SPM_NAME} and no sentencepiece model was given (HF's "
            "tokenizer.json alone is not read, and transformers >= 5 save_pretrained writes only "
            f"that: copy in the {HF_SPM_NAME} the processor was made from, as HF's hub "
            "directories have it, or pass --spm-model / spm_model=)"
        )
    if spm_model is not None:
        check_spm_layout(spm_model)
    if location_bin_size is None:
        location_bin_size = (
            infer_location_bin_size(cfg.decoder.vocab_size, spm_model, dict_path, hf_dir)
            if spm_model is not None or dict_path is not None
            else DEFAULT_NUM_BINS
        )
    processor_path = os.path.join(hf_dir, HF_PROCESSOR_CONFIG)
    if os.path.isfile(processor_path):
        patch_tokens = read_json(processor_path, "HF processor config").get("num_patch_index_tokens")
        if patch_tokens is not None and int(patch_tokens) != location_bin_size**2:
            raise ConversionError(
                f"{processor_path}: num_patch_index_tokens {patch_tokens} is not "
                f"{location_bin_size} x {location_bin_size}, the grid of the model's vocabulary"
            )
    return our_checkpoint_state(state, cfg, spm_model, dict_path, location_bin_size, what=hf_dir)


# ----------------------------------------------------------------------------------------------------------------
# Our fairseq checkpoints: state["model"] = {"net.<key>": tensor}, state["cfg"] = the fairseq config
# ----------------------------------------------------------------------------------------------------------------
def config_from_fairseq(model_cfg: Mapping[str, Any], vocab_size: int, pad_idx: int = FAIRSEQ_PAD) -> Kosmos2Config:
    """Our network config from the ``kosmos2`` model's fairseq config (what ``Kosmos2Model`` builds)."""
    from .models.kosmos2 import Kosmos2ModelConfig

    fields = {f.name for f in dataclasses.fields(Kosmos2ModelConfig)}
    m = dataclasses.asdict(Kosmos2ModelConfig())
    m.update({k: v for k, v in model_cfg.items() if k in fields})
    return Kosmos2Config(
        vision=Kosmos2VisionConfig(
            model_name=m["vision_model"],
            pretrained=None,
            force_quick_gelu=bool(m["vision_quick_gelu"]),
            open_clip_config=(json.loads(m["vision_config_json"]) if m.get("vision_config_json") else None),
        ),
        connector=Kosmos2ConnectorConfig(
            latent_query_num=m["latent_query_num"],
            attention_heads=m["connector_attention_heads"],
            attention_dropout=m["connector_attention_dropout"],
            position_embedding=str(m["connector_position_embedding"]),
            locality_sigma=float(m["connector_locality_sigma"]),
        ),
        decoder=Kosmos2DecoderConfig(
            vocab_size=vocab_size,
            embed_dim=m["decoder_embed_dim"],
            layers=m["decoder_layers"],
            attention_heads=m["decoder_attention_heads"],
            ffn_embed_dim=m["decoder_ffn_embed_dim"],
            activation_fn=m["activation_fn"],
            dropout=m["dropout"],
            attention_dropout=m["attention_dropout"],
            activation_dropout=m["activation_dropout"],
            subln=not m["no_subln"],
            pad_idx=pad_idx,
            max_positions=m["max_target_positions"],
        ),
        freeze_vision=not m["train_vision"],
    )


def fairseq_model_cfg(cfg: Kosmos2Config) -> Dict[str, Any]:
    """Inverse of :func:`config_from_fairseq`: the ``kosmos2`` model's fairseq config fields."""
    d, c = cfg.decoder, cfg.connector
    if d.pad_idx != FAIRSEQ_PAD:
        raise ConversionError(f"fairseq dictionaries pad with id {FAIRSEQ_PAD}; this model pads with {d.pad_idx}")
    if d.layernorm_eps != 1e-5:
        raise ConversionError(f"the kosmos2 fairseq model has LayerNorm eps 1e-5; this one {d.layernorm_eps}")
    vision_json = json.dumps(cfg.vision.open_clip_config) if cfg.vision.open_clip_config is not None else None
    return dict(
        vision_model=cfg.vision.model_name,
        vision_pretrained=None,
        vision_quick_gelu=bool(cfg.vision.force_quick_gelu),
        vision_config_json=vision_json,
        train_vision=not cfg.freeze_vision,
        latent_query_num=c.latent_query_num,
        connector_attention_heads=c.attention_heads,
        connector_attention_dropout=c.attention_dropout,
        connector_position_embedding=c.position_embedding,
        connector_locality_sigma=c.locality_sigma,
        decoder_embed_dim=d.embed_dim,
        decoder_layers=d.layers,
        decoder_attention_heads=d.attention_heads,
        decoder_ffn_embed_dim=d.ffn_embed_dim,
        activation_fn=d.activation_fn,
        dropout=d.dropout,
        attention_dropout=d.attention_dropout,
        activation_dropout=d.activation_dropout,
        no_subln=not d.subln,
        max_target_positions=d.max_positions,
        checkpoint_activations=False,
    )


def _plain(obj):
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return obj


def load_our_checkpoint(path: str) -> Tuple[StateDict, Kosmos2Config]:
    """(Kosmos2Module state dict, config) of a unilm_vl ``kosmos2`` fairseq checkpoint."""
    state = read_fairseq_state(path)
    if not isinstance(state.get("model"), dict):
        raise ConversionError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    model_state = state["model"]
    stray = [k for k in model_state if not k.startswith("net.")]
    if stray:
        raise ConversionError(f"{path}: keys outside the kosmos2 model's net.*: {_listing(stray)}")
    cfg_all = _plain(state.get("cfg")) or {}
    model_cfg = _plain(cfg_all.get("model")) if cfg_all else None
    if model_cfg is None and state.get("args") is not None:
        model_cfg = _plain(state["args"])
    if not model_cfg:
        raise ConversionError(f"{path} holds no model config (state['cfg']['model'] or state['args'])")
    ours = {k[len("net.") :]: v for k, v in model_state.items()}
    vocab = ours["decoder.embed_tokens.weight"].shape[0]
    cfg = config_from_fairseq(model_cfg, vocab)
    check_state_dict(ours, cfg, path)
    return ours, cfg


def our_checkpoint_state(
    state: Mapping[str, torch.Tensor],
    cfg: Kosmos2Config,
    spm_model: Optional[str] = None,
    dict_path: Optional[str] = None,
    location_bin_size: int = DEFAULT_NUM_BINS,
    what: str = "the converted model",
) -> Dict[str, Any]:
    """A fairseq checkpoint dict of the ``kosmos2`` model (``--task kosmos2``; ``spm_model``/``dict_path``/
    ``location_bin_size`` go into the task config, which needs them to load) holding ``state``, with no optimizer
    state. With ``dict_path`` or ``spm_model`` (the dictionary then derived from it), the token embedding must have
    one row per symbol of that vocabulary (else :class:`ConversionError` naming ``what``, both sizes and the
    file)."""
    from fairseq.dataclass.configs import FairseqConfig
    from omegaconf import OmegaConf

    from .models.kosmos2 import Kosmos2ModelConfig
    from .tasks.kosmos2 import Kosmos2Config as Kosmos2TaskConfig

    check_state_dict(state, cfg, "our state dict")
    if dict_path is not None or spm_model is not None:
        check_vocabulary(cfg.decoder.vocab_size, dict_path, location_bin_size, what, spm_model)
    model_cfg = Kosmos2ModelConfig(**fairseq_model_cfg(cfg))
    model_cfg._name = "kosmos2"
    task_cfg = Kosmos2TaskConfig(
        spm_model=spm_model,
        dict_path=dict_path,
        location_bin_size=location_bin_size,
        image_token_length=cfg.connector.latent_query_num,
    )
    task_cfg._name = "kosmos2"
    root = OmegaConf.structured(FairseqConfig())
    root.model, root.task = OmegaConf.structured(model_cfg), OmegaConf.structured(task_cfg)
    # the tied output projection is stored under both names, as the model's own state_dict() does
    model_state = {f"net.{k}": v.contiguous() for k, v in state.items()}
    return {
        "args": None,
        "cfg": OmegaConf.to_container(root, resolve=True, enum_to_str=True),
        "model": model_state,
        "optimizer_history": [
            {
                "criterion_name": "Kosmos2LmCriterion",
                "optimizer_name": "none",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"converted_by": "unilm_vl.convert"},
        "last_optimizer_state": None,
    }


def save_our_checkpoint(
    path: str,
    state: Mapping[str, torch.Tensor],
    cfg: Kosmos2Config,
    spm_model: Optional[str] = None,
    dict_path: Optional[str] = None,
    location_bin_size: int = DEFAULT_NUM_BINS,
    what: str = "the converted model",
) -> None:
    checkpoint = our_checkpoint_state(state, cfg, spm_model, dict_path, location_bin_size, what)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(checkpoint, path)


def check_vocabulary(
    vocab_size: int, dict_path: Optional[str], location_bin_size: int, what: str, spm_model: Optional[str] = None
) -> None:
    """Raise :class:`ConversionError` unless ``vocab_size`` token embeddings are the kosmos2 dictionary of
    ``dict_path`` (None: derived from ``spm_model``) and ``location_bin_size`` (message of
    :func:`unilm_vl.models.kosmos2.check_vocab_rows`)."""
    from .models.kosmos2 import VocabularyMismatchError, check_vocab_rows

    dictionary_size = len(build_kosmos2_dictionary(dict_path, location_bin_size, spm_model))
    try:
        check_vocab_rows(vocab_size, dictionary_size, dict_path or spm_model, location_bin_size, what)
    except VocabularyMismatchError as exc:
        raise ConversionError(str(exc)) from None


def load_release(path: str, cfg: Optional[Kosmos2Config] = None) -> Tuple[StateDict, Kosmos2Config]:
    """(our state dict, config) of the released ``kosmos-2.pt`` (``state["model"]``, or a bare state dict)."""
    cfg = cfg or kosmos2_xl_config()
    state = load_checkpoint_file(path)
    release = state["model"] if isinstance(state, dict) and "model" in state else state
    if not isinstance(release, dict):
        raise ConversionError(f"{path} holds a {type(release).__name__}, not a state dict")
    return from_release_state_dict(release, cfg), cfg


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unilm_vl.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    k = sub.add_parser("kosmos2", help="Kosmos-2: released kosmos-2.pt / our fairseq checkpoint / HF directory")
    mode = k.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-hf", action="store_true", help="our checkpoint (--checkpoint) -> HF directory (--out)")
    mode.add_argument("--from-hf", metavar="HF_DIR", help="HF Kosmos-2 directory -> our checkpoint (--out)")
    mode.add_argument(
        "--from-release",
        metavar="KOSMOS2_PT",
        help="the released kosmos-2.pt (the 1.6B kosmos2_xl shape) -> our checkpoint (--out)",
    )
    mode.add_argument(
        "--write-dict",
        action="store_true",
        help="write the fairseq dict.txt of --spm-model to --out (its pieces but <unk> <s> </s>, in id "
        "order, count 1: the released dict.txt for the released sentencepiece model)",
    )
    k.add_argument("--checkpoint", help="our kosmos2 fairseq checkpoint or an HF Kosmos-2 directory (with --to-hf)")
    k.add_argument(
        "--out", required=True, help="output: an HF directory (--to-hf), our checkpoint .pt, or dict.txt (--write-dict)"
    )
    k.add_argument(
        "--spm-model",
        default=None,
        help="sentencepiece model recorded in the written checkpoint's task config (needed to load it; "
        "--from-hf: default the directory's sentencepiece.bpe.model when it has one)",
    )
    k.add_argument(
        "--dict-path",
        default=None,
        help="fairseq dict.txt recorded in the written checkpoint's task config (default: derived from "
        "--spm-model when it is loaded); the model's vocabulary size is checked against it",
    )
    k.add_argument(
        "--location-bin-size",
        type=int,
        default=None,
        help="P of the P x P box grid recorded in the written checkpoint's task config (default 32, the "
        "released model's; --from-hf with a vocabulary: the P the model's token embeddings leave "
        "room for); with a vocabulary, it must be dict.txt + <mask> + 11 tags + P*P",
    )
    k.add_argument(
        "--vision-model",
        default=None,
        help="open_clip name for the vision tower with --from-hf (default: the first registry config "
        "with the HF geometry)",
    )
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point. Exit codes: 0 written, 2 bad arguments or inputs (one ``error:`` line on stderr)."""
    from .cli import report_error

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        convert_kosmos2(args)
    except (ValueError, FileNotFoundError) as exc:  # ConversionError and refused checkpoints are ValueErrors
        return report_error(exc)
    return 0


def convert_kosmos2(args: argparse.Namespace) -> None:
    if args.write_dict:
        if not args.spm_model:
            raise ValueError("--write-dict needs --spm-model M")
        from .data.tokenizers import write_fairseq_dict_from_spm

        lines = write_fairseq_dict_from_spm(args.spm_model, args.out)
        logger.info("wrote %s (%d pieces of %s)", args.out, lines, args.spm_model)
        return
    if args.to_hf:
        if not args.checkpoint:
            raise ValueError("--to-hf needs --checkpoint OURS.pt")
        state, cfg = load_hf(args.checkpoint) if is_hf_dir(args.checkpoint) else load_our_checkpoint(args.checkpoint)
        save_hf(state, cfg, args.out)
        logger.info("wrote HF Kosmos2ForConditionalGeneration to %s", args.out)
        return
    if args.from_hf:
        checkpoint = hf_dir_checkpoint_state(
            args.from_hf,
            args.spm_model,
            args.dict_path,
            args.location_bin_size,
            args.vision_model,
            require_vocabulary=False,
        )
    else:
        state, cfg = load_release(args.from_release)
        checkpoint = our_checkpoint_state(
            state,
            cfg,
            args.spm_model,
            args.dict_path,
            args.location_bin_size or DEFAULT_NUM_BINS,
            what=args.from_release,
        )
    task = checkpoint["cfg"]["task"]
    if task["spm_model"] is None:
        logger.warning(
            "no --spm-model: the vocabulary size (%d) is not checked and the written checkpoint needs "
            "--spm-model (and --dict-path, or the dictionary derived from it) when it is loaded",
            len(checkpoint["model"]["net.decoder.embed_tokens.weight"]),
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(checkpoint, args.out)
    logger.info(
        "wrote %s (%d tensors, vision tower %s)",
        args.out,
        len(checkpoint["model"]),
        checkpoint["cfg"]["model"]["vision_model"],
    )


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
