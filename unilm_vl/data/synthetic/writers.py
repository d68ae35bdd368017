"""Writers of the synthetic world's files: train/val shards (GRIT TSV and img2dataset webdataset) with their data
config, and the evaluation files (Karpathy, RefCOCO, VQAv2, SugarCrepe, VOC segmentation lists)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, List, Sequence

from ..formats import GRIT_TSV, TsvShardWriter, WdsShardWriter, relative_paths, write_source_config
from .language import tokenize
from .vocabulary import SEGMENTATION_SETS, SUGARCREPE_CATEGORIES

ROWS_PER_SHARD = 1000


# ---------------------------------------------------------------------------------------------------- writers
TAR_MTIME = 946684800
"""Member mtime (2000-01-01) of the generated tars; webdataset stamps the current time unless told otherwise. An
int, because tarfile adds a pax header to every member whose mtime is a float."""


class ShardSplit:
    """Writes one train/val split as GRIT TSV and img2dataset shards plus its ``grit.json`` data config."""

    def __init__(self, out_dir: str, split: str, rows_per_shard: int = ROWS_PER_SHARD):
        self.root = os.path.join(out_dir, split)
        self.tsv = TsvShardWriter(os.path.join(self.root, "grit", "part"), GRIT_TSV, rows_per_shard)
        self.wds = WdsShardWriter(os.path.join(self.root, "wds", "part"), rows_per_shard, mtime=TAR_MTIME)
        self.count = 0

    def write(self, s: Dict) -> None:
        self.tsv.write(
            {
                "id": s["id"],
                "caption": s["caption"],
                "image": base64.b64encode(s["image"]).decode("ascii"),
                "width": s["width"],
                "height": s["height"],
                "annotation": {"phrase": s["noun_chunks"], "expression_v1": s["ref_exps"]},
            }
        )
        meta = {
            "key": s["id"],
            "caption": s["caption"],
            "width": s["width"],
            "height": s["height"],
            "noun_chunks": s["noun_chunks"],
            "ref_exps": s["ref_exps"],
            "long_caption": s["long_caption"],
            "objects": s["objects"],
        }
        self.wds.write(s["id"], s["image"], s["ext"], s["caption"], meta)
        self.count += 1

    def close(self, out_dir: str) -> Dict[str, Any]:
        """Close the writers, write ``grit.json`` and return the split's relative paths."""
        self.tsv.close()
        self.wds.close()
        config = os.path.join(self.root, "grit.json")
        write_source_config(
            config,
            [
                {
                    "source": relative_paths(self.tsv.paths, self.root),
                    "source_lang": "grit",
                    "weight": 1.0,
                    "name": "grit",
                }
            ],
        )
        return {
            "grit_config": os.path.relpath(config, out_dir),
            "grit_shards": relative_paths(self.tsv.paths, out_dir),
            "wds_shards": relative_paths(self.wds.paths, out_dir),
        }


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)


def write_lines(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(f"{line}\n" for line in lines)


def write_eval_files(out_dir: str, tests: List[Dict]) -> Dict[str, int]:
    """Karpathy, RefCOCO, VQA, SugarCrepe and segmentation split files from the test samples; returns counts."""
    ev = os.path.join(out_dir, "eval")
    images, sent_id = [], 0
    ref_images, ref_anns = [], []
    questions, answers = [], []
    sugar: Dict[str, Dict[str, Dict[str, str]]] = {c: {} for c in SUGARCREPE_CATEGORIES}
    for t in tests:
        i, file_name = t["index"], f"{t['id']}.jpg"
        sentences = [
            {"raw": raw, "tokens": tokenize(raw), "imgid": i, "sentid": sent_id + j}
            for j, raw in enumerate(t["captions"])
        ]
        images.append(
            {
                "filepath": "images",
                "filename": file_name,
                "imgid": i,
                "split": "test",
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
        sent_id += len(sentences)
        for expr, k in t["refexps"]:
            x0, y0, x1, y1 = t["box_px"][k]
            entry_id = len(ref_images)
            ref_images.append(
                {
                    "id": entry_id,
                    "file_name": file_name,
                    "height": t["height"],
                    "width": t["width"],
                    "caption": expr,
                    "tokens_positive": [[0, len(expr)]],
                    "original_id": i,
                    "dataset_name": "refcoco",
                }
            )
            ref_anns.append(
                {
                    "id": entry_id,
                    "image_id": entry_id,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": t["area"][k],
                    "iscrowd": 0,
                    "category_id": 1,
                }
            )
        for q_index, q in enumerate(t["vqa"]):
            qid = i * 10 + q_index
            questions.append({"image_id": i, "question": q["question"], "question_id": qid})
            answers.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "question_type": q["question_type"],
                    "answer_type": q["answer_type"],
                    "multiple_choice_answer": q["answer"],
                    "answers": [
                        {"answer": q["answer"], "answer_confidence": "yes", "answer_id": a + 1} for a in range(10)
                    ],
                }
            )
        for category, (pos, neg) in t["sugarcrepe"].items():
            sugar[category][str(len(sugar[category]))] = {
                "filename": file_name,
                "caption": pos,
                "negative_caption": neg,
            }
    write_json(os.path.join(ev, "karpathy.json"), {"dataset": "synthetic", "images": images})
    write_json(
        os.path.join(ev, "refcoco", "finetune_refcoco_testA.json"),
        {"images": ref_images, "annotations": ref_anns, "categories": [{"id": 1, "name": "object"}]},
    )
    write_json(os.path.join(ev, "vqa", "questions.json"), {"questions": questions})
    write_json(os.path.join(ev, "vqa", "annotations.json"), {"annotations": answers})
    for category, entries in sugar.items():
        write_json(os.path.join(ev, "sugarcrepe", f"{category}.json"), entries)
    for folder, (_, names) in SEGMENTATION_SETS.items():
        seg = os.path.join(ev, folder)
        write_lines(os.path.join(seg, "ImageSets", "Segmentation", "val.txt"), [t["id"] for t in tests])
        write_lines(os.path.join(seg, "classnames.txt"), ["background", *names])
    return {
        "test": len(tests),
        "karpathy_sentences": sent_id,
        "refcoco": len(ref_images),
        "vqa_questions": len(questions),
        "segmentation": len(tests),
        "sugarcrepe": {c: len(e) for c, e in sugar.items()},
    }
