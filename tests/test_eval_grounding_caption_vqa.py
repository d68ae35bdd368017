"""Grounding, referring-expression, captioning and VQA metrics against hand-computed values, and the caption / VQA
scoring CLIs on files written to tmp_path."""

import json
import logging
import math
import shutil

import numpy as np
import pytest

from unilm_vl.eval import caption, metrics, vqa
from unilm_vl.eval.metrics import (
    box_iou,
    caption_metrics,
    normalize_vqa_answer,
    phrase_grounding_recall,
    rec_accuracy,
    simple_caption_tokenize,
    vqa_accuracy,
    vqa_question_accuracy,
    xywh_to_xyxy,
)

HAS_JAVA = shutil.which("java") is not None


# ----------------------------------------------------------------------------------------------------------- boxes


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),  # inter 5x5, union 100 + 100 - 25
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # contained
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # half
        ([0, 0, 1, 1], [1, 0, 2, 1], 0.0),  # touching edges: continuous coordinates, no +1
        ([0, 0, 1, 1], [2, 2, 3, 3], 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # degenerate "no box": union 0 -> IoU 0, not nan
    ],
)
def test_box_iou_hand_values(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_box_iou_matrix_and_xywh():
    iou = box_iou([[0, 0, 10, 10], [5, 5, 15, 15]], [[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]])
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, [[1.0, 0.5, 0.0], [25 / 175, 0.0, 0.0]], atol=1e-12)
    np.testing.assert_array_equal(xywh_to_xyxy([1, 2, 3, 4]), [1, 2, 4, 6])
    np.testing.assert_array_equal(xywh_to_xyxy([[1, 2, 3, 4], [0, 0, 1, 1]]), [[1, 2, 4, 6], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="box"):
        box_iou([0, 0, 1], [0, 0, 1, 1])


# -------------------------------------------------------------------------------------------- Flickr30k Entities

MISS = [100, 100, 110, 110]  # IoU 0 with every GT box below
FLICKR_GT = {
    "p1": {"boxes": [[0, 0, 10, 10]], "phrase_type": "people"},
    "p2": {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "phrase_type": ["clothing", "other"]},
    "p3": {"boxes": [[0, 0, 10, 10]], "phrase_type": "people"},
    "p4": {"boxes": [[0, 0, 10, 10]], "phrase_type": "scene"},
    "p5": {"boxes": [], "phrase_type": "other"},  # no GT box: left out
}
FLICKR_PRED = {
    "p1": [[0, 0, 10, 5]],  # IoU exactly 0.5 -> hit (>=)
    "p2": [MISS, [21, 21, 30, 30]],  # 2nd box vs the 2nd GT box: 81 / 100 -> hit from k = 2
    # p3: no prediction -> miss everywhere
    "p4": [MISS] * 10 + [[0, 0, 10, 10]],  # the 11th box hits: only the upper bound (k = -1) sees it
}


def test_flickr_any_box_recall_hand_case():
    out = phrase_grounding_recall(FLICKR_PRED, FLICKR_GT)
    # 4 scored phrases; hits  R@1: p1   R@5: p1 p2   R@10: p1 p2   all: p1 p2 p4
    assert out["R@1"] == pytest.approx(25.0)
    assert out["R@5"] == pytest.approx(50.0)
    assert out["R@10"] == pytest.approx(50.0)
    assert out["R@upper_bound"] == pytest.approx(75.0)
    assert (out["num_phrases"], out["num_missing_predictions"], out["num_skipped_without_gt"]) == (4, 1, 1)
    per_type = out["per_type"]
    assert set(per_type) == {"people", "clothing", "other", "scene"}
    assert per_type["people"] == {"R@1": 50.0, "R@5": 50.0, "R@10": 50.0, "R@upper_bound": 50.0, "num_phrases": 2}
    assert (
        per_type["clothing"]
        == per_type["other"]
        == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "R@upper_bound": 100.0, "num_phrases": 1}
    )
    assert per_type["scene"] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "R@upper_bound": 100.0, "num_phrases": 1}


def test_flickr_recall_plain_box_lists_and_errors():
    out = phrase_grounding_recall({"a": [[0, 0, 10, 10]]}, {"a": [[0, 0, 10, 10]], "b": [[0, 0, 5, 5]]}, ks=(1, -1))
    assert out["R@1"] == out["R@upper_bound"] == 50.0 and out["per_type"] == {}
    with pytest.raises(ValueError, match="'zz'"):
        phrase_grounding_recall({"zz": [[0, 0, 1, 1]]}, FLICKR_GT)
    with pytest.raises(ValueError, match="ks"):
        phrase_grounding_recall(FLICKR_PRED, FLICKR_GT, ks=(0,))


# ------------------------------------------------------------------------------------------------------- RefCOCO

REC_GT_XYWH = {
    "s1": [0, 0, 10, 10],  # -> [0, 0, 10, 10]
    "s2": [10, 10, 10, 10],  # -> [10, 10, 20, 20]; read as xyxy it would be a degenerate box nothing matches
    "s3": [0, 0, 20, 20],  # -> [0, 0, 20, 20]
    "s4": [0, 0, 10, 10],
    "s5": [0, 0, 10, 10],
}
REC_PRED = {
    "s1": [[0, 0, 10, 10]],  # first, mean and any: hit
    "s2": [MISS, [10, 10, 20, 20]],  # first miss; mean [55, 55, 65, 65] miss; any hit
    "s3": [[0, 0, 20, 10], [0, 10, 20, 20]],  # first IoU 0.5 hit; mean [0, 5, 20, 15] IoU 0.5 hit; any hit
    "s4": [[-5, 0, 5, 10], [5, 0, 15, 10]],  # each IoU 50 / 150 miss; mean [0, 0, 10, 10] hit
    # s5: no prediction -> miss, still counted in its group
}
REC_GROUPS = {
    "s1": "refcoco/val",
    "s2": "refcoco/val",
    "s3": "refcoco/testA",
    "s4": "refcoco/testA",
    "s5": "refcoco/testA",
}


def test_rec_accuracy_xywh_and_group_denominators():
    out = rec_accuracy(REC_PRED, REC_GT_XYWH, groups=REC_GROUPS, gt_format="xywh")
    assert out["acc@1"] == pytest.approx(100 * 2 / 5)  # s1 s3
    assert out["acc@mean"] == pytest.approx(100 * 3 / 5)  # s1 s3 s4
    assert out["acc@upper_bound"] == pytest.approx(100 * 3 / 5)  # s1 s2 s3
    assert (out["num_samples"], out["num_missing_predictions"]) == (5, 1)
    val, test_a = out["per_group"]["refcoco/val"], out["per_group"]["refcoco/testA"]
    assert val == {"acc@1": 50.0, "acc@mean": 50.0, "acc@upper_bound": 100.0, "num_samples": 2}
    assert test_a["num_samples"] == 3
    assert test_a["acc@1"] == pytest.approx(100 / 3)
    assert test_a["acc@mean"] == pytest.approx(200 / 3)
    assert test_a["acc@upper_bound"] == pytest.approx(100 / 3)


def test_rec_accuracy_xyxy_matches_converted_and_errors():
    converted = {k: xywh_to_xyxy(v).tolist() for k, v in REC_GT_XYWH.items()}
    a = rec_accuracy(REC_PRED, converted)
    b = rec_accuracy(REC_PRED, REC_GT_XYWH, gt_format="xywh")
    assert a == b and "per_group" not in a
    # the same boxes read as xyxy: s2's GT [10, 10, 10, 10] is degenerate and its "any box" hit disappears
    assert rec_accuracy(REC_PRED, REC_GT_XYWH)["acc@upper_bound"] < b["acc@upper_bound"]
    with pytest.raises(ValueError, match="no group"):
        rec_accuracy(REC_PRED, REC_GT_XYWH, groups={"s1": "x"})
    with pytest.raises(ValueError, match="'s9'"):
        rec_accuracy({"s9": [[0, 0, 1, 1]]}, REC_GT_XYWH)


# ---------------------------------------------------------------------------------------------------- captioning


def test_identical_captions_give_bleu4_and_ciderd_maximum():
    preds = {1: "a man is riding a brown horse on the beach", 2: "two dogs play with a red ball in the park"}
    refs = {k: [v] for k, v in preds.items()}
    out = caption_metrics(preds, refs, tokenizer="simple", meteor=False)
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-4)
    assert out["ROUGE-L"] == pytest.approx(100.0)
    # CIDEr-D: identical tf-idf vectors give cosine 1 for every n, no length penalty, times 10 (then x 100)
    assert out["CIDEr"] == pytest.approx(1000.0, abs=1e-6)
    assert (out["num_images"], out["num_unpredicted"], out["tokenizer"]) == (2, 0, "simple")
    assert "METEOR" not in out


def test_bleu_and_rouge_l_small_hand_case():
    # pred "a man riding a horse" (5 tokens) vs ref "a man is riding a brown horse" (7 tokens)
    #  unigram precision 5/5; bigrams {a man, man riding, riding a, a horse}: 2 of 4 in the ref
    #  brevity penalty exp(1 - 7/5);  LCS = 5 -> P = 1, R = 5/7, F(beta = 1.2) = 2.44 P R / (R + 1.44 P)
    out = caption_metrics(
        {"x": "A man riding a horse."}, {"x": ["a man is riding a brown horse"]}, tokenizer="simple", meteor=False
    )
    bp = math.exp(1 - 7 / 5)
    assert out["BLEU-1"] == pytest.approx(100 * bp, rel=1e-6)
    assert out["BLEU-2"] == pytest.approx(100 * bp * math.sqrt(0.5), rel=1e-6)
    r = 5 / 7
    assert out["ROUGE-L"] == pytest.approx(100 * 2.44 * r / (r + 1.44), rel=1e-9)


def test_simple_tokenizer_mimics_ptb_punctuation_removal():
    assert simple_caption_tokenize("A man's \"big\" hat, (red) -- don't... Two cats!") == [
        "a",
        "man",
        "'s",
        "big",
        "hat",
        "-lrb-",
        "red",
        "-rrb-",
        "do",
        "n't",
        "two",
        "cats",
    ]
    assert simple_caption_tokenize("a black-and-white photo of 3.5 cats.") == [
        "a",
        "black-and-white",
        "photo",
        "of",
        "3.5",
        "cats",
    ]


@pytest.mark.skipif(not HAS_JAVA, reason="PTBTokenizer needs Java")
def test_simple_tokenizer_agrees_with_ptb():
    sentences = [
        "A man's hat, on the (red) table.",
        "Two dogs don't play -- they can't!",
        'He said "hello" to the kids; they\'re happy.',
        "a [big] {blue} sign.",
        "It's 5 o'clock `now'",
    ]
    ptb = metrics._ptb_tokenize({str(i): [s] for i, s in enumerate(sentences)})
    for i, s in enumerate(sentences):
        assert ptb[str(i)][0] == " ".join(simple_caption_tokenize(s))


def test_caption_metrics_without_java_warns_and_omits_meteor(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="unilm_vl.eval.metrics"):
        out = caption_metrics({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})
    assert out["tokenizer"] == "simple" and "METEOR" not in out and out["num_unpredicted"] == 1
    text = caplog.text
    assert "METEOR" in text and "Java" in text and "no prediction" in text


@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs Java")
def test_caption_metrics_with_java_ptb_and_meteor():
    preds = {1: "a man is riding a brown horse on the beach", 2: "a cat sleeps"}
    refs = {1: ["a man is riding a brown horse on the beach"], 2: ["two dogs play with a red ball in the park"]}
    out = caption_metrics(preds, refs)
    assert out["tokenizer"] == "ptb"
    assert 0.0 < out["METEOR"] < 100.0


def test_caption_metrics_rejects_unknown_ids():
    with pytest.raises(ValueError, match="'nope'"):
        caption_metrics({"nope": "a dog"}, {"1": ["a dog"]}, tokenizer="simple", meteor=False)


# ----------------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("The Cat!", "cat"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),
        ("none", "0"),
        ("an apple", "apple"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# m of 10 humans gave the answer: leave-one-out over the 10 subsets of 9 humans,
#   acc = [m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)] / 10
#   m = 1: (0 + 9 * 1/3) / 10 = 0.3     m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
#   m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9  m = 4: (4 * 1 + 6 * 1) / 10 = 1.0
@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_accuracy_subset_average(m, expected):
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_question_accuracy("red", answers) == pytest.approx(expected)


def test_vqa_normalisation_only_when_humans_disagree():
    assert vqa_question_accuracy("Two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # normalised: "Two" -> "2"
    assert vqa_question_accuracy("a dog.", ["dog"] * 5 + ["puppy"] * 5) == pytest.approx(1.0)
    # unanimous humans: the official code compares raw strings
    assert vqa_question_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_question_accuracy("two", ["2"] * 10, normalize_always=True) == 1.0
    assert vqa_question_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_vqa_accuracy_overall_and_per_type(caplog):
    annotations = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["table"] * 10}
    with caplog.at_level(logging.WARNING, logger="unilm_vl.eval.metrics"):
        out = vqa_accuracy({1: "yes", 2: "Two"}, annotations, answer_types={1: "yes/no", 2: "number", 3: "other"})
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert (out["num_questions"], out["num_missing_predictions"]) == (3, 1)
    assert "no prediction" in caplog.text
    with pytest.raises(ValueError, match="99"):
        vqa_accuracy({99: "yes"}, annotations)


# ----------------------------------------------------------------------------------------------------------- CLIs


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_caption_cli_coco_files(tmp_path):
    preds = write_json(
        tmp_path / "pred.json",
        [{"image_id": 1, "caption": "A man riding a horse."}, {"image_id": 2, "caption": "a dog on the grass"}],
    )
    refs = write_json(
        tmp_path / "refs.json",
        {
            "images": [{"id": 1}, {"id": 2}],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "a man is riding a brown horse"},
                {"image_id": 2, "id": 11, "caption": "a dog on the grass"},
                {"image_id": 2, "id": 12, "caption": "a puppy sits on green grass"},
            ],
        },
    )
    out_path = tmp_path / "out.json"
    got = caption.main(
        [
            "--predictions",
            preds,
            "--references",
            refs,
            "--tokenizer",
            "simple",
            "--no-meteor",
            "--output",
            str(out_path),
        ]
    )
    expected = caption_metrics(
        {"1": "A man riding a horse.", "2": "a dog on the grass"},
        {"1": ["a man is riding a brown horse"], "2": ["a dog on the grass", "a puppy sits on green grass"]},
        tokenizer="simple",
        meteor=False,
    )
    assert got == expected
    assert json.loads(out_path.read_text()) == expected
    assert got["ROUGE-L"] == pytest.approx(100 * (2.44 * (5 / 7) / (5 / 7 + 1.44) + 1.0) / 2)


def test_caption_cli_karpathy_matches_file_stems_and_split(tmp_path):
    images = [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a red car"}]},
        {"filename": "42.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "a blue bus"}]},
        {"filename": "7.jpg", "imgid": 2, "split": "train", "sentences": [{"raw": "a green bike"}]},
    ]
    refs = write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    preds = write_json(
        tmp_path / "pred.json",
        [{"image_id": 1000092795, "caption": "a red car"}, {"image_id": 42, "caption": "a blue bus"}],
    )
    out = caption.main(["--predictions", preds, "--references", refs, "--tokenizer", "simple", "--no-meteor"])
    assert out["num_images"] == 2 and out["BLEU-1"] == pytest.approx(100.0)
    # image 7 is in the train split only
    bad = write_json(tmp_path / "bad.json", [{"image_id": 7, "caption": "a green bike"}])
    with pytest.raises(ValueError, match="'7'"):
        caption.main(["--predictions", bad, "--references", refs, "--tokenizer", "simple", "--no-meteor"])


def test_caption_cli_errors_name_the_file(tmp_path):
    refs = write_json(tmp_path / "refs.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
    missing = str(tmp_path / "nothere.json")
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        caption.main(["--predictions", missing, "--references", refs])
    malformed = write_json(tmp_path / "malformed.json", [{"image": 1, "caption": "a dog"}])
    with pytest.raises(ValueError, match="malformed.json.*entry 0"):
        caption.main(["--predictions", malformed, "--references", refs])
    unknown = write_json(tmp_path / "unknown.json", [{"image_id": i, "caption": "x"} for i in range(2, 10)])
    with pytest.raises(ValueError, match=r"8 predicted image ids.*'2', '3', '4', '5', '6', \.\.\. \(8 in all\)"):
        caption.main(["--predictions", unknown, "--references", refs])


def vqa_files(tmp_path):
    anns = {
        "annotations": [
            {
                "question_id": 1,
                "question_type": "is the",
                "answer_type": "yes/no",
                "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)],
            },
            {
                "question_id": 2,
                "question_type": "how many",
                "answer_type": "number",
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 2 + ["3"] * 8)],
            },
            {
                "question_id": 3,
                "question_type": "what",
                "answer_type": "other",
                "answers": [{"answer": "table", "answer_id": i + 1} for i in range(10)],
            },
        ]
    }
    return write_json(tmp_path / "anns.json", anns)


def test_vqa_cli(tmp_path):
    anns = vqa_files(tmp_path)
    preds = write_json(
        tmp_path / "pred.json", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "Two"}]
    )
    out_path = tmp_path / "out.json"
    out = vqa.main(["--predictions", preds, "--annotations", anns, "--output", str(out_path)])
    assert out["accuracy"] == pytest.approx(160 / 3)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert out["per_question_type"] == pytest.approx({"is the": 100.0, "how many": 60.0, "what": 0.0})
    assert json.loads(out_path.read_text()) == out
    # a question file restricts the scored set
    questions = write_json(tmp_path / "q.json", {"questions": [{"question_id": 1}, {"question_id": 2}]})
    sub = vqa.main(["--predictions", preds, "--annotations", anns, "--questions", questions])
    assert sub["accuracy"] == pytest.approx(80.0) and sub["num_missing_predictions"] == 0


def test_vqa_cli_errors_name_the_file(tmp_path):
    anns = vqa_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        vqa.main(["--predictions", str(tmp_path / "nothere.json"), "--annotations", anns])
    malformed = write_json(tmp_path / "malformed.json", [{"question_id": 1, "text": "yes"}])
    with pytest.raises(ValueError, match="malformed.json.*entry 0"):
        vqa.main(["--predictions", malformed, "--annotations", anns])
    unknown = write_json(tmp_path / "unknown.json", [{"question_id": 77, "answer": "yes"}])
    with pytest.raises(ValueError, match="unknown.json.*'77'"):
        vqa.main(["--predictions", unknown, "--annotations", anns])
    bad_anns = write_json(tmp_path / "bad_anns.json", {"annotations": [{"question_id": 1, "answers": ["yes"]}]})
    with pytest.raises(ValueError, match="bad_anns.json.*annotation 0"):
        vqa.main(["--predictions", unknown, "--annotations", bad_anns])
