"""The Kosmos-2 network (Peng et al. 2023, "Kosmos-2: Grounding Multimodal Large Language Models to the World"):
an open_clip ViT, the "xconnector" resampler and a torchscale sub-LN decoder, as plain modules.

Data flow (B samples, K images each, T tokens, N image tokens, L latent queries)::

    image      B x K x 3 x H x W  (or B x 3 x H x W, K = 1), CLIP mean/std normalised
      -> Kosmos2VisionTower: ViT, ln_post on ALL tokens (CLS + patches), per-token L2 norm   -> BK x N x Dv
      -> Kosmos2Connector:   dense Dv->D; L learned queries attend over [dense tokens; queries]
                             (N + L keys/values; no residual, LayerNorm or MLP)                -> BK x L x D
      -> written, in image order, into the token-embedding rows where ``image_mask`` is True (K * L per row)
      -> (E[tokens] with image rows replaced) * sqrt(D) + sinusoid(positions)  (torchscale ``forward_embedding``)
      -> torchscale ``Decoder``: pre-LN sub-LN (Magneto) layers, causal self-attention through
         ``F.scaled_dot_product_attention`` (see the SDPA shim below), final LayerNorm, tied output projection
      -> ``lm_logits``  B x T x V

Padding: left or right padding with ``pad_idx`` both give the real tokens the logits of the unpadded sample.
Positions count non-pad tokens only (the first real token gets sinusoid row ``pad_idx + 1`` = 2, pads get the zero
row ``pad_idx``). Right padding needs no key mask under the causal mask, so it keeps SDPA's causal fast path;
left padding (what batched generation uses) adds a key padding mask. Pad rows' outputs are meaningless.

Incremental decoding: pass the same ``incremental_state`` dict (start with ``{}``) and the FULL prefix each call.
The first call runs the whole prompt (image splicing included) through torchscale's ``Decoder`` and fills its
per-layer key/value cache; later calls embed only the last token and return B x 1 x V logits. Those later calls run
:meth:`Kosmos2Module.decode_step` (``fast_decoding``, the default): the same layers and parameters, the keys and
values written into a preallocated :class:`~unilm_vl.modules.kv_cache.KVCache` instead of concatenated, and only
the last token's position and padding mask computed (torchscale's ``Decoder`` embeds the positions of the whole
prefix and our padding check reads it back to the host at every step).

The image tower is frozen by default (as in the released training script; the paper's text says all parameters
train): ``freeze_vision=False`` makes it trainable and lets it follow ``train()``/``eval()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairscale.nn import checkpoint_wrapper, wrap
from torch import nn
from torchscale.architecture.config import DecoderConfig
from torchscale.architecture.decoder import Decoder, DecoderLayer
from torchscale.component.multihead_attention import MultiheadAttention

from .clip import ClipTowersConfig, build_open_clip, register_open_clip_config
from .kv_cache import KVCache
from .onednn import OneDnnLinear, onednn_applies, use_onednn


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Kosmos2VisionConfig:
    """The open_clip image tower."""

    model_name: str = "unilm-vl-kosmos2-vision-tiny"
    """open_clip registry name of the tower (``ViT-L-14`` for the released model)."""
    pretrained: Optional[str] = None
    """Local path of an open_clip checkpoint (the whole CLIP model; only the visual tower is kept), or None."""
    force_quick_gelu: bool = False
    """Use QuickGELU ``x * sigmoid(1.702 x)`` in the tower (True for OpenAI's ViT-L/14 weights)."""
    open_clip_config: Optional[Dict[str, Any]] = None
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) registered under ``model_name``
    before the tower is built (:func:`unilm_vl.modules.clip.register_open_clip_config`): a tower geometry that
    open_clip's registry lacks, e.g. one read from an HF Kosmos-2 config (:func:`unilm_vl.convert.config_from_hf`)
    and stored with the checkpoint. None: ``model_name`` must be in the registry."""


@dataclass
class Kosmos2ConnectorConfig:
    """The "xconnector": a dense projection and learned latent queries with one cross-attention."""

    latent_query_num: int = 8
    """L: number of latent queries, i.e. image placeholder rows per image in the token sequence (64 released)."""
    attention_heads: int = 4
    """Heads of the latent-query attention (the released model uses the decoder's 32)."""
    attention_dropout: float = 0.0
    """Dropout on the latent-query attention probabilities (0.1 released)."""
    position_embedding: str = "none"
    """``none`` (released) or ``sincos2d``: fixed 2-D sin-cos positions added to the attention's queries and to the
    patch keys (not the values), the queries laid out on a sqrt(L) x sqrt(L) grid over the image (Qwen-VL's
    resampler). Not in the release or HF; keeps the slots tied to image regions (README "Kosmos-2")."""
    locality_sigma: float = 0.0
    """> 0: add ``-d^2 / (2 sigma^2)`` to the attention logits of query j and patch i, d the distance between
    query j's cell centre (queries on a sqrt(L) grid) and patch i's centre in query-cell units; CLS and query keys
    get 0. A locality prior each query starts from and may learn past. 0 (off) as released."""


@dataclass
class Kosmos2DecoderConfig:
    """The torchscale language decoder (causal, pre-LN, sub-LN, sinusoidal absolute positions, tied output)."""

    vocab_size: int = 100
    """V: dictionary size (65037 released, with the grounding and 1024 patch-index tokens)."""
    embed_dim: int = 64
    """D: model width (2048 released)."""
    layers: int = 2
    """Number of decoder layers (24 released)."""
    attention_heads: int = 4
    """Self-attention heads (32 released, head width 64)."""
    ffn_embed_dim: int = 256
    """Inner width of the feed-forward block (8192 released)."""
    activation_fn: str = "gelu"
    """Feed-forward activation as torchscale names it (``gelu`` = exact erf GELU, computed in fp32)."""
    dropout: float = 0.0
    """Dropout on the embedding output and on each residual branch (0.1 released)."""
    attention_dropout: float = 0.0
    """Dropout on the self-attention probabilities (0.1 released), applied by SDPA in training mode."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation (0.0 released)."""
    subln: bool = True
    """Sub-LN (Magneto): extra LayerNorms before ``out_proj`` and ``fc2``, and the sqrt(ln 2N) init scaling."""
    pad_idx: int = 1
    """Padding token id (fairseq dictionary: 1). Its embedding row is zero; positions start at pad_idx + 1."""
    max_positions: int = 2048
    """Initial size of the sinusoid table (longer inputs extend it on the fly, as fairseq does)."""
    layernorm_eps: float = 1e-5
    """Epsilon of every decoder LayerNorm."""
    checkpoint_activations: bool = False
    """Recompute each decoder layer in the backward pass (fairscale ``checkpoint_wrapper``; names unchanged)."""


@dataclass
class Kosmos2Config:
    """The whole network. The defaults are the tiny CPU variant (``kosmos2_tiny_config``)."""

    vision: Kosmos2VisionConfig = field(default_factory=Kosmos2VisionConfig)
    """Image tower."""
    connector: Kosmos2ConnectorConfig = field(default_factory=Kosmos2ConnectorConfig)
    """Image-to-text connector."""
    decoder: Kosmos2DecoderConfig = field(default_factory=Kosmos2DecoderConfig)
    """Language decoder."""
    freeze_vision: bool = True
    """Keep the image tower frozen (no grads, always eval mode), as the released script effectively does."""


def kosmos2_tiny_config() -> Kosmos2Config:
    """A few-hundred-thousand-parameter variant for CPU tests (32 x 32 images -> 17 tokens, 8 queries, D = 64)."""
    return Kosmos2Config()


def kosmos2_xl_config() -> Kosmos2Config:
    """The released Kosmos-2 shape: CLIP ViT-L/14 at 224 (QuickGELU), 64 queries, 24 x 2048 sub-LN decoder."""
    return Kosmos2Config(
        vision=Kosmos2VisionConfig(model_name="ViT-L-14", force_quick_gelu=True),
        connector=Kosmos2ConnectorConfig(latent_query_num=64, attention_heads=32, attention_dropout=0.1),
        decoder=Kosmos2DecoderConfig(
            vocab_size=65037,
            embed_dim=2048,
            layers=24,
            attention_heads=32,
            ffn_embed_dim=8192,
            activation_fn="gelu",
            dropout=0.1,
            attention_dropout=0.1,
            activation_dropout=0.0,
            subln=True,
            pad_idx=1,
            max_positions=2048,
        ),
        freeze_vision=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# SDPA shim for torchscale 0.3.0
# ----------------------------------------------------------------------------------------------------------------
class SdpaMultiheadAttention(MultiheadAttention):
    """SHIM: torchscale 0.3.0's ``MultiheadAttention`` with ``softmax(q k^T / sqrt(d) + mask) v`` computed by
    ``F.scaled_dot_product_attention`` (torchscale does it with ``bmm``/``softmax``, which never reaches the fused
    kernels). Parameters, names, the key/value cache layout in ``incremental_state`` (``prev_key``/``prev_value``,
    B x H x S x d) and the sub-LN ``inner_attn_ln`` are torchscale's; only the attention maths call changes.

    Differences on purpose: a query row whose keys are all masked (a left-pad row under the causal mask) gives a
    zero vector instead of torchscale's NaN, so NaNs never reach real rows through ``0 * NaN`` in later layers;
    attention weights are not returned (None). xPos and relative-position biases are not supported (Kosmos-2 uses
    neither). ``attn_mask`` is the decoder's causal mask (torchscale's ``Decoder`` passes nothing else); without a
    key padding mask it is run as SDPA's ``is_causal``.
    """

    def forward(
        self,
        query,
        key,
        value,
        incremental_state=None,
        key_padding_mask=None,
        attn_mask=None,
        rel_pos=None,
        is_first_step=False,
        attn_bias=None,
    ):
        if attn_bias is not None and (attn_mask is not None or key_padding_mask is not None):
            raise ValueError("attn_bias (additive T x S logits) cannot be combined with attn_mask/key_padding_mask")
        if self.xpos is not None or rel_pos is not None:
            raise NotImplementedError("SdpaMultiheadAttention supports neither xPos nor relative-position biases")
        bsz, tgt_len, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)  # B x H x T x d
        k = self.k_proj(key).view(bsz, key.size(1), heads, head_dim).transpose(1, 2)  # B x H x S x d
        v = self.v_proj(value).view(bsz, value.size(1), heads, head_dim).transpose(1, 2)  # B x H x S x d
        if incremental_state is not None:
            if "prev_key" in incremental_state:
                k = torch.cat([incremental_state["prev_key"], k], dim=2)
                v = torch.cat([incremental_state["prev_value"], v], dim=2)
            incremental_state["prev_key"], incremental_state["prev_value"] = k, v
            incremental_state.pop("kv_cache", None)  # a fast decode step's buffer no longer holds every key
        src_len = k.size(2)

        dropout_p = self.dropout_module.p if self.training else 0.0
        if attn_bias is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout_p)
        elif key_padding_mask is None and attn_mask is not None and tgt_len == src_len:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # B x H x T x d
        else:
            allowed = None  # B x 1 x T x S (or broadcastable), True = may attend
            if attn_mask is not None:
                allowed = (attn_mask > float("-inf")).view(1, 1, tgt_len, src_len)
            if key_padding_mask is not None:
                keep = ~key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len)
                allowed = keep if allowed is None else allowed & keep
            dead = None
            if allowed is not None:
                dead = ~allowed.any(dim=-1, keepdim=True)  # B x 1 x T x 1: rows with no key to attend to
                allowed = allowed | dead
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
            if dead is not None:
                out = out.masked_fill(dead, 0.0)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # B x T x D
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out), None


class _SdpaDecoderLayer(DecoderLayer):
    """torchscale ``DecoderLayer`` whose self-attention is the SDPA shim."""

    def build_self_attention(self, embed_dim, args):
        return SdpaMultiheadAttention(
            args,
            embed_dim,
            args.decoder_attention_heads,
            dropout=args.attention_dropout,
            self_attention=True,
            encoder_decoder_attention=False,
            subln=args.subln,
        )


class Kosmos2Decoder(Decoder):
    """torchscale ``Decoder`` built from ``_SdpaDecoderLayer``s (everything else is torchscale's)."""

    def build_decoder_layer(self, args, depth, is_moe_layer=False, is_encoder_decoder=False):
        # the same wrapping as torchscale's own build_decoder_layer, around our layer class
        layer = _SdpaDecoderLayer(args, depth, is_moe_layer=is_moe_layer, is_encoder_decoder=is_encoder_decoder)
        if args.checkpoint_activations:
            layer = checkpoint_wrapper(layer)
        if args.fsdp:
            layer = wrap(layer)
        return layer


# ----------------------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------------------
def sinusoid_table(num_positions: int, dim: int, pad_idx: int) -> torch.Tensor:
    """fairseq-style sinusoids: row p = ``[sin(p w_0..w_{h-1}) | cos(p w_0..w_{h-1})]`` (concatenated, not
    interleaved), ``h = dim // 2``, ``w_i = exp(-i ln(10000) / (h - 1))``; row ``pad_idx`` is zero, and an odd
    ``dim`` gets a zero last column."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))  # h
    angle = torch.arange(num_positions, dtype=torch.float32)[:, None] * freq[None, :]  # P x h
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # P x 2h
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)  # P x dim
    table[pad_idx] = 0
    return table


def token_positions(tokens: torch.Tensor, pad_idx: int) -> torch.Tensor:
    """Position ids counting non-pad tokens only: the k-th real token (0-based) gets ``pad_idx + 1 + k``, pads get
    ``pad_idx``. Left and right padding therefore give a sample's real tokens the same positions."""
    real = tokens.ne(pad_idx)  # B x T
    return torch.cumsum(real, dim=1) * real + pad_idx  # B x T


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal absolute positions (no parameters; the table is a non-persistent buffer that grows on
    demand). Called by torchscale's ``Decoder.forward_embedding`` with the full prefix of tokens; in incremental
    steps torchscale keeps only the last row."""

    def __init__(self, dim: int, pad_idx: int, init_size: int):
        super().__init__()
        self.dim, self.pad_idx = dim, pad_idx
        self.register_buffer("table", sinusoid_table(init_size + pad_idx + 1, dim, pad_idx), persistent=False)

    def forward(self, tokens: torch.Tensor, incremental_state: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        return self.embed(token_positions(tokens, self.pad_idx), tokens.size(1))  # B x T x D

    def last(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding of the last column's position only (B x 1 x D), what ``forward(tokens)[:, -1:]``
        returns without embedding the whole prefix."""
        real = tokens.ne(self.pad_idx)  # B x T
        positions = real.sum(dim=1, keepdim=True) * real[:, -1:] + self.pad_idx  # B x 1: token_positions' last column
        return self.embed(positions, tokens.size(1))  # B x 1 x D

    def embed(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Rows of the table for position ids of a sequence of ``length`` tokens (the table grows to fit)."""
        needed = self.pad_idx + 1 + length
        if needed > self.table.size(0):
            self.table = sinusoid_table(needed, self.dim, self.pad_idx).to(self.table)
        return F.embedding(positions, self.table)


# ----------------------------------------------------------------------------------------------------------------
# Image tower and connector
# ----------------------------------------------------------------------------------------------------------------
class Kosmos2VisionTower(nn.Module):
    """An open_clip ViT returning ALL its tokens (CLS first, then the patches) after ``ln_post``, each L2-normalised.
    The CLIP projection ``proj`` is removed (its output is not used), so the features are ``width``-wide."""

    def __init__(self, cfg: Kosmos2VisionConfig):
        super().__init__()
        if cfg.open_clip_config is not None:
            register_open_clip_config(cfg.model_name, cfg.open_clip_config)
        clip = build_open_clip(
            ClipTowersConfig(
                model_name=cfg.model_name, pretrained=cfg.pretrained, force_quick_gelu=cfg.force_quick_gelu
            )
        )
        self.visual = clip.visual
        if getattr(self.visual, "attn_pool", None) is not None:
            raise ValueError(f"{cfg.model_name}: towers with attentional pooling have no per-patch ln_post tokens")
        self.visual.proj = None

    @property
    def width(self) -> int:
        """Dv, the feature width."""
        return int(self.visual.ln_post.normalized_shape[0])

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def num_tokens(self) -> int:
        """N = patches + 1 (CLS); 257 for ViT-L/14 at 224."""
        grid = self.visual.grid_size
        return int(grid[0] * grid[1] + 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            image,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)  # B x N x Dv
        return F.normalize(tokens, dim=-1)  # B x N x Dv


class Kosmos2Connector(nn.Module):
    """The "xconnector": ``x = dense(f)``; L learned queries (N(0, 1) init) attend with one multi-head attention
    (q/k/v/out projections with bias, q scaled by head_dim^-0.5) over ``[x; queries]`` (N + L keys/values).
    No residual, LayerNorm or MLP. Parameter names follow the original checkpoint (``dense``, ``latent_query``,
    ``x_attn.{q,k,v,out}_proj``)."""

    def __init__(self, cfg: Kosmos2ConnectorConfig, input_dim: int, output_dim: int):
        super().__init__()
        if output_dim % cfg.attention_heads:
            raise ValueError(f"connector width {output_dim} is not divisible by {cfg.attention_heads} heads")
        self.dense = nn.Linear(input_dim, output_dim)
        self.latent_query = nn.Parameter(torch.randn(cfg.latent_query_num, output_dim))
        args = DecoderConfig(decoder_embed_dim=output_dim, multiway=False, xpos_rel_pos=False)
        self.x_attn = SdpaMultiheadAttention(
            args,
            output_dim,
            cfg.attention_heads,
            dropout=cfg.attention_dropout,
            self_attention=False,
            encoder_decoder_attention=True,
            subln=False,
        )
        self.x_attn.reset_parameters()  # xavier (gain 1/sqrt 2 for q/k/v), zero out bias: fairseq's MHA init
        if cfg.position_embedding not in ("none", "sincos2d"):
            raise ValueError(
                f"connector position_embedding must be 'none' or 'sincos2d', got {cfg.position_embedding!r}"
            )
        self.position_embedding = cfg.position_embedding
        self.locality_sigma = float(cfg.locality_sigma)
        self._geometry_cache: Dict[Tuple[int, torch.device, torch.dtype], Tuple[Optional[torch.Tensor], ...]] = {}

    @property
    def num_queries(self) -> int:
        return int(self.latent_query.size(0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dense(features)  # B x N x D
        query = self.latent_query.unsqueeze(0).expand(x.size(0), -1, -1).to(x.dtype)  # B x L x D
        memory = torch.cat([x, query], dim=1)  # B x (N + L) x D
        bias, pos_queries, pos_memory = self._geometry(x.size(1), x.device, x.dtype)
        if pos_queries is not None:
            query, keys = query + pos_queries, memory + pos_memory
        else:
            keys = memory
        out, _ = self.x_attn(query=query, key=keys, value=memory, attn_bias=bias)  # B x L x D
        return out

    def _geometry(self, num_tokens: int, device, dtype):
        """(locality bias L x (N + L) or None, query positions L x D or None, key positions (N + L) x D or None)
        for N input tokens, built once per (N, device, dtype): the forward pass then neither recomputes them nor
        copies them from the host at every step."""
        key = (num_tokens, device, dtype)
        if key not in self._geometry_cache:
            bias = pos_queries = pos_memory = None
            if self.locality_sigma > 0:
                bias = locality_bias(num_tokens, self.num_queries, self.locality_sigma, device, dtype)
            if self.position_embedding == "sincos2d":
                pos_keys, pos_queries = connector_positions(
                    num_tokens, self.num_queries, self.dense.out_features, device, dtype
                )
                pos_memory = torch.cat([pos_keys, pos_queries], dim=0)  # (N + L) x D
            self._geometry_cache[key] = (bias, pos_queries, pos_memory)
        return self._geometry_cache[key]


def _grids(num_tokens: int, num_queries: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query coordinates (integers of a sqrt(L) grid) and patch-centre coordinates of the sqrt(N - 1) patch grid
    in the same units, ``(r + 0.5) * sqrt(L) / sqrt(N - 1) - 0.5``: L x 2 and (N - 1) x 2 (row, column)."""
    grid_q, grid_p = math.isqrt(num_queries), math.isqrt(num_tokens - 1)
    if grid_q * grid_q != num_queries or grid_p * grid_p != num_tokens - 1:
        raise ValueError(
            f"connector positions need a square number of queries ({num_queries}) and "
            f"[CLS] + a square patch grid ({num_tokens} tokens)"
        )
    q = torch.arange(grid_q, dtype=torch.float64)
    p = (torch.arange(grid_p, dtype=torch.float64) + 0.5) * grid_q / grid_p - 0.5
    coords_q = torch.stack([q.repeat_interleave(grid_q), q.repeat(grid_q)], dim=1)  # L x 2 (row-major)
    coords_p = torch.stack([p.repeat_interleave(grid_p), p.repeat(grid_p)], dim=1)  # (N - 1) x 2
    return coords_q, coords_p


def locality_bias(num_tokens: int, num_queries: int, sigma: float, device, dtype) -> torch.Tensor:
    """L x (N + L) additive logits: ``-d^2 / (2 sigma^2)`` from query j to patch i, 0 to CLS and to the queries."""
    coords_q, coords_p = _grids(num_tokens, num_queries)
    dist2 = (coords_q[:, None] - coords_p[None]).pow(2).sum(-1)  # L x (N - 1)
    bias = torch.cat(
        [
            torch.zeros(num_queries, 1, dtype=torch.float64),
            -dist2 / (2 * sigma**2),
            torch.zeros(num_queries, num_queries, dtype=torch.float64),
        ],
        dim=1,
    )  # L x (N + L)
    return bias.to(device=device, dtype=dtype)


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of continuous grid coordinates (M each) -> M x dim: the first half encodes the row,
    the second the column, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim / 4)) (MAE / Qwen-VL)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # dim/4

    def axis(p):
        angles = p.double()[:, None] * omega[None]  # M x dim/4
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # M x dim/2

    return torch.cat([axis(rows), axis(cols)], dim=1).float()  # M x dim


def connector_positions(
    num_tokens: int, num_queries: int, dim: int, device, dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``sincos2d`` connector: (N x D for [CLS; patches], L x D for the queries), from
    :func:`_grids`' coordinates, so each query matches the patches it covers; CLS takes a zero row."""
    coords_q, coords_p = _grids(num_tokens, num_queries)
    pos_q = sincos_2d(coords_q[:, 0], coords_q[:, 1], dim)  # L x D
    pos_k = torch.cat([torch.zeros(1, dim), sincos_2d(coords_p[:, 0], coords_p[:, 1], dim)], dim=0)  # N x D
    return pos_k.to(device=device, dtype=dtype), pos_q.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------
class Kosmos2Module(nn.Module):
    """Image tower + connector + torchscale decoder; ``forward`` returns ``{"lm_logits": B x T x V}``."""

    fast_decoding: bool = True
    """Run incremental steps after the first with :meth:`decode_step` (preallocated key/value cache, last
    position only) instead of torchscale's ``Decoder.forward``; same logits to float rounding. Set it False on an
    instance to decode through torchscale (the tests compare both)."""

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        self.cfg = cfg
        self.vision = self.build_vision_tower(cfg.vision)
        self.connector = self.build_connector(cfg.connector, self.vision.width, cfg.decoder.embed_dim)
        self.decoder = self.build_decoder(cfg.decoder)
        self.set_vision_frozen(cfg.freeze_vision)
        use_onednn(self)  # fp32 CPU GEMMs without autograd through oneDNN (modules/onednn.py)

    # -- builders -------------------------------------------------------------------------------------------------
    @staticmethod
    def build_vision_tower(cfg: Kosmos2VisionConfig) -> Kosmos2VisionTower:
        return Kosmos2VisionTower(cfg)

    @staticmethod
    def build_connector(cfg: Kosmos2ConnectorConfig, input_dim: int, output_dim: int) -> Kosmos2Connector:
        return Kosmos2Connector(cfg, input_dim, output_dim)

    @staticmethod
    def build_decoder(cfg: Kosmos2DecoderConfig) -> Kosmos2Decoder:
        """torchscale decoder: sub-LN, no xPos / relative positions, sqrt(D)-scaled embeddings + sinusoids, tied
        output projection. The token embedding is fairseq's: N(0, D^-0.5) with a zero pad row."""
        args = DecoderConfig(
            decoder_embed_dim=cfg.embed_dim,
            decoder_attention_heads=cfg.attention_heads,
            decoder_ffn_embed_dim=cfg.ffn_embed_dim,
            decoder_layers=cfg.layers,
            decoder_normalize_before=True,
            activation_fn=cfg.activation_fn,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            no_scale_embedding=False,
            layernorm_embedding=False,
            subln=cfg.subln,
            deepnorm=False,
            xpos_rel_pos=False,
            rel_pos_buckets=0,
            max_rel_pos=0,
            share_decoder_input_output_embed=True,
            vocab_size=cfg.vocab_size,
            max_target_positions=cfg.max_positions,
            layernorm_eps=cfg.layernorm_eps,
            checkpoint_activations=cfg.checkpoint_activations,
            multiway=False,
        )
        embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_idx)
        nn.init.normal_(embed_tokens.weight, mean=0.0, std=cfg.embed_dim**-0.5)
        with torch.no_grad():
            embed_tokens.weight[cfg.pad_idx].zero_()
        positions = SinusoidalPositions(cfg.embed_dim, cfg.pad_idx, cfg.max_positions)
        return Kosmos2Decoder(args, embed_tokens=embed_tokens, embed_positions=positions)

    # -- freezing -------------------------------------------------------------------------------------------------
    def set_vision_frozen(self, frozen: bool) -> None:
        """Frozen: no ``requires_grad`` and always eval mode; unfrozen: trainable and following ``train()``."""
        self.cfg.freeze_vision = frozen
        self.vision.requires_grad_(not frozen)
        self.vision.train(self.training and not frozen)

    def train(self, mode: bool = True) -> "Kosmos2Module":
        super().train(mode)
        if self.cfg.freeze_vision:
            self.vision.eval()
        return self

    # -- pieces ---------------------------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """L: placeholder rows per image."""
        return self.connector.num_queries

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Images (B x 3 x H x W) -> connector output B x L x D."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vision):
            features = self.vision(image)  # B x N x Dv
        return self.connector(features)  # B x L x D

    def embed_inputs(
        self, src_tokens: torch.Tensor, image: Optional[torch.Tensor], image_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``E[tokens]`` with the ``image_mask`` rows replaced by the connector output, NOT yet scaled by sqrt(D)
        (torchscale's ``forward_embedding`` scales the spliced rows together with the text rows)."""
        embeds = self.decoder.embed_tokens(src_tokens)  # B x T x D
        self._check_image_inputs(src_tokens, image, image_mask)
        if image is None:
            return embeds
        images = image.flatten(0, 1) if image.dim() == 5 else image  # BK x 3 x H x W
        features = self.encode_image(images).to(embeds.dtype)  # BK x L x D
        # rows without image slots (text-only samples) take no image: fill the marked rows in batch order
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.reshape(-1, features.size(-1)))

    def _check_image_inputs(self, src_tokens, image, image_mask) -> None:
        has_rows = image_mask is not None and bool(image_mask.any())
        if image is None:
            if has_rows:
                raise ValueError("image_mask marks image placeholder rows but no image was given")
            return
        if not has_rows:
            raise ValueError("an image was given but image_mask marks no placeholder rows for it")
        if image_mask.dtype != torch.bool or image_mask.shape != src_tokens.shape:
            raise ValueError(
                f"image_mask must be a bool tensor shaped like src_tokens {tuple(src_tokens.shape)}, "
                f"got {image_mask.dtype} {tuple(image_mask.shape)}"
            )
        counts = image_mask.sum(dim=1)  # B
        with_image = int((counts > 0).sum())
        if image.dim() not in (4, 5) or image.size(0) != with_image:
            raise ValueError(
                f"image must be B_img x 3 x H x W or B_img x K x 3 x H x W with B_img = {with_image} "
                f"(the rows whose image_mask marks slots), got {tuple(image.shape)}"
            )
        size = self.vision.image_size
        if tuple(image.shape[-3:]) != (3, size, size):
            raise ValueError(
                f"images must be 3 x {size} x {size} (the image tower's input), got "
                f"{' x '.join(map(str, image.shape[-3:]))}"
            )
        expected = self.num_image_tokens * (image.size(1) if image.dim() == 5 else 1)
        bad = ((counts != expected) & (counts > 0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"each image_mask row must mark 0 or exactly {expected} placeholder rows "
                f"({self.num_image_tokens} per image); rows {bad} mark {counts[bad].tolist()}"
            )

    @staticmethod
    def _is_first_step(incremental_state: Dict[Any, Any]) -> bool:
        return "prev_key" not in incremental_state.get(0, {})

    def _padding_mask(self, src_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Key padding mask, or None when no pad precedes a real token (unpadded or right-padded: the causal mask
        already hides the pads from real tokens, and SDPA keeps its causal fast path)."""
        pad = src_tokens.eq(self.cfg.decoder.pad_idx)  # B x T
        if not bool((pad[:, :-1] & ~pad[:, 1:]).any()):
            return None
        return pad

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        src_tokens: torch.Tensor,
        image: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        incremental_state: Optional[Dict[Any, Any]] = None,
        last_only: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """``src_tokens`` B x T (pad = ``pad_idx``), ``image`` B_img x 3 x H x W or B_img x K x 3 x H x W for the
        B_img rows that hold images (in batch order), ``image_mask`` B x T bool with K * L True on those rows and none
        on text-only rows (None/absent without images). With ``incremental_state`` (a dict
        kept by the caller, ``{}`` at the start) pass the full prefix each call; after the first call only the last
        token is run (its ``image_mask`` entry must be False) and ``lm_logits`` is B x 1 x V. ``last_only`` projects
        only the last position onto the vocabulary (B x 1 x V): a generator's first step needs no prompt logits, and
        the T x V projection dominates its cost at large vocabularies."""
        if incremental_state is None or self._is_first_step(incremental_state):
            embeds = self.embed_inputs(src_tokens, image, image_mask)  # B x T x D
            first_step = True
            if incremental_state is not None:  # later steps mask pad keys iff the prompt has pads (one sync here)
                incremental_state["prompt_has_pads"] = bool(src_tokens.eq(self.cfg.decoder.pad_idx).any())
                incremental_state["prompt_rows"] = list(range(src_tokens.size(0)))  # the prompt each row holds
        else:
            if image_mask is not None and bool(image_mask[:, -1].any()):
                raise ValueError("incremental steps after the first cannot take image placeholder rows")
            if self.fast_decoding and self._decode_step_supported():
                hidden = self.decode_step(src_tokens, incremental_state)  # B x 1 x D
                return {"lm_logits": self.vocab_logits(hidden)}  # B x 1 x V
            embeds = self.decoder.embed_tokens(src_tokens[:, -1:])  # B x 1 x D
            first_step = False
            incremental_state.pop("prompt_rows", None)  # the keys now hold more than each row's prompt
        if incremental_state is not None:
            incremental_state["is_first_step"] = first_step  # read by torchscale's Decoder
        hidden, _ = self.decoder(
            src_tokens,
            self_attn_padding_mask=self._padding_mask(src_tokens),
            incremental_state=incremental_state,
            token_embeddings=embeds,
            features_only=True,
        )
        if last_only:
            return {"lm_logits": self.vocab_logits(hidden[:, -1:])}  # B x 1 x V
        return {"lm_logits": self.decoder.output_layer(hidden)}  # B x T x V

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output projection ``hidden W^T`` (B x T x V), as torchscale's ``output_layer``.

        The projection is an :class:`~unilm_vl.modules.onednn.OneDnnLinear`, so a generator's rows on CPU without
        autograd take oneDNN (65037 x 768: 1 row 8.4 ms against MKL's 12.3, 8 rows 14.8 against 28.4). Where that
        path is off (``UNILM_VL_ONEDNN=0``, or a torch build without oneDNN) a few rows on CPU without autograd are
        computed as ``(W hidden^T)^T``: the same products summed in another order, which MKL streams faster than
        ``hidden W^T`` (65037 x 768 at 2 rows: 9.3 against 26.5 ms). A decode step reads the whole V x D matrix for a
        handful of rows, so this GEMM is bound by reading the weight and the kernel's access pattern decides."""
        proj = self.decoder.output_projection
        if (
            hidden.device.type != "cpu"
            or torch.is_grad_enabled()
            or type(proj) not in (nn.Linear, OneDnnLinear)  # a subclass (e.g. LoRA) may add to the product
            or proj.bias is not None
            or hidden.dtype != proj.weight.dtype
            or onednn_applies(hidden, proj.weight)
        ):
            return self.decoder.output_layer(hidden)
        rows = hidden.reshape(-1, hidden.size(-1))  # R x D
        logits = (proj.weight @ rows.t()).t().contiguous()  # R x V
        return logits.view(*hidden.shape[:-1], logits.size(-1))

    def _decode_step_supported(self) -> bool:
        """:meth:`decode_step` re-implements torchscale's pre-LN decoder layer without the options Kosmos-2 does
        not use; any of them (built by hand into a decoder) sends the step through torchscale instead."""
        dec = self.decoder
        return (
            dec.layernorm_embedding is None
            and dec.self_attn_relative_position is None
            and all(
                layer.normalize_before
                and layer.drop_path is None
                and not layer.is_moe_layer
                and layer.encoder_attn is None
                and isinstance(layer.self_attn, SdpaMultiheadAttention)
                for layer in dec.layers
            )
        )

    def decode_step(self, src_tokens: torch.Tensor, incremental_state: Dict[Any, Any]) -> torch.Tensor:
        """One incremental step after the first: the last token of ``src_tokens`` (the full N x S prefix) through
        every decoder layer, its keys/values appended to each layer's :class:`KVCache`; returns the final hidden
        state N x 1 x D (before the output projection).

        The same maths as torchscale's ``Decoder.forward`` + ``DecoderLayer.forward`` (pre-LN, sub-LN) with our
        SDPA attention, written out because torchscale cannot be driven this way: its attention module takes the
        cache only as ``prev_key``/``prev_value`` tensors that it concatenates, and its ``Decoder.forward`` embeds
        the positions of the whole prefix at every step. Pad keys are masked when the prompt had pads (exactly what
        torchscale's path does for a real last token; :func:`~unilm_vl.modules.generation.generate` never feeds a
        pad after the prompt)."""
        dec = self.decoder
        rows = src_tokens.size(0)
        x = dec.embed_scale * dec.embed_tokens(src_tokens[:, -1:]) + dec.embed_positions.last(src_tokens)  # N x 1 x D
        x = dec.dropout_module(x)
        allowed = dead = None
        if incremental_state.get("prompt_has_pads", True):
            allowed = src_tokens.ne(self.cfg.decoder.pad_idx).view(rows, 1, 1, -1)  # N x 1 x 1 x S
            dead = ~allowed.any(dim=-1, keepdim=True)  # N x 1 x 1 x 1: a pad-only row attends to nothing
            allowed = allowed | dead
        reserve = int(incremental_state.get("max_new_tokens", 64))
        for idx, layer in enumerate(dec.layers):
            layer_state = incremental_state[idx]
            cache = layer_state.get("kv_cache")
            if cache is None:  # first fast step: move the prompt's keys/values into a buffer for the whole output
                cache = KVCache(
                    layer_state["prev_key"],
                    layer_state["prev_value"],
                    layer_state["prev_key"].size(2) + reserve,
                    prefix_rows=incremental_state.get("prompt_rows"),  # beams of one input share their prompt
                )
                layer_state["kv_cache"] = cache
            attn = layer.self_attn
            heads, head_dim = attn.num_heads, attn.head_dim
            residual = x
            h = layer.self_attn_layer_norm(x)  # N x 1 x D
            q = attn.q_proj(h).view(rows, 1, heads, head_dim).transpose(1, 2)  # N x H x 1 x d
            k = attn.k_proj(h).view(rows, 1, heads, head_dim).transpose(1, 2)  # N x H x 1 x d
            v = attn.v_proj(h).view(rows, 1, heads, head_dim).transpose(1, 2)  # N x H x 1 x d
            keys, values = cache.append(k, v)  # N x H x S x d each
            layer_state["prev_key"], layer_state["prev_value"] = keys, values
            dropout_p = attn.dropout_module.p if attn.training else 0.0
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, dropout_p=dropout_p)
            if dead is not None:
                out = out.masked_fill(dead, 0.0)
            out = out.transpose(1, 2).reshape(rows, 1, heads * head_dim)  # N x 1 x D
            if attn.inner_attn_ln is not None:
                out = attn.inner_attn_ln(out)
            x = layer.residual_connection(layer.dropout_module(attn.out_proj(out)), residual)
            x = layer.residual_connection(layer.ffn(layer.final_layer_norm(x)), x)
        incremental_state.pop("prompt_rows", None)  # the caches hold it now
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        return x  # N x 1 x D

    @staticmethod
    def reorder_incremental_state(incremental_state: Dict[Any, Any], new_order: torch.Tensor) -> None:
        """Reorder the cached keys/values along the batch (beam search). While the state holds only the prompt,
        ``prompt_rows`` records which prompt each row now holds, so that the decode steps' :class:`KVCache` can
        leave the prompt positions in place when it reorders beams of one input."""
        order_list = None  # new_order.tolist(), read once for every layer, only where needed (a sync on a GPU)
        if "prompt_rows" in incremental_state:
            order_list = new_order.tolist()
            incremental_state["prompt_rows"] = [incremental_state["prompt_rows"][i] for i in order_list]
        for layer_state in incremental_state.values():
            if not isinstance(layer_state, dict):
                continue
            cache = layer_state.get("kv_cache")
            if cache is not None:  # one index_select per buffer into the cache's spare buffer
                order_list = new_order.tolist() if order_list is None else order_list
                cache.reorder(new_order, order_list)
                layer_state["prev_key"], layer_state["prev_value"] = cache.keys, cache.values
                continue
            for key in ("prev_key", "prev_value"):
                if key in layer_state:
                    layer_state[key] = layer_state[key].index_select(0, new_order)
