"""COSA open-ended video / image QA: greedy answer generation, exact-match accuracy (as released) and the official
VQA accuracy (TXH-mercury/COSA ``test.py``).

Protocol (``pretrain.py:623-657``, ``test.py:52-119`` of the release): the question is tokenised to
``[CLS] question [SEP]`` padded to ``max_text_tokens`` (40), the model decodes the answer greedily
(``generate_answer``, at most ``--max-len`` = 40 new tokens, stopping at ``[SEP]``), and the answer is the
WordPiece decode of the generated ids.

Scores, in percent:

- ``exact_match`` (the release's accuracy): the decoded answer string equals the ground-truth string exactly
  (no normalisation, so ``"Two"`` vs ``"two"`` is wrong). The ground truth is the single answer, or, for a list
  of human answers (VQAv2), one of them drawn at random (seeded by ``--seed``), as the release does.
- ``vqa_accuracy``: the official VQA rule of :func:`unilm_vl.eval.metrics.vqa_accuracy`: per question the mean over
  the leave-one-out subsets of ``min(#humans who gave the answer / 3, 1)`` after the standard answer normalisation
  (applied, officially, when the humans disagree). It needs at least two human answers, so it is computed over
  the questions that have them (``num_vqa_questions``) and is ``None``, with a warning, when none has.

Annotation: ``{"video_id", "question": str | [str], "answer": str | [str] | [[str]], "question_id"?}``
(:mod:`unilm_vl.data.cosa`). Answers are written as ``[{"question_id", "video_id", "question", "answer"}]`` with
``--predictions`` (the VQAv2 submission keeps ``question_id`` and ``answer``).

CLI::

    python -m unilm_vl.eval.cosa_qa --checkpoint CKPT --data qa_test.json [--frames-root DIR] [--num-frames 8]
        [--max-len 40] [--seed 0] [--predictions answers.json] [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from unilm_vl.cli import progress
from unilm_vl.data.cosa import EvalClips
from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.cosa_common import (
    CosaEvalModel,
    CosaEvalSet,
    add_cosa_eval_args,
    frames_root_of,
    load_cosa,
    load_eval_set,
    maybe_device,
    num_frames_of,
    round_floats,
    tokenize,
)
from unilm_vl.eval.metrics import vqa_accuracy
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


def qa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]], seed: int = 0) -> Dict[str, Any]:
    """``exact_match`` and ``vqa_accuracy`` of ``predictions[i]`` against the human answers ``answers[i]``
    (module docstring)."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"need one prediction per question, got {len(predictions)} for {len(answers)}")
    rng = random.Random(seed)
    correct = 0
    multi_pred: Dict[int, str] = {}
    multi_ann: Dict[int, List[str]] = {}
    for i, (pred, human) in enumerate(zip(predictions, answers)):
        if isinstance(human, str) or not human:
            raise ValueError(f"question {i}: answers must be a non-empty list of strings, got {human!r}")
        gt = human[0] if len(human) == 1 else human[rng.randrange(len(human))]
        correct += int(pred == gt)
        if len(human) >= 2:
            multi_pred[i], multi_ann[i] = pred, list(human)
    out: Dict[str, Any] = {
        "exact_match": 100.0 * correct / len(answers),
        "num_questions": len(answers),
        "num_vqa_questions": len(multi_ann),
        "vqa_accuracy": None,
    }
    if multi_ann:
        out["vqa_accuracy"] = vqa_accuracy(multi_pred, multi_ann)["accuracy"]
    else:
        logger.warning("no question has two or more human answers: the VQA accuracy is not defined")
    return out


@torch.no_grad()
def generate_answers(
    model: CosaEvalModel,
    tokenizer,
    transform: Callable,
    eval_set: CosaEvalSet,
    frames_root: str,
    num_frames: int,
    max_text_tokens: int,
    max_len: int = 40,
    batch_size: int = 16,
    device: Optional[str] = None,
    workers: int = 0,
) -> List[str]:
    """The decoded answer of every QA pair of the set, in order."""
    if not eval_set.qa:
        raise ValueError("the evaluation set has no question/answer entries")
    clips = EvalClips(frames_root, [eval_set.video_ids[v] for v, _, _, _ in eval_set.qa], num_frames, transform)
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size, shuffle=False, num_workers=workers)
    ids, mask = tokenize(tokenizer, [q for _, q, _, _ in eval_set.qa], max_text_tokens)  # N_q x L
    answers: List[str] = []
    for frames in progress(loader, "answering"):  # B x T x 3 x H x W
        rows = slice(len(answers), len(answers) + frames.shape[0])
        outputs = model.generate_answer(
            maybe_device(frames, device), maybe_device(ids[rows], device), maybe_device(mask[rows], device), max_len
        )
        if len(outputs) != frames.shape[0]:
            raise ValueError(f"generate_answer returned {len(outputs)} answers for {frames.shape[0]} questions")
        answers.extend(tokenizer.decode(a) for a in outputs)
    return answers


def evaluate_cosa_qa(
    model: CosaEvalModel,
    tokenizer,
    transform: Callable,
    eval_set: CosaEvalSet,
    frames_root: str,
    num_frames: int,
    max_text_tokens: int,
    max_len: int = 40,
    batch_size: int = 16,
    device: Optional[str] = None,
    workers: int = 0,
    seed: int = 0,
):
    """``(metrics, answers)`` (:func:`qa_metrics`, the decoded answers in annotation order)."""
    answers = generate_answers(
        model,
        tokenizer,
        transform,
        eval_set,
        frames_root,
        num_frames,
        max_text_tokens,
        max_len,
        batch_size,
        device,
        workers,
    )
    return qa_metrics(answers, [human for _, _, human, _ in eval_set.qa], seed), answers


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COSA open-ended QA (greedy answers, exact match + VQA accuracy).")
    add_cosa_eval_args(parser)
    parser.add_argument("--max-len", type=int, default=40, help="at most this many answer tokens (released: 40)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random human answer used as exact-match ground truth (lists of answers)",
    )
    parser.add_argument("--predictions", default=None, help="write the answers to this json file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    model, task = load_cosa(args.checkpoint, args.device)
    eval_set = load_eval_set(args.data)
    metrics, answers = evaluate_cosa_qa(
        model,
        task.tokenizer,
        task.clip_transform(train=False),
        eval_set,
        frames_root_of(args),
        num_frames_of(args, task),
        task.cfg.max_text_tokens,
        args.max_len,
        args.batch_size,
        args.device,
        args.workers,
        args.seed,
    )
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as fh:
            json.dump(
                [
                    {"question_id": qid, "video_id": eval_set.video_ids[v], "question": q, "answer": a}
                    for (v, q, _, qid), a in zip(eval_set.qa, answers)
                ],
                fh,
                indent=1,
            )
        logger.info("wrote %s", args.predictions)
    logger.info("QA metrics: %s", round_floats(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
