"""Model ``kosmos2``: the grounded multimodal LM of Kosmos-2 (Peng et al. 2023), a thin adapter over
:class:`unilm_vl.modules.kosmos2.Kosmos2Module` (open_clip image tower -> latent-query connector -> torchscale
sub-LN decoder; microsoft/unilm ``kosmos-2/unilm/models/unigpt.py``, ``connector.py``, ``vl/clip.py``).

Input: ``src_tokens`` B x T, ``image`` B_img x 3 x S x S (one per row that holds image slots), ``image_mask`` B x T
(the ``kosmos2`` task's batch). Output: ``{"lm_logits": B x T x V}``. The vocabulary size comes from the task's
dictionary; loading a checkpoint whose token embedding has another number of rows raises
:class:`VocabularyMismatchError` naming both numbers and the ``dict.txt`` (:func:`check_vocab_rows`). The image
tower is frozen (no gradient, eval mode) unless ``--train-vision`` is given; the released script's flag for this had
no effect.

Archs: ``kosmos2_tiny`` (CPU: open_clip ``unilm-vl-clip-tiny`` tower at 64 px, 16 queries, 2 x 128 decoder),
``kosmos2_base`` (ViT-B/16, 64 queries, 12 x 768), ``kosmos2_xl`` (the released 1.6B shape: ViT-L/14 at 224 with
QuickGELU, 64 queries, 24 x 2048 sub-LN decoder, 32 heads, FFN 8192).
"""

import json
import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from ..data.grounding import kosmos2_added_symbols
from ..modules.clip import tower_norm
from ..modules.kosmos2 import (
    Kosmos2Config,
    Kosmos2ConnectorConfig,
    Kosmos2DecoderConfig,
    Kosmos2Module,
    Kosmos2VisionConfig,
)
from .clip import set_default_arg


@dataclass
class Kosmos2ModelConfig(FairseqDataclass):
    vision_model: str = field(
        default="unilm-vl-clip-tiny",
        metadata={"help": "open_clip registry name of the image tower (ViT-L-14 for the released model)"},
    )
    vision_pretrained: Optional[str] = field(
        default=None, metadata={"help": "local path of open_clip weights for the image tower (no hub downloads)"}
    )
    vision_quick_gelu: bool = field(
        default=False, metadata={"help": "QuickGELU in the image tower (OpenAI CLIP weights, the released model)"}
    )
    vision_config_json: Optional[str] = field(
        default=None,
        metadata={
            "help": "open_clip model config (json: embed_dim, vision_cfg, text_cfg) registered as "
            "--vision-model before "
            "the tower is built; set by convert / HF-directory loading for a tower geometry that open_clip's "
            "registry lacks, so the checkpoint rebuilds it alone"
        },
    )
    train_vision: bool = field(
        default=False,
        metadata={"help": "train the image tower too (default: frozen, no gradient, eval mode, as released)"},
    )
    latent_query_num: int = field(
        default=64,
        metadata={"help": "L: learned latent queries of the connector = image slots per image in the sequence"},
    )
    connector_attention_heads: int = field(default=32, metadata={"help": "heads of the connector's attention"})
    connector_attention_dropout: float = field(
        default=0.1, metadata={"help": "dropout on the connector's attention probabilities"}
    )
    connector_position_embedding: ChoiceEnum(["none", "sincos2d"]) = field(
        default="none",
        metadata={
            "help": "none (released) or sincos2d: fixed 2-D sin-cos positions on the connector's "
            "queries (a sqrt(L) grid) "
            "and patch keys, Qwen-VL style, so each image slot summarises its own region (not HF-convertible)"
        },
    )
    connector_locality_sigma: float = field(
        default=0.0,
        metadata={
            "help": "> 0: locality prior -d^2/(2 sigma^2) on the connector's attention logits "
            "between each query's cell "
            "(queries on a sqrt(L) grid) and each patch, in query-cell units; 0 = off, as released"
        },
    )
    decoder_embed_dim: int = field(default=2048, metadata={"help": "D: decoder width"})
    decoder_layers: int = field(default=24, metadata={"help": "decoder layers"})
    decoder_attention_heads: int = field(default=32, metadata={"help": "decoder self-attention heads"})
    decoder_ffn_embed_dim: int = field(default=8192, metadata={"help": "decoder feed-forward inner width"})
    activation_fn: str = field(default="gelu", metadata={"help": "decoder feed-forward activation (torchscale)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings and residual branches"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on self-attention probabilities"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the feed-forward activation"})
    no_subln: bool = field(
        default=False, metadata={"help": "plain pre-LN decoder instead of sub-LN (the released model uses sub-LN)"}
    )
    max_target_positions: int = field(default=2048, metadata={"help": "initial length of the sinusoid table"})
    checkpoint_activations: bool = field(
        default=False, metadata={"help": "recompute decoder layers in the backward pass to save memory"}
    )


class VocabularyMismatchError(ValueError):
    """A checkpoint's token embedding does not have one row per symbol of the task's dictionary."""


def check_vocab_rows(
    rows: int, vocab_size: int, dict_path: Optional[str], num_bins: Optional[int], what: str = "the checkpoint"
) -> None:
    """Raise :class:`VocabularyMismatchError` unless ``rows`` (token embeddings of ``what``) equals ``vocab_size``,
    the kosmos2 dictionary built from ``dict_path`` plus ``<mask>``, the 11 tags and ``num_bins * num_bins``
    patch tokens. The message names both numbers and the file, and the ``--location-bin-size`` that ``rows``
    would fit with this ``dict.txt`` when there is one."""
    if rows == vocab_size:
        return
    if dict_path is None or num_bins is None:
        raise VocabularyMismatchError(
            f"{what} has {rows} token embeddings but the task's dictionary has {vocab_size} symbols"
        )
    added = len(kosmos2_added_symbols(num_bins))
    base = vocab_size - added  # fairseq's 4 specials + the lines of dict.txt
    hint = ""
    cells = rows - base - (added - num_bins * num_bins)
    side = math.isqrt(cells) if cells > 0 else 0
    if side > 0 and side * side == cells:
        hint = f"; {rows} is what --location-bin-size {side} gives with this dict.txt"
    raise VocabularyMismatchError(
        f"{what} has {rows} token embeddings but the kosmos2 dictionary has {vocab_size} symbols ({dict_path}: "
        f"{base}, + <mask>, {added - num_bins * num_bins - 1} tags and {num_bins * num_bins} patch tokens of "
        f"--location-bin-size {num_bins}){hint}: pass the dict.txt and --location-bin-size it was made with"
    )


@register_model("kosmos2", dataclass=Kosmos2ModelConfig)
class Kosmos2Model(BaseFairseqModel):
    def __init__(self, cfg: Kosmos2ModelConfig, vocab_size: int, pad_idx: int):
        super().__init__()
        self.cfg = cfg
        self.net = Kosmos2Module(
            Kosmos2Config(
                vision=Kosmos2VisionConfig(
                    model_name=cfg.vision_model,
                    pretrained=cfg.vision_pretrained,
                    force_quick_gelu=cfg.vision_quick_gelu,
                    open_clip_config=(json.loads(cfg.vision_config_json) if cfg.vision_config_json else None),
                ),
                connector=Kosmos2ConnectorConfig(
                    latent_query_num=cfg.latent_query_num,
                    attention_heads=cfg.connector_attention_heads,
                    attention_dropout=cfg.connector_attention_dropout,
                    position_embedding=str(cfg.connector_position_embedding),
                    locality_sigma=cfg.connector_locality_sigma,
                ),
                decoder=Kosmos2DecoderConfig(
                    vocab_size=vocab_size,
                    embed_dim=cfg.decoder_embed_dim,
                    layers=cfg.decoder_layers,
                    attention_heads=cfg.decoder_attention_heads,
                    ffn_embed_dim=cfg.decoder_ffn_embed_dim,
                    activation_fn=cfg.activation_fn,
                    dropout=cfg.dropout,
                    attention_dropout=cfg.attention_dropout,
                    activation_dropout=cfg.activation_dropout,
                    subln=not cfg.no_subln,
                    pad_idx=pad_idx,
                    max_positions=cfg.max_target_positions,
                    checkpoint_activations=cfg.checkpoint_activations,
                ),
                freeze_vision=not cfg.train_vision,
            )
        )
        self.image_mean, self.image_std = tower_norm(self.net.vision)
        self.vocab_size = vocab_size
        self.dict_path: Optional[str] = None
        self.location_bin_size: Optional[int] = None
        """Where the vocabulary came from (the task's ``--dict-path`` and ``--location-bin-size``), for errors."""

    @classmethod
    def build_model(cls, cfg: Kosmos2ModelConfig, task):
        dictionary = task.target_dictionary
        if dictionary is None:
            raise ValueError("the kosmos2 model needs a task with a dictionary (--task kosmos2)")
        model = cls(cfg, len(dictionary), dictionary.pad())
        task_cfg = getattr(task, "cfg", None)
        model.dict_path = getattr(task_cfg, "dict_path", None)
        model.location_bin_size = getattr(task_cfg, "location_bin_size", None)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's load, after checking that the checkpoint's vocabulary is the task's (torch would stop with a
        size-mismatch traceback over two tensors)."""
        embed = state_dict.get("net.decoder.embed_tokens.weight")
        if embed is not None:
            check_vocab_rows(int(embed.shape[0]), self.vocab_size, self.dict_path, self.location_bin_size)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    @property
    def image_size(self) -> int:
        return self.net.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.net.num_image_tokens

    def forward(self, src_tokens, image=None, image_mask=None, incremental_state=None, last_only=False):
        return self.net(src_tokens, image, image_mask, incremental_state, last_only=last_only)

    def max_positions(self):
        return None


@register_model_architecture("kosmos2", "kosmos2_tiny")
def kosmos2_tiny(args):
    """CPU-sized: the 64 px unilm-vl-clip-tiny tower (65 tokens), 16 queries, 2-layer 128-wide decoder."""
    set_default_arg(args, "vision_model", "unilm-vl-clip-tiny")
    set_default_arg(args, "latent_query_num", 16)
    set_default_arg(args, "connector_attention_heads", 4)
    set_default_arg(args, "connector_attention_dropout", 0.0)
    set_default_arg(args, "decoder_embed_dim", 128)
    set_default_arg(args, "decoder_layers", 2)
    set_default_arg(args, "decoder_attention_heads", 4)
    set_default_arg(args, "decoder_ffn_embed_dim", 512)
    set_default_arg(args, "dropout", 0.0)
    set_default_arg(args, "attention_dropout", 0.0)


@register_model_architecture("kosmos2", "kosmos2_base")
def kosmos2_base(args):
    """ViT-B/16 tower, 64 queries, 12 x 768 sub-LN decoder (12 heads, FFN 3072)."""
    set_default_arg(args, "vision_model", "ViT-B-16")
    set_default_arg(args, "latent_query_num", 64)
    set_default_arg(args, "connector_attention_heads", 12)
    set_default_arg(args, "decoder_embed_dim", 768)
    set_default_arg(args, "decoder_layers", 12)
    set_default_arg(args, "decoder_attention_heads", 12)
    set_default_arg(args, "decoder_ffn_embed_dim", 3072)


@register_model_architecture("kosmos2", "kosmos2_xl")
def kosmos2_xl(args):
    """The released Kosmos-2: CLIP ViT-L/14 at 224 (QuickGELU), 64 queries, 24 x 2048 sub-LN decoder, 32 heads."""
    set_default_arg(args, "vision_model", "ViT-L-14")
    args.vision_quick_gelu = True  # a store_true flag: argparse leaves False, never None
    set_default_arg(args, "latent_query_num", 64)
    set_default_arg(args, "connector_attention_heads", 32)
    set_default_arg(args, "decoder_embed_dim", 2048)
    set_default_arg(args, "decoder_layers", 24)
    set_default_arg(args, "decoder_attention_heads", 32)
    set_default_arg(args, "decoder_ffn_embed_dim", 8192)
