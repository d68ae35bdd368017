"""COSMOS towers (Kim et al., CVPR 2025): open_clip CLIP towers that also return tokens, two attentional cross
poolers, a multi-resolution image forward, and the student / EMA-teacher pair (ExplainableML/cosmos
``src/open_clip/model.py``, ``transformer.py``, ``src/main.py``).

Student outputs for V image views (2 global crops, then local crops) and K caption views, B samples each::

    f_img[v] = visual(crop v) @ proj                                   V x B x D  (one tower pass per resolution)
    f_txt[u] = EOT-pooled text tower @ text_projection                  K x B x D
    I_tok = image_token_mapping(patch tokens of crop g1 after ln_post)  B x P x D
    T_tok = text_token_mapping(all L token outputs of caption g1)      B x L x D
    img_cross[v] = || f_img[v] + text_cross_pool(q=f_img[v], kv=T_tok) ||
    txt_cross[u] = || f_txt[u] + image_cross_pool(q=f_txt[u], kv=I_tok) ||

The teacher (a deep copy of the student, no gradients) sees only the global crops and the global captions and
returns their normalised pooled features. It is updated by EMA over *all* student parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from ..constants import CLIP_INIT_LOGIT_SCALE, CLIP_MAX_LOGIT_SCALE
from ..losses.ema import ema_update_
from .clip import ClipTowersConfig, build_open_clip, tower_image_size


@dataclass
class CosmosConfig:
    towers: ClipTowersConfig
    cross_attn_heads: int = 8
    """heads of both cross poolers (the reference: 8 at D = 512)."""
    init_distill_logit_scale: float = CLIP_INIT_LOGIT_SCALE
    """initial ``distill_logit_scale`` (ln(1/0.07), as ``logit_scale``)."""
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE
    mask_text_padding: bool = False
    """False (the reference): the image-pooled query attends to all L text positions, padding included.
    True: positions after EOT are masked out of the attention."""


class AttentionalCrossPooler(nn.Module):
    """``MHA(query=LN_q(q), key=value=LN_k(x))`` (reference ``AttentionalCrossPooler``): no residual, no MLP.
    ``q``: N x D (one query per row), ``x``: N x T x D; returns N x D."""

    def __init__(self, dim: int, heads: int, key_dim: Optional[int] = None):
        super().__init__()
        key_dim = key_dim or dim
        if dim % heads:
            raise ValueError(f"cross-pooler width {dim} is not divisible by {heads} heads")
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(key_dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=key_dim, vdim=key_dim, bias=True, batch_first=True)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        kv = self.ln_k(keys)  # N x T x D
        out, _ = self.attn(
            self.ln_q(query).unsqueeze(1), kv, kv, key_padding_mask=key_padding_mask, need_weights=False
        )  # N x 1 x D
        return out.squeeze(1)  # N x D


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """A ViT position table (1 + gh*gw) x W resampled bicubically to ``new_grid`` (class row kept).

    open_clip 3.3.0's VisionTransformer adds its fixed-size table in ``_embeds`` and only offers
    ``resize_pos_embed`` on state dicts at load time, so local crops (smaller grids) need this at forward time,
    as the reference's ``interpolate_pos_encoding`` (DINO's). We resample to the exact target size (``size=``)
    instead of DINO's ``scale_factor`` with its +0.1 offset, which only existed to round to that same size."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    cls, patches = pos_embed[:1], pos_embed[1:]  # 1 x W, (gh gw) x W
    width = pos_embed.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], width).permute(0, 3, 1, 2)  # 1 x W x gh x gw
    patches = F.interpolate(patches.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(-1, width)  # (gh' gw') x W
    return torch.cat([cls, patches], dim=0)


def vision_forward(visual: nn.Module, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An open_clip ViT at any resolution that is a multiple of its patch size: (pooled @ proj: B x D, patch
    tokens after ``ln_post`` without the class token: B x P x W). Same maths as ``VisionTransformer.forward``
    except for the interpolated position table."""
    grid = tuple(visual.grid_size)
    ph, pw = visual.patch_size
    if image.shape[-2] % ph or image.shape[-1] % pw:
        raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of the patch size {(ph, pw)}")
    new_grid = (image.shape[-2] // ph, image.shape[-1] // pw)
    x = visual.conv1(image)  # B x W x gh x gw
    x = x.flatten(2).transpose(1, 2)  # B x P x W
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # B x 1 x W
    x = torch.cat([cls, x], dim=1)  # B x (1 + P) x W
    x = x + interpolate_pos_embed(visual.positional_embedding, grid, new_grid).to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    x = visual.transformer(x)  # B x (1 + P) x W
    pooled, tokens = visual._pool(x)  # B x W, B x P x W
    if visual.proj is not None:
        pooled = pooled @ visual.proj  # B x D
    return pooled, tokens


class CosmosNet(nn.Module):
    """One COSMOS network (student or teacher): open_clip towers, token mappings, cross poolers, two scales."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.cfg = cfg
        clip = build_open_clip(cfg.towers)
        visual = clip.visual
        if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{cfg.towers.model_name}: COSMOS needs a plain open_clip ViT image tower")
        if not hasattr(clip, "token_embedding"):
            raise ValueError(
                f"{cfg.towers.model_name}: COSMOS needs open_clip's built-in text tower (CLIP, not CustomTextCLIP)"
            )
        self.clip = clip
        embed_dim = int(visual.output_dim)
        self.embed_dim = embed_dim
        self.image_token_mapping = nn.Linear(visual.conv1.out_channels, embed_dim)
        self.text_token_mapping = nn.Linear(clip.token_embedding.embedding_dim, embed_dim)
        self.image_cross_pool = AttentionalCrossPooler(embed_dim, cfg.cross_attn_heads)  # text query, patch keys
        self.text_cross_pool = AttentionalCrossPooler(embed_dim, cfg.cross_attn_heads)  # image query, token keys
        self.distill_logit_scale = nn.Parameter(torch.tensor(float(cfg.init_distill_logit_scale)))

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    # ---- towers
    def image_tower(self, views: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views grouped by resolution (each G x B x 3 x H x W, one tower pass per group) -> pooled V x B x D
        (un-normalised, view-major) and the patch tokens of the first group (G_0 x B x P x W)."""
        pooled, first_tokens = [], None
        for group in views:
            g, b = group.shape[:2]
            p, tokens = vision_forward(self.clip.visual, group.flatten(0, 1))  # (g B) x D, (g B) x P x W
            pooled.append(p.view(g, b, -1))
            if first_tokens is None:
                first_tokens = tokens.view(g, b, *tokens.shape[1:])
        return torch.cat(pooled, dim=0), first_tokens

    def text_tower(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """N x L token ids -> (EOT-pooled @ text_projection: N x D, un-normalised; all L outputs after
        ``ln_final``: N x L x W)."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)  # N x L x W
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # N x L x W
        pooled = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # N x D
        return pooled, x

    def text_padding_mask(self, text: torch.Tensor) -> Optional[torch.Tensor]:
        """True at positions after the EOT token (the argmax id) when ``mask_text_padding``; else None."""
        if not self.cfg.mask_text_padding:
            return None
        eot = text.argmax(dim=-1, keepdim=True)  # N x 1
        return torch.arange(text.shape[-1], device=text.device).unsqueeze(0) > eot  # N x L

    # ---- evaluation encoders
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(vision_forward(self.clip.visual, image)[0], dim=-1)  # B x D

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(text)[0], dim=-1)  # B x D

    def encode_image_dense(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised pooled B x D, patch tokens after ``ln_post`` times ``visual.proj``: B x P x D), the
        reference's segmentation features (``@ visual.proj``, not ``image_token_mapping``)."""
        pooled, tokens = vision_forward(self.clip.visual, image)  # B x D, B x P x W
        if self.clip.visual.proj is not None:
            tokens = tokens @ self.clip.visual.proj  # B x P x D
        return F.normalize(pooled, dim=-1), tokens

    # ---- training forward
    def global_features(self, images: torch.Tensor, texts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Teacher path: G x B x 3 x H x W crops and G' x B x L captions -> normalised pooled features."""
        img, _ = self.image_tower([images])  # G x B x D
        txt, _ = self.text_tower(texts.flatten(0, 1))  # (G' B) x D
        return {
            "image_features": F.normalize(img, dim=-1),
            "text_features": F.normalize(txt, dim=-1).view(*texts.shape[:2], -1),
        }

    def forward(self, image_views: Sequence[torch.Tensor], texts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Student path. ``image_views``: groups of equal resolution, each G x B x 3 x H x W, the global crops
        first; ``texts``: K x B x L caption views, the global captions first. Returns normalised V x B x D / K x B x D
        ``image_features``, ``text_features``, ``image_cross``, ``text_cross`` and both exp(scales)."""
        K, B, L = texts.shape
        f_img, patches = self.image_tower(image_views)  # V x B x D, G x B x P x W
        f_txt, tokens = self.text_tower(texts.flatten(0, 1))  # (K B) x D, (K B) x L x W
        f_txt = f_txt.view(K, B, -1)  # K x B x D
        V, D = f_img.shape[0], f_img.shape[-1]
        text_keys = self.text_token_mapping(tokens[:B])  # B x L x D: caption g1
        image_keys = self.image_token_mapping(patches[0])  # B x P x D: crop g1
        mask = self.text_padding_mask(texts[0])  # B x L or None
        img_pool = self.text_cross_pool(
            f_img.flatten(0, 1), text_keys.repeat(V, 1, 1), None if mask is None else mask.repeat(V, 1)
        ).view(V, B, D)  # V x B x D
        txt_pool = self.image_cross_pool(f_txt.flatten(0, 1), image_keys.repeat(K, 1, 1)).view(K, B, D)
        return {
            "image_features": F.normalize(f_img, dim=-1),
            "text_features": F.normalize(f_txt, dim=-1),
            "image_cross": F.normalize(f_img + img_pool, dim=-1),
            "text_cross": F.normalize(f_txt + txt_pool, dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "distill_logit_scale": self.distill_logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Both log scales to [0, ln(max_logit_scale)] (the reference clamps after every step)."""
        top = math.log(self.cfg.max_logit_scale)
        self.logit_scale.clamp_(0, top)
        self.distill_logit_scale.clamp_(0, top)


class CosmosModule(nn.Module):
    """Student and EMA teacher. ``forward`` takes the task's multi-crop batch (or a plain one: one view each)."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.cfg = cfg
        self.student = CosmosNet(cfg)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return tower_image_size(self.student.clip)

    @property
    def context_length(self) -> int:
        return int(self.student.clip.context_length)

    @staticmethod
    def as_views(image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Plain batches (B x 3 x H x W, B x L) become one view each."""
        return (image.unsqueeze(0) if image.dim() == 4 else image), (text.unsqueeze(0) if text.dim() == 2 else text)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, image_local: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """``image``: G x B x 3 x S x S global crops (or B x 3 x S x S), ``image_local``: N x B x 3 x s x s,
        ``text``: K x B x L caption views (or B x L). The teacher sees the G global crops and the first
        min(G, K) captions (the global ones)."""
        image, text = self.as_views(image, text)
        groups: List[torch.Tensor] = [image] + ([image_local] if image_local is not None and len(image_local) else [])
        out = self.student(groups, text)
        with torch.no_grad():
            teacher = self.teacher.global_features(image, text[: image.shape[0]])
        out["teacher_image_features"] = teacher["image_features"]  # G x B x D
        out["teacher_text_features"] = teacher["text_features"]  # G' x B x D
        out["num_global_crops"] = image.shape[0]
        return out

    def student_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return list(self.student.named_parameters())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``theta_t <- m theta_t + (1 - m) theta_s`` over all parameters (buffers are not averaged)."""
        student = self.student_parameters()
        teacher = list(self.teacher.named_parameters())
        if [n for n, _ in student] != [n for n, _ in teacher]:
            raise RuntimeError("teacher and student have different parameters")
        ema_update_([p for _, p in teacher], [p for _, p in student], momentum)

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        self.student.clamp_logit_scales()
        self.teacher.clamp_logit_scales()
