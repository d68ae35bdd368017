"""VQAv2 accuracy of an existing answer file, by the official rule (GT-Vision-Lab VQA API ``vqaEval.py``).

Scores come from :func:`unilm_vl.eval.metrics.vqa_accuracy`: per question the average over the 10 leave-one-out
subsets of 9 humans of ``min(#humans who gave the answer / 3, 1)``, after the official answer normalisation
(applied, as officially, only when the humans disagree); overall, per answer type and per question type, in
percent. Kosmos-2 reports VQAv2 test-dev (Peng et al. 2023); COSA's own QA score is exact match against one random
human answer (TXH-mercury/COSA ``test.py``), not this rule.

Files:

- ``--predictions``: ``[{"question_id": 1, "answer": "yes"}, ...]`` (the VQAv2 result / submission format) or a
  plain ``{question_id: answer}`` mapping;
- ``--annotations``: the VQAv2 annotation file ``{"annotations": [{"question_id", "answers": [{"answer": ...}
  x 10], "answer_type", "question_type", ...}]}``;
- ``--questions`` (optional): the matching VQAv2 question file ``{"questions": [{"question_id", ...}]}``; when
  given, only its questions are scored (e.g. a subset file), and each must be annotated.

Ids are compared as strings. A predicted question that is not scored raises an error listing a few; a scored
question without a prediction counts 0 and is logged.

CLI::

    python -m unilm_vl.eval.vqa --predictions answers.json --annotations v2_mscoco_val2014_annotations.json
        [--questions v2_OpenEnded_mscoco_val2014_questions.json] [--normalize-always] [--output out.json]
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from unilm_vl.data.jsonio import read_json
from unilm_vl.eval.common import write_metrics
from unilm_vl.eval.metrics import preview_ids, vqa_accuracy
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


def load_vqa_predictions(path: str) -> Dict[str, str]:
    """``{question id as str: answer}`` from ``[{"question_id", "answer"}]`` or an ``{id: answer}`` mapping."""
    data = read_json(path, "predictions")
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for n, entry in enumerate(data):
            if not isinstance(entry, dict) or "question_id" not in entry or "answer" not in entry:
                raise ValueError(f"{path}: entry {n} is not {{'question_id', 'answer'}}: {entry!r}")
            items.append((entry["question_id"], entry["answer"]))
    else:
        raise ValueError(
            f"{path}: predictions must be a list of {{'question_id', 'answer'}} or an "
            f"{{question_id: answer}} mapping, got {type(data).__name__}"
        )
    out: Dict[str, str] = {}
    for qid, answer in items:
        if not isinstance(answer, str):
            raise ValueError(f"{path}: answer of question {qid!r} is not a string: {answer!r}")
        if str(qid) in out:
            raise ValueError(f"{path}: question {qid!r} is answered more than once")
        out[str(qid)] = answer
    if not out:
        raise ValueError(f"{path}: no predictions")
    return out


def load_vqa_annotations(path: str) -> Tuple[Dict[str, List[str]], Dict[str, str], Dict[str, str]]:
    """``(answers, answer_types, question_types)`` keyed by question id as str, from a VQAv2 annotation file.

    The type maps hold only the questions that have the field; the caller passes a map on only when it is
    complete.
    """
    data = read_json(path, "annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{path}: expected a VQAv2 annotation file {{'annotations': [{{'question_id', "
            "'answers': [{'answer'}, ...]}]}"
        )
    answers: Dict[str, List[str]] = {}
    answer_types: Dict[str, str] = {}
    question_types: Dict[str, str] = {}
    for n, ann in enumerate(data["annotations"]):
        human = ann.get("answers") if isinstance(ann, dict) else None
        if (
            not isinstance(human, list)
            or "question_id" not in ann
            or len(human) < 2
            or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in human)
        ):
            raise ValueError(
                f"{path}: annotation {n} needs 'question_id' and 'answers': [{{'answer': str}}, ...] "
                f"(at least 2), got {str(ann)[:300]}"
            )
        qid = str(ann["question_id"])
        if qid in answers:
            raise ValueError(f"{path}: question {ann['question_id']!r} is annotated more than once")
        answers[qid] = [a["answer"] for a in human]
        if "answer_type" in ann:
            answer_types[qid] = ann["answer_type"]
        if "question_type" in ann:
            question_types[qid] = ann["question_type"]
    if not answers:
        raise ValueError(f"{path}: no annotations")
    return answers, answer_types, question_types


def load_vqa_question_ids(path: str) -> List[str]:
    """Question ids (as str) of a VQAv2 question file ``{"questions": [{"question_id", ...}]}``."""
    data = read_json(path, "questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path}: expected a VQAv2 question file {{'questions': [{{'question_id', ...}}]}}")
    ids = []
    for n, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or "question_id" not in q:
            raise ValueError(f"{path}: question {n} has no 'question_id': {q!r}")
        ids.append(str(q["question_id"]))
    return ids


def evaluate_vqa_files(
    predictions_path: str, annotations_path: str, questions_path: Optional[str] = None, normalize_always: bool = False
) -> Dict[str, Any]:
    """:func:`~unilm_vl.eval.metrics.vqa_accuracy` of an answer file against VQAv2 annotations."""
    predictions = load_vqa_predictions(predictions_path)
    answers, answer_types, question_types = load_vqa_annotations(annotations_path)
    scored_from = annotations_path
    if questions_path is not None:
        qids = load_vqa_question_ids(questions_path)
        unannotated = [q for q in qids if q not in answers]
        if unannotated:
            raise ValueError(
                f"{questions_path}: {len(unannotated)} questions are not in {annotations_path}: "
                f"{preview_ids(unannotated)}"
            )
        answers = {q: answers[q] for q in qids}
        scored_from = questions_path
    unknown = [q for q in predictions if q not in answers]
    if unknown:
        raise ValueError(
            f"{predictions_path}: {len(unknown)} predicted question ids are not in {scored_from}: "
            f"{preview_ids(unknown)}"
        )
    types = {}
    for name, table in (("answer_types", answer_types), ("question_types", question_types)):
        if all(q in table for q in answers):
            types[name] = table
        elif table:
            logger.warning("%s: some questions lack %s; no breakdown by it", annotations_path, name[:-1])
    logger.info("VQA: %d questions, %d predictions", len(answers), len(predictions))
    return vqa_accuracy(predictions, answers, normalize_always=normalize_always, **types)


def format_vqa_table(metrics: Dict[str, Any]) -> str:
    """Overall and per-answer-type accuracy, 2 decimals (as the official script rounds)."""
    lines = [
        f"overall {metrics['accuracy']:.2f}  ({metrics['num_questions']} questions, "
        f"{metrics['num_missing_predictions']} without prediction)"
    ]
    lines += [f"  {t:<10}{acc:>8.2f}" for t, acc in metrics.get("per_answer_type", {}).items()]
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score VQA answers with the official VQAv2 accuracy.")
    parser.add_argument(
        "--predictions", required=True, help="json: [{'question_id', 'answer'}] or a {question_id: answer} mapping"
    )
    parser.add_argument("--annotations", required=True, help="VQAv2 annotation json {'annotations': [...]}")
    parser.add_argument(
        "--questions", default=None, help="VQAv2 question json; when given, only its questions are scored"
    )
    parser.add_argument(
        "--normalize-always",
        action="store_true",
        help="normalise answers even when all humans agree (the official code does not)",
    )
    parser.add_argument("--output", default=None, help="write the metrics to this json file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    metrics = evaluate_vqa_files(
        args.predictions, args.annotations, args.questions, normalize_always=args.normalize_always
    )
    print(format_vqa_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
