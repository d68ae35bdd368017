"""Model ``cosa``: COSA (Chen et al. 2023, "COSA: Concatenated Sample Pretrained Vision-Language Foundation
Model"), a thin fairseq adapter over :class:`unilm_vl.modules.cosa.CosaModule` (reference: the
release, TXH-mercury/COSA ``model/pretrain.py``, ``model/modeling.py`` and ``test.py``).

Input (``net_input`` of the cosa tasks): ``frames`` B x T x 3 x H x W (normalised; T = 1 for images),
``text_ids``/``text_mask`` B x L (WordPiece ``[CLS] ... [SEP]``, pad), for QA also ``question_ids``/``question_mask``
and ``answer_ids``/``answer_mask``; plus ``tasks`` (a task string such as ``ret_cret_ccap_cmlm``, passed by the
criterion). The forward runs the origin objectives on the batch and the concatenated ones (``cret``, ``cmlm``,
``ccap``) on the concatenated batch, and returns ``{"origin": {...}, "concatenated": {...}, "contra_temp"}`` with
the per-objective outputs of :meth:`CosaModule.forward_pass`; the criterion ``cosa`` turns them into losses.

Concatenation (the release's ``model/pretrain.py``): every sample is joined with K-1 partners
(``--concatenated-nums``, 4 as released) drawn from the GLOBAL batch (frames and text all-gathered across the
data-parallel ranks, no gradient) or, with ``--concat-partners local``, from the local batch only (no all-gather
traffic; documented deviation). Frames are stacked in order (own sample first, B x K*T x 3 x H x W) and re-encoded;
captions are joined into one paragraph of ``max_text_tokens * ceil(K/2)`` tokens. The partner draw, the token
maskers and the ITM negatives use a generator seeded from fairseq's per-update seed (``--seed`` + update number) and
the rank: reproducible, different per rank (the release draws the same partners on every rank).

Evaluation API (used by ``unilm_vl/eval/cosa*``): ``image_size``, ``image_mean``, ``image_std``,
:meth:`encode_video`, :meth:`encode_text`, :meth:`itm_logits`, :meth:`generate_caption` (beam search over the
masked-causal formulation: the next token is read at an appended ``[MASK]``), :meth:`generate_answer` (greedy).

Weights: ``--pretrained-bert`` (local HF BERT dir), ``--pretrained-vision`` (local open_clip / timm file) and
``--pretrained-cosa`` (a released COSA ``model_step_*.pt``, keys mapped by :func:`convert_release_state`).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture

from ..losses.cosa import parse_cosa_tasks
from ..losses.distributed import data_parallel_rank_world
from ..modules.cosa import (
    CosaBertConfig,
    CosaConfig,
    CosaModule,
    CosaVisionConfig,
    PassContext,
    causal_mask,
    concatenate_samples,
    draw_partners,
    gather_batch,
    paragraph_length,
    prefix_causal_mask,
    resize_frame_embedding,
)
from ..modules.generation import SearchConfig, generate
from ..safe_load import load_checkpoint_file
from .clip import set_default_arg

DEFAULT_MAX_TEXT_TOKENS = 40  # the release's caption length, when the task does not say

VISION_KIND_CHOICES = ChoiceEnum(["open_clip", "timm"])
CONCAT_PARTNER_CHOICES = ChoiceEnum(["global", "local"])
ATTN_CHOICES = ChoiceEnum(["sdpa", "eager"])


@dataclass
class CosaModelConfig(FairseqDataclass):
    vision_kind: VISION_KIND_CHOICES = field(
        default="open_clip",
        metadata={
            "help": "vision tower family: open_clip (a ViT, all tokens after ln_post) or timm (e.g. "
            "a Swin, final-stage "
            "tokens)"
        },
    )
    vision_model: str = field(
        default="unilm-vl-clip-tiny",
        metadata={"help": "open_clip registry name or timm model name of the per-frame vision tower"},
    )
    pretrained_vision: Optional[str] = field(
        default=None,
        metadata={
            "help": "local weight file of the vision tower (open_clip state dict, or timm/original Swin checkpoint)"
        },
    )
    vision_image_size: int = field(
        default=0,
        metadata={
            "help": "input resolution of the vision tower (0: the tower's default); positional embeddings of loaded "
            "weights are resized"
        },
    )
    force_quick_gelu: bool = field(default=False, metadata={"help": "QuickGELU in the ViT (OpenAI CLIP weights)"})
    pretrained_bert: Optional[str] = field(
        default=None,
        metadata={
            "help": "local HF BERT directory (config.json + weights); its shape wins over the --bert-* sizes and its "
            "vocabulary must match the task's"
        },
    )
    bert_hidden_size: int = field(default=768, metadata={"help": "BERT width D"})
    bert_layers: int = field(default=12, metadata={"help": "BERT layers (each: self-attn, cross-attn, FFN)"})
    bert_heads: int = field(default=12, metadata={"help": "BERT attention heads"})
    bert_ffn_dim: int = field(default=3072, metadata={"help": "BERT feed-forward width"})
    bert_max_positions: int = field(default=512, metadata={"help": "BERT absolute positions"})
    bert_dropout: float = field(default=0.1, metadata={"help": "BERT hidden and attention dropout"})
    attn_implementation: ATTN_CHOICES = field(
        default="sdpa", metadata={"help": "HF attention kernel of the BERT (both honour COSA's explicit masks)"}
    )
    num_frame_embeddings: int = field(
        default=4,
        metadata={
            "help": "rows of the learned per-frame embedding (release: frames per sample x K = 1 x 4 in pretraining, "
            "the finetuning frame count when finetuning); nearest-resized to other frame counts and on load"
        },
    )
    contra_dim: int = field(default=512, metadata={"help": "width of the ITC projections"})
    init_contra_temp: float = field(
        default=0.07,
        metadata={"help": "initial raw learnable ITC temperature (logits = sim / temp; not clamped, as released)"},
    )
    concatenated_nums: int = field(
        default=4,
        metadata={"help": "K: samples per concatenated sample (own + K-1 partners) of the cret/cmlm/ccap objectives"},
    )
    concat_partners: CONCAT_PARTNER_CHOICES = field(
        default="global",
        metadata={
            "help": "global: partners from the all-gathered global batch (as released); local: from this rank's batch "
            "only (no all-gather of frames and text)"
        },
    )
    mlm_prob: float = field(default=0.15, metadata={"help": "MLM masking probability"})
    caption_prob: float = field(default=0.6, metadata={"help": "masked-causal captioning masking probability"})
    answer_prob: float = field(default=0.99, metadata={"help": "QA answer masking probability"})
    mask_random_low: int = field(
        default=-1,
        metadata={
            "help": "random replacements (10%% of the masked tokens) are ids in [mask_random_low, "
            "vocab); -1: the first "
            "id after the special tokens ([PAD]/[UNK]/[CLS]/[SEP]/[MASK]); release (bert-base-uncased): 106"
        },
    )
    frozen_vision: bool = field(
        default=False,
        metadata={
            "help": "freeze the vision tower; the concatenated pass then reuses the origin pass's vision tokens "
            "(all-gathered, no gradient) instead of re-encoding the partner pixels, as released"
        },
    )
    checkpoint_activations: bool = field(
        default=False,
        metadata={
            "help": "recompute every ViT block and BERT layer in the backward pass instead of storing its activations "
            "(less memory for the large shapes, about one more forward of compute; same gradients)"
        },
    )
    pretrained_cosa: Optional[str] = field(
        default=None,
        metadata={
            "help": "local released COSA checkpoint (model_step_*.pt) to start from; keys are mapped, the frame "
            "embedding is resized"
        },
    )
    caption_beam: int = field(default=3, metadata={"help": "beam size of generate_caption (release: 3)"})
    caption_lenpen: float = field(default=0.6, metadata={"help": "length penalty of caption beam search"})
    max_generation_len: int = field(default=40, metadata={"help": "max new tokens of caption/answer decoding"})


@dataclass
class CosaSpecialIds:
    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    unk_id: int


def special_ids_from_tokenizer(tokenizer) -> CosaSpecialIds:
    """Vocabulary size and special ids of a :class:`unilm_vl.data.tokenizers.WordPieceTokenizer`."""
    for name in ("vocab_size", "pad_id", "bos_id", "eos_id", "mask_id", "unk_id"):
        if not hasattr(tokenizer, name):
            raise TypeError(f"the cosa model needs a WordPiece tokenizer with {name}; got {type(tokenizer).__name__}")
    return CosaSpecialIds(
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        cls_id=tokenizer.bos_id,
        sep_id=tokenizer.eos_id,
        mask_id=tokenizer.mask_id,
        unk_id=tokenizer.unk_id,
    )


@register_model("cosa", dataclass=CosaModelConfig)
class CosaModel(BaseFairseqModel):
    def __init__(self, cfg: CosaModelConfig, special: CosaSpecialIds, max_text_tokens: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.special = special
        # caption length of the data (the task's --max-text-tokens); paragraphs get max_text_tokens * ceil(K/2)
        self.max_text_tokens = int(max_text_tokens or DEFAULT_MAX_TEXT_TOKENS)
        if cfg.concatenated_nums < 1:
            raise ValueError(f"--concatenated-nums must be >= 1, got {cfg.concatenated_nums}")
        self.net = CosaModule(
            CosaConfig(
                vision=CosaVisionConfig(
                    kind=str(cfg.vision_kind),
                    model_name=cfg.vision_model,
                    pretrained=cfg.pretrained_vision,
                    image_size=cfg.vision_image_size or None,
                    force_quick_gelu=cfg.force_quick_gelu,
                ),
                bert=CosaBertConfig(
                    vocab_size=special.vocab_size,
                    hidden_size=cfg.bert_hidden_size,
                    num_layers=cfg.bert_layers,
                    num_heads=cfg.bert_heads,
                    intermediate_size=cfg.bert_ffn_dim,
                    max_positions=cfg.bert_max_positions,
                    dropout=cfg.bert_dropout,
                    pad_id=special.pad_id,
                    pretrained=cfg.pretrained_bert,
                    attn_implementation=str(cfg.attn_implementation),
                ),
                num_frame_embeddings=cfg.num_frame_embeddings,
                contra_dim=cfg.contra_dim,
                init_contra_temp=cfg.init_contra_temp,
            )
        )
        low = cfg.mask_random_low
        if low < 0:
            low = max(special.pad_id, special.cls_id, special.sep_id, special.mask_id, special.unk_id) + 1
        if not 0 <= low < special.vocab_size:
            raise ValueError(f"--mask-random-low {low} is outside the vocabulary of {special.vocab_size} tokens")
        self.random_low = low
        if cfg.pretrained_cosa is not None:
            self.load_release_checkpoint(cfg.pretrained_cosa)
        if cfg.frozen_vision:
            self.net.vision.requires_grad_(False)
        if getattr(cfg, "checkpoint_activations", False):
            self.net.set_activation_checkpointing(True)

    @classmethod
    def build_model(cls, cfg: CosaModelConfig, task):
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is None:
            raise TypeError("the cosa model needs a task with a WordPiece `tokenizer` (cosa_pretrain/cosa_finetune)")
        task_cfg = getattr(task, "cfg", None)
        return cls(cfg, special_ids_from_tokenizer(tokenizer), getattr(task_cfg, "max_text_tokens", None))

    # ---------------------------------------------------------------------------------------------- training
    @property
    def image_size(self) -> int:
        return self.net.vision.image_size

    @property
    def image_mean(self):
        return self.net.vision.image_mean

    @property
    def image_std(self):
        return self.net.vision.image_std

    def pass_context(self, rank: int, world: int, local_size: int, device) -> PassContext:
        """Distributed position, the per-rank generator (seeded from the global RNG, which fairseq seeds with seed +
        update number before every step) and the masking settings."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
        sizes = None
        if world > 1:
            sizes = [int(s) for s in gather_batch([torch.tensor([local_size], device=device)], world, [0])[0]]
        sp = self.special
        return PassContext(
            rank=rank,
            world_size=world,
            generator=generator,
            local_sizes=sizes,
            pad_id=sp.pad_id,
            cls_id=sp.cls_id,
            sep_id=sp.sep_id,
            mask_id=sp.mask_id,
            random_low=self.random_low,
            random_high=sp.vocab_size,
            mlm_prob=self.cfg.mlm_prob,
            caption_prob=self.cfg.caption_prob,
            answer_prob=self.cfg.answer_prob,
        )

    def concatenate(self, frames, text_ids, text_mask, ctx: PassContext, partners: Optional[torch.Tensor] = None):
        """The concatenated batch (frames B x K*T x 3 x H x W, paragraph ids/mask B x Lp) and the partner indices
        (B x K-1, into the global batch, or the local one with ``--concat-partners local``). ``frames`` may be any
        per-frame tensor B x T x ... (the vision tokens of the frozen-vision feature path)."""
        k = self.cfg.concatenated_nums
        if str(self.cfg.concat_partners) == "local" or ctx.world_size == 1:
            all_frames, all_ids, all_mask = frames, text_ids, text_mask
        else:
            all_frames, all_ids, all_mask = gather_batch(
                [frames, text_ids, text_mask], ctx.world_size, [None, self.special.pad_id, 0]
            )
        if partners is None:
            partners = draw_partners(frames.shape[0], all_frames.shape[0], k, ctx.generator)
        out = concatenate_samples(
            frames,
            text_ids,
            text_mask,
            all_frames,
            all_ids,
            all_mask,
            partners,
            paragraph_length(self.max_text_tokens, k),
            self.special.cls_id,
            self.special.sep_id,
            self.special.pad_id,
        )
        return (*out, partners)

    def forward(
        self,
        frames,
        text_ids,
        text_mask,
        question_ids=None,
        question_mask=None,
        answer_ids=None,
        answer_mask=None,
        tasks: str = "ret",
        partners: Optional[torch.Tensor] = None,
    ) -> Dict[str, object]:
        """Outputs of the objectives named by ``tasks`` (see the module docstring); ``partners`` fixes the partner
        draw (tests)."""
        origin, concatenated = parse_cosa_tasks(tasks)
        rank, world = data_parallel_rank_world() if self.training else (0, 1)
        ctx = self.pass_context(rank, world, frames.shape[0], frames.device)
        qa = None
        if question_ids is not None:
            qa = {
                "question_ids": question_ids,
                "question_mask": question_mask,
                "answer_ids": answer_ids,
                "answer_mask": answer_mask,
            }
        out: Dict[str, object] = {
            "contra_temp": self.net.contra_temp,
            "rank": rank,
            "world_size": world,
            "local_sizes": ctx.local_sizes,
        }
        tokens = None
        if self.cfg.frozen_vision:  # the feature path: encode once, concatenate vision tokens
            with torch.no_grad():
                tokens = self.net.encode_frames(frames)  # B x T x x x C
        if origin:
            out["origin"] = self.net.forward_pass(frames, text_ids, text_mask, origin, ctx, qa, tokens=tokens)
        if concatenated:
            source = frames if tokens is None else tokens
            c_source, c_ids, c_mask, used = self.concatenate(source, text_ids, text_mask, ctx, partners)
            ctx.itm_divisor = 3  # the release fuses only the first B // 3 samples here (at least 1 here)
            if tokens is None:
                out["concatenated"] = self.net.forward_pass(c_source, c_ids, c_mask, concatenated, ctx)
            else:
                out["concatenated"] = self.net.forward_pass(None, c_ids, c_mask, concatenated, ctx, tokens=c_source)
            out["concatenated"]["partners"] = used
        return out

    def max_positions(self):
        return None

    # -------------------------------------------------------------------------------------------- evaluation
    def encode_video(self, frames: torch.Tensor) -> Dict[str, torch.Tensor]:
        """frames B x T x 3 x H x W -> ``video_tokens`` B x T*x x D (fusion input) and ``video_features`` B x E."""
        tokens = self.net.encode_frames(frames)  # B x T x x x C
        return {"video_tokens": self.net.video_input(tokens), "video_features": self.net.video_feature(tokens)}

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens, features = self.net.text_feature(text_ids, text_mask)
        return {"text_tokens": tokens, "text_features": features}

    def itm_logits(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match logit per pair (B): ``l_match - l_nomatch`` of the ITM head, so ``sigmoid`` of it equals the
        release's ``softmax(itm_logits)[:, 1]``."""
        logits = self.net.itm_logits(text_ids, text_mask, video_tokens)  # B x 2
        return logits[:, 1] - logits[:, 0]

    def _strip(self, ids) -> List[int]:
        sp = self.special
        out = []
        for t in ids:
            if t == sp.sep_id:
                break
            if t not in (sp.cls_id, sp.pad_id, sp.mask_id):
                out.append(int(t))
        return out

    @torch.no_grad()
    def generate_caption(
        self, frames: torch.Tensor, beam_size: Optional[int] = None, max_len: Optional[int] = None
    ) -> List[List[int]]:
        """Beam search (release: beam 3, length penalty 0.6, captions of at most 40 tokens) from ``[CLS]``; each step
        appends ``[MASK]`` to the causal prefix and reads the next token's logits there. A hypothesis scores
        sum(log p) / len ** lenpen with len counting [SEP], like HF's with the 1-token prompt; at ``max_len`` tokens
        [SEP] is forced (HF stops without it). Returns ids without specials."""
        video = self.encode_video(frames)["video_tokens"]  # B x N x D
        b = frames.shape[0]
        prompt = torch.full((b, 1), self.special.cls_id, dtype=torch.long, device=frames.device)  # B x 1
        search = SearchConfig(
            beam=beam_size or self.cfg.caption_beam,
            lenpen=self.cfg.caption_lenpen,
            max_len_b=max_len or self.cfg.max_generation_len,
        )
        hyps = generate(
            _MaskedCausalStep(self),
            prompt,
            video,
            None,
            search,
            pad_idx=self.special.pad_id,
            eos_idx=self.special.sep_id,
        )
        return [self._strip(h[0].tokens.tolist()) if h else [] for h in hyps]

    @torch.no_grad()
    def generate_answer(
        self,
        frames: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        max_len: Optional[int] = None,
    ) -> List[List[int]]:
        """Greedy decoding after ``[question ; [CLS]]`` with the prefix-causal mask (release: beam 1, 40 new tokens,
        stop at [SEP]); each step reads the logits at an appended ``[MASK]``. Ids without specials."""
        video = self.encode_video(frames)["video_tokens"]  # B x N x D
        b, device = frames.shape[0], frames.device
        answer = torch.full((b, 1), self.special.cls_id, dtype=torch.long, device=device)  # B x 1
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for _ in range(max_len or self.cfg.max_generation_len):
            step = torch.cat([answer, answer.new_full((b, 1), self.special.mask_id)], dim=1)  # B x (t+1)
            attention = prefix_causal_mask(question_mask, torch.ones_like(step))  # B x (Lq+t+1) x (Lq+t+1)
            hidden = self.net.fuse(torch.cat([question_ids, step], dim=1), attention, video)  # B x . x D
            logits = self.net.lm_logits(hidden[:, -1]).float()  # B x V
            logits[:, self.special.pad_id] = float("-inf")
            token = logits.argmax(dim=-1)  # B
            token = torch.where(done, token.new_full((b,), self.special.pad_id), token)
            answer = torch.cat([answer, token[:, None]], dim=1)
            done |= token.eq(self.special.sep_id)
            if bool(done.all()):
                break
        return [self._strip(row[1:]) for row in answer.tolist()]

    # ---------------------------------------------------------------------------------------------- weights
    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints with another frame count: the frame embedding is nearest-resized (release behaviour)."""
        key = (name + "." if name else "") + "net.video_frame_embedding"
        if key in state_dict:
            state_dict[key] = resize_frame_embedding(state_dict[key], self.cfg.num_frame_embeddings)
        super().upgrade_state_dict_named(state_dict, name)

    def load_release_checkpoint(self, path: str) -> None:
        import os

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--pretrained-cosa not found: {path} (only local files are supported)")
        state = load_checkpoint_file(path)  # runs no code from the file
        converted = convert_release_state(state, self.net)
        missing, unexpected = self.net.load_state_dict(converted, strict=False)
        if unexpected or missing:
            raise ValueError(
                f"{path}: keys do not match the cosa model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def convert_release_state(state: Dict[str, torch.Tensor], net: CosaModule) -> Dict[str, torch.Tensor]:
    """A released COSA state dict (``module.`` prefixes, fp16 under apex O2) -> :class:`CosaModule` keys: the
    non-vision keys are shared (``multimodal_encoder.*``, ``video_frame_embedding``, ...); ``clip_model.visual.*``
    -> ``vision.visual.*`` (the unused ``proj`` and CLIP text tower are dropped); ``video_encoder.*`` (Swin) goes
    through timm's checkpoint filter into ``vision.backbone.*``. The frame embedding is resized to the model's."""
    state = {
        (k[len("module.") :] if k.startswith("module.") else k): v.float() if v.is_floating_point() else v
        for k, v in state.items()
    }
    out, swin = {}, {}
    for key, value in state.items():
        if key.startswith("clip_model."):
            if key.startswith("clip_model.visual.") and key != "clip_model.visual.proj":  # proj is unused
                out["vision." + key[len("clip_model.") :]] = value
        elif key.startswith("video_encoder."):
            swin[key[len("video_encoder.") :]] = value
        elif key.endswith("embeddings.position_ids"):
            continue  # a buffer older transformers saved
        else:
            out[key] = value
    if swin:
        from timm.models.swin_transformer import checkpoint_filter_fn

        backbone = net.vision.backbone
        for key, value in checkpoint_filter_fn(swin, backbone).items():
            if not key.startswith("head."):
                out["vision.backbone." + key] = value
    if "video_frame_embedding" in out:
        out["video_frame_embedding"] = resize_frame_embedding(
            out["video_frame_embedding"], net.video_frame_embedding.shape[1]
        )
    return out


class _MaskedCausalStep:
    """The contract of :func:`unilm_vl.modules.generation.generate` over COSA's masked-causal captioning: every call
    gets the full prefix, appends ``[MASK]``, runs the causal fused pass (no cache, as released) and returns the
    logits at the ``[MASK]`` position (N x 1 x V whatever ``last_only`` says: there are no prompt logits). The video
    tokens ride in the incremental state."""

    def __init__(self, model: CosaModel):
        self.model = model

    def __call__(self, tokens, image=None, image_mask=None, incremental_state=None, last_only=True):
        if image is not None:
            incremental_state["video"] = image
        video = incremental_state["video"]  # N x Nv x D
        ids = torch.cat([tokens, tokens.new_full((tokens.shape[0], 1), self.model.special.mask_id)], dim=1)
        attention = causal_mask(torch.ones_like(ids))  # N x T+1 x T+1
        hidden = self.model.net.fuse(ids, attention, video)  # N x T+1 x D
        return {"lm_logits": self.model.net.lm_logits(hidden[:, -1:]).float()}  # N x 1 x V

    @staticmethod
    def reorder_incremental_state(incremental_state, order):
        incremental_state["video"] = incremental_state["video"].index_select(0, order)


@register_model_architecture("cosa", "cosa_tiny")
def cosa_tiny(args):
    """CPU tests: unilm-vl-clip-tiny ViT at 64 px (2 x 128 wide, 65 tokens per frame), a 2-layer 128-wide BERT."""
    set_default_arg(args, "vision_kind", "open_clip")
    set_default_arg(args, "vision_model", "unilm-vl-clip-tiny")
    set_default_arg(args, "bert_hidden_size", 128)
    set_default_arg(args, "bert_layers", 2)
    set_default_arg(args, "bert_heads", 4)
    set_default_arg(args, "bert_ffn_dim", 512)
    set_default_arg(args, "bert_max_positions", 256)
    set_default_arg(args, "contra_dim", 64)


@register_model_architecture("cosa", "cosa_base")
def cosa_base(args):
    """COSA-base of the release (5m/17m): Swin-B/4 window 7 at 224 (timm swin_base_patch4_window7_224, 49 tokens x
    1024 per frame) + bert-base-uncased with cross-attention (768 x 12), ITC 512, random-id range from 106."""
    set_default_arg(args, "vision_kind", "timm")
    set_default_arg(args, "vision_model", "swin_base_patch4_window7_224")
    set_default_arg(args, "bert_hidden_size", 768)
    set_default_arg(args, "bert_layers", 12)
    set_default_arg(args, "bert_heads", 12)
    set_default_arg(args, "bert_ffn_dim", 3072)
    set_default_arg(args, "bert_max_positions", 512)
    set_default_arg(args, "contra_dim", 512)
    set_default_arg(args, "mask_random_low", 106)


@register_model_architecture("cosa", "cosa_base_clip")
def cosa_base_clip(args):
    """The release's CLI-default tower: CLIP ViT-B/16 at 224 (197 tokens x 768) + bert-base-uncased."""
    set_default_arg(args, "vision_kind", "open_clip")
    set_default_arg(args, "vision_model", "ViT-B-16")
    args.force_quick_gelu = True  # a store_true flag: argparse leaves False, never None (OpenAI weights)
    cosa_base(args)


@register_model_architecture("cosa", "cosa_large")
def cosa_large(args):
    """COSA-large (417m): CLIP ViT-L/14-336 run at 224 (positional embedding resized 24^2 -> 16^2, 257 tokens x
    1024) + bert-base-uncased with cross-attention (the release's pretrain-large config keeps BERT-base)."""
    set_default_arg(args, "vision_kind", "open_clip")
    set_default_arg(args, "vision_model", "ViT-L-14-336")
    set_default_arg(args, "vision_image_size", 224)
    args.force_quick_gelu = True  # OpenAI weights
    cosa_base(args)
