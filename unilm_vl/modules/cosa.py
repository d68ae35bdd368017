"""COSA building blocks (Chen et al. 2023, "COSA: Concatenated Sample Pretrained Vision-Language Foundation Model"):
a per-frame vision tower, the vision -> text bridge with a learned per-frame embedding, ONE BERT with cross-attention
used in four attention modes, the heads, the token maskers, the sample concatenation and the ITM hard-negative draw.
Plain PyTorch configured by dataclasses; no fairseq import. Reference: the release, TXH-mercury/COSA
``model/modeling.py``, ``model/pretrain.py`` and ``model/bert.py`` (paths below are relative to that repository).

Flow of one fused pass (B samples of n frames, x vision tokens per frame, width C, BERT width D)::

    frames B x n x 3 x H x W --tower per frame--> B x n x x x C --Linear+LN--> + E_frame[j] --> B x (n*x) x D
    text ids B x L --BERT self-attn (mode mask) -> cross-attn to the video tokens -> FFN, per layer--> B x L x D

Attention modes of the text transformer, chosen by the inputs only (``model/bert.py``; the captioning and QA
masks are built in ``model/pretrain.py``):

| mode | video | self-attention mask M[i, j] (1 = may attend) |
|---|---|---|
| text encoder (ITC) | none, cross-attention skipped | pad[j] |
| bidirectional fusion (ITM, MLM) | all tokens visible | pad[j] |
| causal fusion (captioning) | all tokens visible | pad[j] * [j <= i] |
| prefix-causal (QA) | all tokens visible | question rows: qpad[j]; answer rows: qpad[j], then apad[j] * [j <= i] |

The text transformer is HF transformers' ``BertModel`` (``is_decoder=True`` and ``add_cross_attention=True`` so that
each layer holds self-attention -> cross-attention -> FFN, the layout of the release's
``bert-base-uncased-crossattn``) plus ``BertOnlyMLMHead`` tied to the word embeddings. We call its embeddings and
encoder directly with an explicit additive B x 1 x L x L mask instead of ``BertModel.forward``: the latter would
build a causal mask from ``is_decoder`` on its own. Parameter names equal the release's ``multimodal_encoder.*`` keys.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.cosa import IGNORE_INDEX
from ..safe_load import load_checkpoint_file

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- configs
@dataclass
class CosaVisionConfig:
    kind: str = "open_clip"
    """``open_clip`` (a ViT of open_clip's registry, all tokens after ``ln_post``, no ``proj``) or ``timm`` (e.g.
    a Swin: the final-stage tokens after ``norm``)."""
    model_name: str = "unilm-vl-clip-tiny"
    """open_clip registry name (kind open_clip) or timm model name (kind timm)."""
    pretrained: Optional[str] = None
    """Local weight file: an open_clip state dict (kind open_clip) or a timm/original checkpoint (kind timm)."""
    image_size: Optional[int] = None
    """Input resolution when it differs from the tower's default (positional embeddings are resized on load)."""
    force_quick_gelu: bool = False
    """QuickGELU activations (OpenAI CLIP weights)."""
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of ``timm.create_model`` (small test towers)."""


@dataclass
class CosaBertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    dropout: float = 0.1
    pad_id: int = 0
    pretrained: Optional[str] = None
    """Local HF BERT directory (config.json + model.safetensors or pytorch_model.bin); its shape wins."""
    attn_implementation: str = "sdpa"
    """HF attention kernel: ``sdpa`` or ``eager`` (both take our explicit additive masks)."""


@dataclass
class CosaConfig:
    vision: CosaVisionConfig = field(default_factory=CosaVisionConfig)
    bert: CosaBertConfig = field(default_factory=CosaBertConfig)
    num_frame_embeddings: int = 4
    """Rows of the learned per-frame embedding (release: max frames per sample x K = 1 x 4 in pretraining)."""
    contra_dim: int = 512
    """Width of the ITC projections."""
    init_contra_temp: float = 0.07
    """Initial value of the raw, learnable ITC temperature (logits = sim / temp)."""


# --------------------------------------------------------------------------------------------- frame embedding
def nearest_frame_indices(num_rows: int, num_frames: int) -> torch.Tensor:
    """Source rows of a nearest resize from ``num_rows`` to ``num_frames`` (``floor(j * rows / frames)``, what
    ``F.interpolate(mode='nearest')`` picks): 4 -> 8 gives [0,0,1,1,2,2,3,3], 8 -> 4 gives [0,2,4,6]."""
    return torch.div(torch.arange(num_frames) * num_rows, num_frames, rounding_mode="floor")


def resize_frame_embedding(embedding: torch.Tensor, num_frames: int) -> torch.Tensor:
    """1 x F x D -> 1 x n x D by nearest interpolation along the frame axis (``model/modeling.py``)."""
    if embedding.shape[1] == num_frames:
        return embedding
    resized = F.interpolate(embedding.transpose(1, 2), size=num_frames, mode="nearest")  # 1 x D x n
    return resized.transpose(1, 2)  # 1 x n x D


# ------------------------------------------------------------------------------------------------ vision towers
class OpenClipFrameTower(nn.Module):
    """An open_clip ViT image tower returning ALL tokens (class token first) after ``ln_post``, without ``proj``;
    the pooled feature for ITC is the class token (``model/modeling.py``)."""

    def __init__(self, cfg: CosaVisionConfig):
        super().__init__()
        import open_clip

        from .clip import _CONFIG_DIR, create_open_clip_model  # noqa: F401  (_CONFIG_DIR registers our tiny configs)

        if cfg.model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {cfg.model_name!r}")
        if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
            raise FileNotFoundError(f"--pretrained-vision not found: {cfg.pretrained} (only local files are supported)")
        kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
        clip = create_open_clip_model(cfg.model_name, force_quick_gelu=cfg.force_quick_gelu, **kwargs)
        if cfg.pretrained is not None:
            open_clip.load_checkpoint(clip, cfg.pretrained)
        self.visual = clip.visual
        self.visual.proj = None  # unused (COSA takes the tokens before proj); no parameter DDP would wait for
        if getattr(self.visual, "attn_pool", None) is not None or not hasattr(self.visual, "ln_post"):
            raise TypeError(f"{cfg.model_name}: COSA needs a plain open_clip VisionTransformer")
        size = self.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.width = int(self.visual.ln_post.weight.shape[0])
        pre = getattr(self.visual, "preprocess_cfg", None) or {}
        self.image_mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.image_std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.transformer(visual._embeds(images))  # N x (1+P) x C
        return visual.ln_post(x)  # N x (1+P) x C

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # N x C: class token


class TimmFrameTower(nn.Module):
    """A timm backbone (Swin in the release) returning the final-stage tokens after its norm; the pooled feature for
    ITC is their mean (``model/modeling.py``). Original Swin checkpoints load through timm's key filter."""

    def __init__(self, cfg: CosaVisionConfig):
        super().__init__()
        import timm

        if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
            raise FileNotFoundError(f"--pretrained-vision not found: {cfg.pretrained} (only local files are supported)")
        kwargs = dict(cfg.timm_kwargs)
        if cfg.image_size:
            kwargs["img_size"] = cfg.image_size
        if cfg.pretrained is not None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": cfg.pretrained})
        self.backbone = timm.create_model(cfg.model_name, num_classes=0, **kwargs)
        data_cfg = self.backbone.pretrained_cfg
        size = data_cfg.get("input_size", (3, 224, 224))
        self.image_size = int(cfg.image_size or size[-1])
        self.width = int(self.backbone.num_features)
        self.image_mean = tuple(data_cfg.get("mean", (0.485, 0.456, 0.406)))
        self.image_std = tuple(data_cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(images)  # N x h x w x C (timm Swin) or N x T x C
        return x.reshape(x.shape[0], -1, x.shape[-1])  # N x x x C

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # N x C


VISION_TOWERS = {"open_clip": OpenClipFrameTower, "timm": TimmFrameTower}


def build_vision_tower(cfg: CosaVisionConfig) -> nn.Module:
    if cfg.kind not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower kind {cfg.kind!r}; choose one of {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[cfg.kind](cfg)


# --------------------------------------------------------------------------------------------- attention masks
def bidirectional_mask(pad: torch.Tensor) -> torch.Tensor:
    """B x L key padding mask (1 = real) -> B x L x L: every row sees the real tokens."""
    return pad[:, None, :].expand(-1, pad.shape[1], -1)  # B x L x L


def causal_mask(pad: torch.Tensor) -> torch.Tensor:
    """Captioning mask ``M[i, j] = pad[j] * [j <= i]`` (pad rows are not zeroed, ``model/pretrain.py``): B x L x L."""
    return torch.tril(bidirectional_mask(pad))  # B x L x L


def prefix_causal_mask(question_pad: torch.Tensor, answer_pad: torch.Tensor) -> torch.Tensor:
    """QA mask over ``[question ; answer]``: question rows see the real question tokens only; answer rows see the
    real question tokens plus the causal real answer tokens. B x (Lq+La) x (Lq+La)."""
    lq, la = question_pad.shape[1], answer_pad.shape[1]
    hidden_answer = question_pad.new_zeros(question_pad.shape[0], lq, la)  # question rows never see the answer
    top = torch.cat([bidirectional_mask(question_pad), hidden_answer], dim=2)  # B x Lq x (Lq+La)
    bottom = torch.cat([question_pad[:, None, :].expand(-1, la, -1), causal_mask(answer_pad)], dim=2)  # B x La x .
    return torch.cat([top, bottom], dim=1)  # B x (Lq+La) x (Lq+La)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B x L x L (or B x L key padding) 0/1 mask -> B x 1 x L x L additive bias (0 or the dtype's minimum)."""
    if allowed.dim() == 2:
        allowed = bidirectional_mask(allowed)
    bias = (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min  # B x L x L
    return bias[:, None]  # B x 1 x L x L


# ------------------------------------------------------------------------------------------------------- BERT
def _hf_bert_config(cfg: CosaBertConfig):
    from transformers import BertConfig

    if cfg.pretrained is not None:
        if not os.path.isdir(cfg.pretrained) or not os.path.isfile(os.path.join(cfg.pretrained, "config.json")):
            raise FileNotFoundError(
                f"--pretrained-bert must be a local HF BERT directory with config.json: {cfg.pretrained}"
            )
        config = BertConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        if config.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"{cfg.pretrained}: vocab_size {config.vocab_size} differs from the tokenizer's {cfg.vocab_size}"
            )
    else:
        config = BertConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_positions,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            pad_token_id=cfg.pad_id,
            layer_norm_eps=1e-12,
        )
    config.is_decoder = True  # HF builds cross-attention only for decoders; we pass our own masks
    config.add_cross_attention = True
    config.use_cache = False
    config._attn_implementation = cfg.attn_implementation
    return config


def read_hf_bert_state(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a local HF BERT directory, old ``gamma``/``beta`` LayerNorm names renamed."""
    safetensors_file = os.path.join(path, "model.safetensors")
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(safetensors_file):
        from safetensors.torch import load_file

        state = load_file(safetensors_file)
    elif os.path.isfile(bin_file):
        state = load_checkpoint_file(bin_file)  # runs no code from the file
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    renamed = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[key] = value
    return renamed


class CosaBert(nn.Module):
    """HF ``BertModel`` with cross-attention in every layer + the tied MLM head (keys ``bert.*``, ``cls.*``)."""

    def __init__(self, cfg: CosaBertConfig):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertModel, BertOnlyMLMHead

        self.config = _hf_bert_config(cfg)
        self.bert = BertModel(self.config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(self.config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied, as HF post_init
        self.cls.predictions.decoder.bias = self.cls.predictions.bias
        if cfg.pretrained is not None:
            self.load_hf_weights(cfg.pretrained)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def load_hf_weights(self, path: str) -> None:
        """Load ``bert.*`` and ``cls.predictions.*`` from a HF BERT directory; the cross-attention stays random
        (it is not in BERT), the pooler and NSP head are dropped."""
        state = {
            k: v
            for k, v in read_hf_bert_state(path).items()
            if k.startswith("bert.") and not k.startswith("bert.pooler.") or k.startswith("cls.predictions.")
        }
        if "cls.predictions.decoder.weight" not in state and "bert.embeddings.word_embeddings.weight" in state:
            state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
        if "cls.predictions.decoder.bias" not in state and "cls.predictions.bias" in state:
            state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path}: unexpected BERT keys {unexpected[:5]}")
        logger.info("loaded BERT from %s; %d tensors left at random init (e.g. %s)", path, len(missing), missing[:2])

    def forward(
        self, input_ids: torch.Tensor, attention: torch.Tensor, video: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``attention``: B x L key padding mask or B x L x L mode mask (1 = visible); ``video``: B x N x D tokens
        for cross-attention (all visible) or None for the text-only encoder. Returns B x L x D."""
        x = self.bert.embeddings(input_ids=input_ids)  # B x L x D
        bias = additive_mask(attention, x.dtype)  # B x 1 x L x L
        out = self.bert.encoder(x, attention_mask=bias, encoder_hidden_states=video)
        return out.last_hidden_state  # B x L x D

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls(hidden)  # ... x V


# ------------------------------------------------------------------------------------------------------- heads
class ContraHead(nn.Module):
    """Bias-free ITC projection (release key ``contra_head_{t,v}.linear.weight``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class ItmHead(nn.Module):
    """Linear(D, D) -> GELU -> LayerNorm(D, eps 1e-12) -> Linear(D, 2) on the fused [CLS] output."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.layernorm = nn.LayerNorm(dim, eps=1e-12)
        self.linear2 = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.layernorm(F.gelu(self.linear1(x))))  # B x 2


# ------------------------------------------------------------------------------------------------------ masker
def mask_tokens(
    ids: torch.Tensor,
    prob: float,
    *,
    mask_id: int,
    pad_id: int,
    random_low: int,
    random_high: int,
    protected_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The release's TokenMasker (``model/modeling.py``) on B x L ids: candidates are positions >= 1 that are not pad
    (nor one of ``protected_ids``); each is selected with probability ``prob``, rows with no selection are redrawn
    until one is selected (rows without candidates stay unselected). Selected tokens become [MASK] (80%), a uniform
    id in [random_low, random_high) (10%) or stay (10%). Returns (masked ids, labels = original id where selected,
    else -100). Draws on the CPU from ``generator``; results are moved to ``ids.device``."""
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must be in (0, 1], got {prob}")
    if not 0 <= random_low < random_high:
        raise ValueError(f"need 0 <= random_low < random_high, got [{random_low}, {random_high})")
    cpu = ids.detach().cpu()
    candidate = cpu.ne(pad_id)  # B x L
    candidate[:, 0] = False
    for token in protected_ids:
        candidate &= cpu.ne(token)
    selected = torch.zeros_like(candidate)
    todo = candidate.any(dim=1)  # B
    while bool(todo.any()):
        draw = (torch.rand(cpu.shape, generator=generator) < prob) & candidate  # B x L
        selected[todo] = draw[todo]
        todo &= ~selected.any(dim=1)
    kind = torch.rand(cpu.shape, generator=generator)  # B x L
    random_ids = torch.randint(random_low, random_high, cpu.shape, generator=generator)  # B x L
    masked = cpu.clone()
    masked[selected & (kind < 0.8)] = mask_id
    swap = selected & (kind >= 0.8) & (kind < 0.9)
    masked[swap] = random_ids[swap]
    labels = torch.where(selected, cpu, torch.full_like(cpu, IGNORE_INDEX))
    return masked.to(ids.device), labels.to(ids.device)


# ------------------------------------------------------------------------------------------------ concatenation
def paragraph_length(max_text_tokens: int, k: int) -> int:
    """Token length of a concatenated paragraph: ``max_text_tokens * ceil(K / 2)`` (80 for 40 tokens, K = 3 or 4)."""
    return max_text_tokens * int(math.ceil(k / 2))


def draw_partners(num_local: int, num_global: int, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """B x (K-1) global indices of the partners: per row without replacement, the own index not excluded (as the
    release's ``random.sample(range(N), K-1)``); with replacement when the global batch has fewer than K-1."""
    if k < 1:
        raise ValueError(f"K (concatenated samples) must be >= 1, got {k}")
    if k == 1:
        return torch.zeros(num_local, 0, dtype=torch.long)
    if num_global >= k - 1:
        return torch.rand(num_local, num_global, generator=generator).argsort(dim=1)[:, : k - 1]  # B x (K-1)
    return torch.randint(0, num_global, (num_local, k - 1), generator=generator)  # B x (K-1)


def caption_tokens(ids: torch.Tensor, mask: torch.Tensor, special_ids: Sequence[int]) -> List[List[int]]:
    """The word pieces of each row: real tokens (mask 1) without [CLS]/[SEP]/pad."""
    special = set(int(s) for s in special_ids)
    rows = []
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        rows.append([t for t, m in zip(row, row_mask) if m and t not in special])
    return rows


def concatenate_samples(
    frames: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    all_frames: torch.Tensor,
    all_ids: torch.Tensor,
    all_mask: torch.Tensor,
    partners: torch.Tensor,
    max_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COSA's concatenated samples (``model/pretrain.py``): sample i followed by its partners ``partners[i]``
    (indices into the ``all_*`` global batch).

    Frames: ``cat([frames_i, all_frames[p1], ...], dim=frames)``: B x F0 x 3 x H x W -> B x K*F0 x 3 x H x W, own
    frames first. Text: ``[CLS] pieces_i pieces_p1 ... [SEP]`` truncated to ``max_len`` (``[SEP]`` kept) and padded
    to exactly ``max_len``: the WordPiece ids of ``" ".join(captions)`` (whitespace is a word boundary for BERT's
    basic tokeniser, so the join of the pieces equals the pieces of the join). Each caption brings the pieces the
    collater kept (the release joins raw strings; identical whenever a caption fits ``max_text_tokens``).
    Returns (frames, ids B x max_len, mask B x max_len)."""
    b = frames.shape[0]
    partners = partners.to(all_frames.device)
    pieces_of = [frames] + [all_frames.index_select(0, partners[:, j]) for j in range(partners.shape[1])]
    out_frames = torch.cat(pieces_of, dim=1)  # B x K*F0 x 3 x H x W
    specials = (cls_id, sep_id, pad_id)
    own = caption_tokens(text_ids, text_mask, specials)
    others = caption_tokens(all_ids, all_mask, specials)
    out_ids = torch.full((b, max_len), pad_id, dtype=torch.long)
    for i in range(b):
        pieces = list(own[i])
        for j in partners[i].tolist():
            pieces += others[j]
        row = [cls_id] + pieces[: max_len - 2] + [sep_id]
        out_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    out_ids = out_ids.to(text_ids.device)
    return out_frames, out_ids, out_ids.ne(pad_id).long()


def all_gather_padded(x: torch.Tensor, world_size: int) -> List[torch.Tensor]:
    """Every rank's ``x`` (no gradient), whatever its size along each dimension: pads to the largest shape, gathers
    and crops back. One tensor per rank, in rank order."""
    if world_size == 1:
        return [x.detach()]
    import torch.distributed as dist

    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    largest = torch.stack(shapes).max(dim=0).values.tolist()
    padded = x.detach().new_zeros(largest)
    padded[tuple(slice(0, s) for s in x.shape)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return [p[tuple(slice(0, int(s)) for s in shp.tolist())] for p, shp in zip(parts, shapes)]


def gather_batch(
    tensors: Sequence[torch.Tensor], world_size: int, pad_values: Sequence[Optional[int]]
) -> List[torch.Tensor]:
    """The global batch of each tensor (rank order, rows of rank r after those of ranks < r). Tensors whose trailing
    sizes differ across ranks (text lengths) are right-padded with their ``pad_values`` entry; ``None`` pads dim 1
    by repeating the last entry (clips with fewer frames repeat their last frame, as the collater does)."""
    out = []
    for x, pad in zip(tensors, pad_values):
        parts = all_gather_padded(x, world_size)
        width = [max(p.shape[d] for p in parts) for d in range(1, x.dim())]
        fixed = []
        for p in parts:
            if pad is None:
                if p.shape[1] < width[0]:
                    p = torch.cat([p, p[:, -1:].expand(-1, width[0] - p.shape[1], *p.shape[2:])], dim=1)
                fixed.append(p)
                continue
            q = p.new_full((p.shape[0], *width), pad)
            q[(slice(None),) + tuple(slice(0, s) for s in p.shape[1:])] = p
            fixed.append(q)
        out.append(torch.cat(fixed, dim=0))
    return out


# ------------------------------------------------------------------------------------------ ITM hard negatives
def hard_negative_weights(sim: torch.Tensor, offset: int) -> torch.Tensor:
    """Sampling weights of ITC-guided hard negatives: ``softmax(sim) + 1e-4`` over the n x N similarity rows,
    zero on each row's own positive (global column ``offset + i``)."""
    with torch.no_grad():
        weights = F.softmax(sim.float(), dim=1) + 1e-4  # n x N
        rows = torch.arange(sim.shape[0], device=sim.device)
        weights[rows, offset + rows] = 0.0
    return weights


def sample_hard_negatives(sim: torch.Tensor, offset: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One negative global index per row, drawn with :func:`hard_negative_weights` (never the own positive)."""
    weights = hard_negative_weights(sim, offset).cpu()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(sim.device)  # n


# ------------------------------------------------------------------------------------------------------ module
class CosaModule(nn.Module):
    """Vision tower, bridge, frame embedding, the cross-attention BERT and the heads, with release key names
    (``video_frame_embedding``, ``hidden_trans_video_multimodal``, ``multimodal_encoder``, ``contra_head_{t,v}``,
    ``contra_temp``, ``itm_head``; the tower is ``vision``)."""

    def __init__(self, cfg: CosaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision_tower(cfg.vision)
        self.multimodal_encoder = CosaBert(cfg.bert)
        dim, video_dim = self.multimodal_encoder.hidden_size, self.vision.width
        self.video_frame_embedding = nn.Parameter(0.02 * torch.randn(1, cfg.num_frame_embeddings, dim))
        self.hidden_trans_video_multimodal = nn.Sequential(nn.Linear(video_dim, dim), nn.LayerNorm(dim, eps=1e-12))
        self.contra_head_t = ContraHead(dim, cfg.contra_dim)
        self.contra_head_v = ContraHead(video_dim, cfg.contra_dim)
        self.contra_temp = nn.Parameter(torch.tensor(float(cfg.init_contra_temp)))
        self.itm_head = ItmHead(dim)

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Recompute each tower block and BERT layer during backward (training only): open_clip's / timm's
        ``set_grad_checkpointing`` and HF's non-reentrant gradient checkpointing, which keep the RNG state, so
        dropout masks and gradients equal the stored-activation run."""
        tower = self.vision.visual if isinstance(self.vision, OpenClipFrameTower) else self.vision.backbone
        tower.set_grad_checkpointing(enable)
        bert = self.multimodal_encoder.bert
        if enable:
            bert.activation_checkpointing_enable({"use_reentrant": False})
        else:
            bert.activation_checkpointing_disable()

    # -- vision
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """B x n x 3 x H x W -> B x n x x x C, every frame encoded independently."""
        b, n = frames.shape[:2]
        tokens = self.vision(frames.flatten(0, 1))  # B*n x x x C
        return tokens.view(b, n, *tokens.shape[1:])  # B x n x x x C

    def video_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x n x x x C -> B x n*x x D: bridge + frame embedding (nearest-resized to n), flattened frame-major."""
        b, n, x, _ = tokens.shape
        frame_emb = resize_frame_embedding(self.video_frame_embedding, n)  # 1 x n x D
        hidden = self.hidden_trans_video_multimodal(tokens) + frame_emb[:, :, None, :]  # B x n x x x D
        return hidden.reshape(b, n * x, -1)  # B x n*x x D

    def video_feature(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x n x x x C -> B x contra_dim, L2-normalised: pooled per frame, mean over frames, projected."""
        b, n = tokens.shape[:2]
        pooled = self.vision.pool(tokens.flatten(0, 1)).view(b, n, -1).mean(dim=1)  # B x C
        return F.normalize(self.contra_head_v(pooled), dim=-1)  # B x E

    # -- text
    def text_feature(self, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text-only encoder (no cross-attention, bidirectional): (B x L x D tokens, B x E normalised [CLS])."""
        hidden = self.multimodal_encoder(ids, mask)  # B x L x D
        return hidden, F.normalize(self.contra_head_t(hidden[:, 0]), dim=-1)

    def fuse(self, ids: torch.Tensor, attention: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Fused pass: B x L ids, B x L (bidirectional) or B x L x L (mode) mask, B x N x D video -> B x L x D."""
        return self.multimodal_encoder(ids, attention, video)

    def itm_logits(self, ids: torch.Tensor, mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.fuse(ids, mask, video)[:, 0])  # B x 2

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.multimodal_encoder.lm_logits(hidden)  # ... x V

    # -- objectives of one pass (origin or concatenated batch)
    def forward_pass(
        self,
        frames: Optional[torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
        objectives: Sequence[str],
        ctx: "PassContext",
        qa: Optional[Dict[str, torch.Tensor]] = None,
        tokens: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Model outputs of the objectives of one batch (``model/pretrain.py``); the losses are the criterion's.

        ``ret``: ``video_features``/``text_features`` (B x E, normalised, local rows) and the ITM batch
        ``itm_logits`` (3n x 2: (t, v), (t, v_neg), (t_neg, v) of the first n = max(1, B // ctx.itm_divisor)
        samples) with ``itm_labels`` [1]*n + [0]*2n; negatives are drawn from the global batch
        with ITC-guided weights. ``mlm``/``cap``/``qa``: ``<name>_logits`` M x V at the masked positions and
        ``<name>_labels`` M (the original ids; the prediction is at the same position, no shift). ``tokens``
        (B x n x x x C vision tokens) replaces ``frames`` when the vision output is already known (frozen tower).
        """
        unknown = set(objectives) - {"ret", "mlm", "cap", "qa"}
        if unknown:
            raise ValueError(f"unknown COSA objectives {sorted(unknown)}")
        out: Dict[str, torch.Tensor] = {}
        if tokens is None:
            tokens = self.encode_frames(frames)  # B x n x x x C
        video = self.video_input(tokens)  # B x N x D
        if "ret" in objectives:
            out.update(self._retrieval(tokens, video, ids, mask, ctx))
        if "mlm" in objectives:
            masked, labels = ctx.mask(ids, ctx.mlm_prob, protect_sep=True)
            hidden = self.fuse(masked, mask, video)  # B x L x D
            out.update(self._selected_logits("mlm", hidden, labels))
        if "cap" in objectives:
            masked, labels = ctx.mask(ids, ctx.caption_prob, protect_sep=False)
            hidden = self.fuse(masked, causal_mask(mask), video)  # B x L x D
            out.update(self._selected_logits("caption", hidden, labels))
        if "qa" in objectives:
            if qa is None:
                raise ValueError("objective qa needs question_ids/question_mask/answer_ids/answer_mask in net_input")
            masked, labels = ctx.mask(qa["answer_ids"], ctx.answer_prob, protect_sep=False)
            joint = torch.cat([qa["question_ids"], masked], dim=1)  # B x (Lq+La)
            attention = prefix_causal_mask(qa["question_mask"], qa["answer_mask"])  # B x (Lq+La) x (Lq+La)
            hidden = self.fuse(joint, attention, video)[:, qa["question_ids"].shape[1] :]  # B x La x D
            out.update(self._selected_logits("qa", hidden, labels))
        return out

    def _selected_logits(self, name: str, hidden: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        selected = labels.ne(IGNORE_INDEX)  # B x L
        return {f"{name}_logits": self.lm_logits(hidden[selected]), f"{name}_labels": labels[selected]}  # M x V, M

    def _retrieval(self, tokens, video, ids, mask, ctx: "PassContext") -> Dict[str, torch.Tensor]:
        b = ids.shape[0]
        video_features = self.video_feature(tokens)  # B x E
        text_features = self.text_feature(ids, mask)[1]  # B x E
        out = {"video_features": video_features, "text_features": text_features}
        n = max(1, b // ctx.itm_divisor)
        all_video_features, all_text_features, all_video, all_ids, all_mask = ctx.gather(
            [video_features, text_features, video, ids, mask], [0, 0, 0, ctx.pad_id, 0]
        )
        offset = ctx.offset(b)
        width = all_ids.shape[1]  # the longest text of all ranks
        ids = F.pad(ids, (0, width - ids.shape[1]), value=ctx.pad_id)  # B x L'
        mask = F.pad(mask, (0, width - mask.shape[1]), value=0)  # B x L'
        with torch.no_grad():
            temp = self.contra_temp.detach()
            sim_t2i = text_features[:n].detach() @ all_video_features.T / temp  # n x N
            sim_i2t = video_features[:n].detach() @ all_text_features.T / temp  # n x N
        neg_video = sample_hard_negatives(sim_t2i, offset, ctx.generator)  # n
        neg_text = sample_hard_negatives(sim_i2t, offset, ctx.generator)  # n
        itm_ids = torch.cat([ids[:n], ids[:n], all_ids[neg_text]], dim=0)  # 3n x L
        itm_mask = torch.cat([mask[:n], mask[:n], all_mask[neg_text]], dim=0)  # 3n x L
        itm_video = torch.cat([video[:n], all_video[neg_video], video[:n]], dim=0)  # 3n x N x D
        out["itm_logits"] = self.itm_logits(itm_ids, itm_mask, itm_video)  # 3n x 2
        out["itm_labels"] = torch.cat([ids.new_ones(n), ids.new_zeros(2 * n)])  # 3n
        out["itm_negatives"] = torch.stack([neg_video, neg_text], dim=1)  # n x 2 (global indices, for tests/logs)
        return out


@dataclass
class PassContext:
    """Everything a pass needs besides the batch: distributed position, the per-rank generator, special ids and
    masking rates. ``local_sizes`` are the batch sizes of all ranks (for the global offset of this rank)."""

    rank: int = 0
    world_size: int = 1
    generator: Optional[torch.Generator] = None
    local_sizes: Optional[List[int]] = None
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    random_low: int = 106
    random_high: int = 30522
    mlm_prob: float = 0.15
    caption_prob: float = 0.6
    answer_prob: float = 0.99
    itm_divisor: int = 1

    def gather(self, tensors: Sequence[torch.Tensor], pad_values: Sequence[int]) -> List[torch.Tensor]:
        """Global batch of each tensor, detached (the release's ``ddp_allgather``: no gradient)."""
        return gather_batch(tensors, self.world_size, pad_values)

    def offset(self, local_size: int) -> int:
        """Global row of this rank's first sample."""
        if self.world_size == 1:
            return 0
        sizes = self.local_sizes if self.local_sizes is not None else [local_size] * self.world_size
        return int(sum(sizes[: self.rank]))

    def mask(self, ids: torch.Tensor, prob: float, protect_sep: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`mask_tokens` with this context's ids. ``protect_sep``: [SEP] is never selected (MLM); captioning
        and QA keep it maskable, as released, so that the model learns to emit [SEP] and stop."""
        return mask_tokens(
            ids,
            prob,
            mask_id=self.mask_id,
            pad_id=self.pad_id,
            random_low=self.random_low,
            random_high=self.random_high,
            protected_ids=(self.cls_id, self.sep_id) if protect_sep else (self.cls_id,),
            generator=self.generator,
        )
