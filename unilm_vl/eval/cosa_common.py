"""What the COSA benchmarks (:mod:`~unilm_vl.eval.cosa_retrieval`, :mod:`~unilm_vl.eval.cosa_caption`,
:mod:`~unilm_vl.eval.cosa_qa`) share: the model protocol they use, the evaluation set read from a released-layout
annotation json, test-mode clip batches and the CLI options.

The runners depend only on :class:`CosaEvalModel` plus a tokenizer and a clip transform, so their logic is tested
with a fake model whose scores the test controls.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch

from unilm_vl.checkpoint import load_model
from unilm_vl.cli import progress
from unilm_vl.data.cosa import EvalClips, read_annotation


class CosaEvalModel(Protocol):
    """The model interface the COSA benchmarks use (implemented by the ``cosa`` model)."""

    def encode_video(self, frames: torch.Tensor) -> Dict[str, torch.Tensor]:
        """B x T x 3 x H x W -> ``{"video_tokens": B x N x W, "video_features": B x D (L2-normalised)}``."""

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """B x L ids and mask -> ``{"text_tokens": B x L x W, "text_features": B x D (L2-normalised)}``."""

    def itm_logits(self, video_tokens: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Fused ITM score of each (video, text) pair: B match logits (or B x 2 [no-match, match] logits)."""

    def generate_caption(self, frames: torch.Tensor, beam_size: int, max_len: int) -> List[List[int]]:
        """Beam-search captions, ids without special tokens."""

    def generate_answer(
        self, frames: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor, max_len: int
    ) -> List[List[int]]:
        """Greedy answers, ids without special tokens."""


@dataclass
class CosaEvalSet:
    """An evaluation set: unique videos in order of first appearance, every text flattened with the index of its
    video, and every QA pair ``(video index, question, [human answers], question id)``."""

    video_ids: List[str]
    texts: List[str] = field(default_factory=list)
    text_to_video: List[int] = field(default_factory=list)
    qa: List[Tuple[int, str, List[str], Any]] = field(default_factory=list)

    def references(self) -> Dict[str, List[str]]:
        """``{video_id: [its texts]}``."""
        out: Dict[str, List[str]] = {v: [] for v in self.video_ids}
        for text, v in zip(self.texts, self.text_to_video):
            out[self.video_ids[v]].append(text)
        return out


def load_eval_set(annotation: str) -> CosaEvalSet:
    """Read an annotation json (:func:`unilm_vl.data.cosa.read_annotation`). Entries naming the same video are
    merged, so the one-caption-per-entry and the ``desc`` list layouts give the same set."""
    index: Dict[str, int] = {}
    out = CosaEvalSet(video_ids=[])
    for entry in read_annotation(annotation):
        vid = entry["video_id"]
        if vid not in index:
            index[vid] = len(out.video_ids)
            out.video_ids.append(vid)
        for caption in entry["captions"]:
            out.texts.append(caption)
            out.text_to_video.append(index[vid])
        for question, answers, qid in entry["qa"]:
            out.qa.append((index[vid], question, answers, qid))
    return out


def clip_batches(
    frames_root: str,
    video_ids: Sequence[str],
    num_frames: int,
    transform: Callable,
    batch_size: int = 16,
    workers: int = 0,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(start, B x T x 3 x H x W)`` test-mode clips of ``video_ids`` in order (middle frame per segment)."""
    loader = torch.utils.data.DataLoader(
        EvalClips(frames_root, video_ids, num_frames, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
    )
    start = 0
    for frames in progress(loader, "videos"):  # B x T x 3 x H x W
        yield start, frames
        start += frames.shape[0]


def tokenize(tokenizer, texts: Sequence[str], length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] ... [SEP]`` rows padded to ``length`` and their masks (1 = real token), as the task tokenises."""
    ids = tokenizer.encode_batch(list(texts), length)  # N x L
    return ids, (ids != tokenizer.pad_id).long()


def load_cosa(checkpoint: str, device: str = "cpu"):
    """``(model, task)`` of a ``cosa`` checkpoint (any ``cosa_pretrain`` / ``cosa_finetune`` task), loaded by
    :func:`unilm_vl.checkpoint.load_model`."""
    model, _, task = load_model(checkpoint, device=device)
    for name in ("encode_video", "encode_text"):
        if not hasattr(model, name):
            raise TypeError(f"{checkpoint}: {type(model).__name__} has no {name}; a cosa model is needed")
    if not hasattr(task, "clip_transform"):
        raise TypeError(f"{checkpoint}: task {type(task).__name__} is not a COSA task")
    return model, task


def add_cosa_eval_args(parser: argparse.ArgumentParser) -> None:
    """Options every COSA benchmark CLI shares."""
    parser.add_argument("--checkpoint", required=True, help="unilm_vl checkpoint of a cosa model (.pt)")
    parser.add_argument(
        "--data",
        required=True,
        help="annotation json in the released layout ({'video_id', 'desc' | 'question'/'answer'})",
    )
    parser.add_argument(
        "--frames-root", default=None, help="directory of <video_id>/ frame folders (default: frames/ beside --data)"
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames per clip, middle of each segment (default: the task's --num-frames-test)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding frames")
    parser.add_argument("--output", default=None, help="write the metrics to this json file")


def frames_root_of(args: argparse.Namespace) -> str:
    import os

    return args.frames_root or os.path.join(os.path.dirname(os.path.abspath(args.data)), "frames")


def num_frames_of(args: argparse.Namespace, task) -> int:
    return args.num_frames or task.num_frames_test


def round_floats(metrics: Dict[str, Any], ndigits: int = 2) -> Dict[str, Any]:
    """A copy with floats rounded for printing (nested dicts too)."""
    out: Dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = round_floats(value, ndigits)
        elif isinstance(value, float):
            out[key] = round(value, ndigits)
        else:
            out[key] = value
    return out


def maybe_device(x: torch.Tensor, device: Optional[str]) -> torch.Tensor:
    return x.to(device) if device is not None else x
