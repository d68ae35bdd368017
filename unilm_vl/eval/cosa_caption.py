"""COSA video captioning: beam search, then BLEU-1..4, METEOR, ROUGE-L, CIDEr (TXH-mercury/COSA ``test.py``).

Protocol (``pretrain.py:546-567``, ``test.py:124-152,363-370`` of the release): one caption per video from
``generate_caption(frames, beam_size, max_len)`` (beam 3, at most 40 new tokens, stopping at ``[SEP]``; the beam
search itself is the model's), WordPiece-decoded without special tokens; scored against every ``desc`` of the
video by :func:`unilm_vl.eval.metrics.caption_metrics` (coco-caption: PTB tokenisation and METEOR 1.5 through
Java; each score x 100). Java is on PATH here; without it METEOR is left out with a warning, never invented.
The release rounds to 2 decimals and selects checkpoints by CIDEr.

Predictions are written as ``[{"video_id", "caption"}]`` (the release's ``step_<N>_tv.json`` layout) with
``--predictions``.

CLI::

    python -m unilm_vl.eval.cosa_caption --checkpoint CKPT --data videos/test.json [--frames-root DIR]
        [--num-frames 8] [--beam-size 3] [--max-len 40] [--tokenizer auto|ptb|simple] [--no-meteor]
        [--predictions preds.json] [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.cosa_common import (
    CosaEvalModel,
    CosaEvalSet,
    add_cosa_eval_args,
    clip_batches,
    frames_root_of,
    load_cosa,
    load_eval_set,
    maybe_device,
    num_frames_of,
    round_floats,
)
from unilm_vl.eval.metrics import caption_metrics
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_captions(
    model: CosaEvalModel,
    tokenizer,
    transform: Callable,
    eval_set: CosaEvalSet,
    frames_root: str,
    num_frames: int,
    beam_size: int = 3,
    max_len: int = 40,
    batch_size: int = 16,
    device: Optional[str] = None,
    workers: int = 0,
) -> Dict[str, str]:
    """``{video_id: decoded caption}`` for every video of the set."""
    predictions: Dict[str, str] = {}
    for start, frames in clip_batches(frames_root, eval_set.video_ids, num_frames, transform, batch_size, workers):
        outputs = model.generate_caption(maybe_device(frames, device), beam_size, max_len)
        if len(outputs) != frames.shape[0]:
            raise ValueError(f"generate_caption returned {len(outputs)} captions for {frames.shape[0]} clips")
        for offset, ids in enumerate(outputs):
            predictions[eval_set.video_ids[start + offset]] = tokenizer.decode(ids)
    return predictions


def evaluate_cosa_caption(
    model: CosaEvalModel,
    tokenizer,
    transform: Callable,
    eval_set: CosaEvalSet,
    frames_root: str,
    num_frames: int,
    beam_size: int = 3,
    max_len: int = 40,
    batch_size: int = 16,
    device: Optional[str] = None,
    workers: int = 0,
    caption_tokenizer: str = "auto",
    meteor: bool = True,
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(metrics, predictions)``: :func:`caption_metrics` of the generated captions against all the texts of
    each video."""
    references = eval_set.references()
    missing = [v for v, refs in references.items() if not refs]
    if missing:
        raise ValueError(f"{len(missing)} videos have no reference caption (desc), e.g. {missing[:3]}")
    predictions = generate_captions(
        model, tokenizer, transform, eval_set, frames_root, num_frames, beam_size, max_len, batch_size, device, workers
    )
    metrics = caption_metrics(predictions, references, tokenizer=caption_tokenizer, meteor=meteor)
    metrics.update(beam_size=beam_size, max_len=max_len)
    return metrics, predictions


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COSA video captioning (beam search + coco-caption metrics).")
    add_cosa_eval_args(parser)
    parser.add_argument("--beam-size", type=int, default=3, help="beam width (released: 3)")
    parser.add_argument("--max-len", type=int, default=40, help="at most this many new tokens (released: 40)")
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "ptb", "simple"),
        default="auto",
        help="caption tokenisation for scoring: ptb (Java), simple (Python), auto = ptb with Java",
    )
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java process)")
    parser.add_argument("--predictions", default=None, help="write [{'video_id', 'caption'}] to this json file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    model, task = load_cosa(args.checkpoint, args.device)
    metrics, predictions = evaluate_cosa_caption(
        model,
        task.tokenizer,
        task.clip_transform(train=False),
        load_eval_set(args.data),
        frames_root_of(args),
        num_frames_of(args, task),
        args.beam_size,
        args.max_len,
        args.batch_size,
        args.device,
        args.workers,
        args.tokenizer,
        not args.no_meteor,
    )
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as fh:
            json.dump([{"video_id": v, "caption": c} for v, c in predictions.items()], fh, indent=1)
        logger.info("wrote %s", args.predictions)
    logger.info("caption metrics: %s", round_floats(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
