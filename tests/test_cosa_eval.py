"""COSA evaluation: retrieval metrics and ITM re-ranking (TXH-mercury/COSA ``test.py``), the retrieval / caption /
QA runners against a fake model whose scores the test sets, and exact-match vs VQA accuracy on hand cases."""

import json
import os

import pytest
import torch
from PIL import Image

from unilm_vl.data.cosa import ClipTransformFn
from unilm_vl.data.cosa_vocab import build_wordpiece_vocab, write_vocab
from unilm_vl.data.tokenizers import WordPieceTokenizer
from unilm_vl.eval.cosa_caption import evaluate_cosa_caption
from unilm_vl.eval.cosa_common import load_eval_set
from unilm_vl.eval.cosa_qa import evaluate_cosa_qa, qa_metrics
from unilm_vl.eval.cosa_retrieval import (
    cosa_retrieval_metrics,
    evaluate_cosa_retrieval,
    itm_probability,
    itm_rerank,
    rerank_key,
    topk_pairs,
)


# ----------------------------------------------------------------------------------------------- pure metrics
def test_reference_retrieval_metrics():
    # values of the release's metric (TXH-mercury/COSA test.py): ids [a, b, c], texts of [a, a, b, c]
    sim = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.4], [0.1, 0.8, 0.7], [0.6, 0.2, 0.5]])
    m = cosa_retrieval_metrics(sim, [0, 0, 1, 2])
    assert (m["t2v_R@1"], m["t2v_R@5"], m["t2v_R@10"]) == (50.0, 100.0, 100.0)
    assert m["video_r1"] == 50.0 and m["video_recall"] == "50.0/100.0/100.0" and m["video_ravg"] == 83.3
    assert m["t2v_median_rank"] == 1.0 and m["t2v_mean_rank"] == 1.75
    assert m["txt_r1"] == 66.7 and m["txt_ravg"] == 88.9
    assert m["v2t_R@1"] == pytest.approx(200 / 3) and m["v2t_mean_rank"] == pytest.approx(4 / 3)
    split = cosa_retrieval_metrics(sim, [0, 0, 1, 2], sim_v2t=torch.eye(4, 3))  # v2t from its own matrix
    assert split["t2v_R@1"] == 50.0 and split["v2t_R@1"] == pytest.approx(100 / 3)


def test_rerank_key_orders_outside_entries_by_itc_below_reranked_ones():
    sim = torch.tensor([[0.9, 0.5, 0.4, -0.3]])
    itm = torch.tensor([[0.1, 0.8, 0.0, 0.0]])
    inside = torch.tensor([[True, True, False, False]])
    key = rerank_key(sim, itm, inside)
    assert key.argsort(descending=True).tolist() == [[1, 0, 2, 3]]
    # with all zeros outside (the released matrix) videos 2 and 3 would tie; the key keeps ITC's order
    assert bool(key[0, 2] > key[0, 3]) and bool(key[0, 2] < 0)


def test_itm_rerank_layout():
    torch.manual_seed(0)
    sim = torch.rand(6, 9)
    probs_of = torch.rand(6, 9) * 0.98 + 0.01  # the ITM P(match) of every pair
    reranked = itm_rerank(sim, 3, lambda t, v: probs_of[t, v])
    top = sim.topk(3, dim=1).indices
    inside = torch.zeros(6, 9, dtype=torch.bool).scatter_(1, top, True)
    assert (reranked[~inside] == 0).all()
    assert torch.equal(reranked[inside], probs_of[inside])
    assert ((reranked[inside] > 0) & (reranked[inside] < 1)).all()
    assert torch.equal(itm_rerank(sim, 50, lambda t, v: probs_of[t, v]), probs_of)  # k >= N: ITM replaces ITC
    assert topk_pairs(sim, 2).tolist()[:2] == [[0, int(top[0, 0])], [0, int(top[0, 1])]]


def test_itm_probability_forms():
    two = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    expected = torch.softmax(two.double(), 1)[:, 1]
    assert torch.allclose(itm_probability(two), expected)
    assert torch.allclose(itm_probability(two[:, 1] - two[:, 0]), expected)
    # float64: match logits 20 and 30 stay ordered (float32 rounds both to 1.0, a tie the GT would lose)
    confident = itm_probability(torch.tensor([20.0, 30.0]))
    assert confident.dtype == torch.float64 and bool(confident[1] > confident[0])
    assert torch.tensor([20.0, 30.0]).sigmoid().unique().tolist() == [1.0]


def test_constant_scores_score_at_most_chance():
    """A collapsed model: ITC and ITM constant, 4 videos, 8 texts (2 a video). Ties count against the ground truth:
    t2v rank 3 and v2t rank 6 for every query, so R@1 = 0 (chance: 25% both ways), before and after re-ranking."""
    t2v = [0, 0, 1, 1, 2, 2, 3, 3]
    sim = torch.full((8, 4), 0.3)
    m = cosa_retrieval_metrics(sim, t2v)
    assert (m["t2v_R@1"], m["t2v_R@5"], m["v2t_R@1"], m["v2t_R@5"], m["v2t_R@10"]) == (0.0, 100.0, 0.0, 0.0, 100.0)
    assert (m["t2v_mean_rank"], m["v2t_median_rank"], m["video_r1"], m["txt_r1"]) == (4.0, 7.0, 0.0, 0.0)
    itm = itm_rerank(sim, 2, lambda t, v: torch.full((len(t),), 0.5))
    inside = itm > 0
    m = cosa_retrieval_metrics(rerank_key(sim, itm, inside), t2v)
    assert m["t2v_R@1"] == 0.0 and m["v2t_R@1"] == 0.0


@pytest.mark.parametrize(
    "pred, answers, em, vqa",
    [
        ("two", ["two"], 100.0, None),  # one answer: exact match only
        ("Two", ["two"], 0.0, None),  # exact match does not normalise
        ("yes", ["yes"] * 10, 100.0, 100.0),
        ("Yes", ["yes"] * 10, 0.0, 0.0),  # humans agree: the official rule does not normalise
        ("a dog.", ["dog"] * 3 + ["cat"] * 7, 0.0, 90.0),  # normalised "dog": 3 of 10 -> (3 * 2/3 + 7 * 1) / 10
        ("2", ["two", "2"] + ["cat"] * 8, 0.0, 60.0),  # "two" -> "2": 2 of 10 humans
    ],
)
def test_exact_match_vs_vqa_accuracy(pred, answers, em, vqa):
    m = qa_metrics([pred], [answers])
    assert m["exact_match"] == em
    assert (m["vqa_accuracy"] is None) if vqa is None else m["vqa_accuracy"] == pytest.approx(vqa)


def test_qa_metrics_mixed_and_random_ground_truth():
    m = qa_metrics(["dog", "2", "x"], [["dog"], ["two", "2", "2"], ["y", "y"]])
    assert m["num_questions"] == 3 and m["num_vqa_questions"] == 2
    # question 2: "2" vs ["two","2","2"] normalised -> 3 of 3 match; every leave-one-out subset keeps 2 -> 2/3;
    # question 3 -> 0
    assert m["vqa_accuracy"] == pytest.approx(100 / 3)
    ems = {qa_metrics(["a"], [["a", "b"]], seed=s)["exact_match"] for s in range(20)}
    assert ems == {0.0, 100.0}  # the ground truth is one random human answer, as released


# ----------------------------------------------------------------------------------------------- fake model world
WORDS = ["alpha", "bravo", "charlie", "delta", "echo"]
TEXT_TO_VIDEO = [0, 0, 1, 2, 3]
ITC = torch.tensor(
    [
        [0.5, 0.9, 0.1, 0.0],  # t0 (video 0): rank 1
        [0.9, 0.2, 0.1, 0.0],  # t1 (video 0): rank 0
        [0.8, 0.7, 0.1, 0.0],  # t2 (video 1): rank 1
        [0.0, 0.1, 0.9, 0.2],  # t3 (video 2): rank 0
        [0.3, 0.6, 0.0, 0.2],
    ]
)  # t4 (video 3): rank 2, outside the top-2
ITM = torch.full((5, 4), 0.2)
ITM[torch.arange(5), torch.tensor(TEXT_TO_VIDEO)] = 0.9


class FakeCosa:
    """Scores from tables: a video is named by the red value of its frames (20 * (v + 1)), a text by its first
    word. ``encode_text`` returns the text's ITC row and ``encode_video`` a one-hot, so ``text @ video^T = ITC``."""

    def __init__(self, tok, captions, answers):
        self.tok = tok
        self.word_to_text = {tok.vocab[w]: i for i, w in enumerate(WORDS)}
        self.captions, self.answers = captions, answers
        self.itm_calls = 0

    def video_index(self, frames):
        return (frames[:, 0, 0, 0, 0] * 255 / 20 - 1).round().long()  # B

    def text_index(self, text_ids):
        return torch.tensor([self.word_to_text[int(i)] for i in text_ids[:, 1]])  # B

    def encode_video(self, frames):
        v = self.video_index(frames)
        return {
            "video_features": torch.nn.functional.one_hot(v, 4).float(),  # B x 4
            "video_tokens": v.float()[:, None, None].expand(-1, 3, 2),
        }  # B x 3 x 2

    def encode_text(self, text_ids, text_mask):
        assert torch.equal(text_mask, (text_ids != self.tok.pad_id).long())
        return {"text_features": ITC[self.text_index(text_ids)], "text_tokens": None}

    def itm_logits(self, video_tokens, text_ids, text_mask):
        self.itm_calls += len(text_ids)
        p = ITM[self.text_index(text_ids), video_tokens[:, 0, 0].long()]
        return torch.log(p / (1 - p))  # match logit: sigmoid gives p back

    def generate_caption(self, frames, beam_size, max_len):
        assert (beam_size, max_len) == (3, 40)
        return [self.tok.encode(self.captions[int(v)]) for v in self.video_index(frames)]

    def generate_answer(self, frames, question_ids, question_mask, max_len):
        return [
            self.tok.encode(self.answers[(int(v), int(q))])
            for v, q in zip(self.video_index(frames), question_ids[:, 1])
        ]


@pytest.fixture
def clips(tmp_path):
    frames = tmp_path / "frames"
    for v in range(4):
        folder = frames / f"vid{v}"
        os.makedirs(folder)
        for j in range(5 + v):
            Image.new("RGB", (10, 10), (20 * (v + 1), 10 * j, 0)).save(folder / f"frame_{j + 1:04d}.png")
    captions = [
        "alpha the red circle moves up",
        "bravo a blue star grows",
        "charlie a green cross moves down",
        "delta a white square shrinks",
        "echo the black diamond moves left",
    ]
    entries = [{"video_id": "vid0", "desc": captions[:2]}] + [
        {"video_id": f"vid{v}", "desc": [captions[v + 1]]} for v in range(1, 4)
    ]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    vocab = build_wordpiece_vocab(captions + ["what moves", "how many", "circle", "up", "two"])
    write_vocab(vocab, str(tmp_path / "vocab.txt"))
    return tmp_path, captions


def transform():
    return ClipTransformFn(4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("cache_gb", [2.0, 0.0])  # video tokens kept, or videos encoded again for ITM
def test_retrieval_runner_itc_then_itm(clips, cache_gb):
    root, captions = clips
    tok = WordPieceTokenizer(str(root / "vocab.txt"))
    eval_set = load_eval_set(str(root / "test.json"))
    assert eval_set.video_ids == ["vid0", "vid1", "vid2", "vid3"] and eval_set.text_to_video == TEXT_TO_VIDEO
    model = FakeCosa(tok, {}, {})
    m = evaluate_cosa_retrieval(
        model,
        tok,
        transform(),
        eval_set,
        str(root / "frames"),
        4,
        16,
        itm_k=2,
        batch_size=3,
        itm_batch_size=4,
        token_cache_gb=cache_gb,
    )
    itc, itm = m["itc"], m["itm"]
    assert (itc["t2v_R@1"], itc["t2v_R@5"]) == (40.0, 100.0)  # ITC t2v ranks [1, 0, 1, 0, 2]
    assert itc["t2v_mean_rank"] == pytest.approx(1.8) and itc["t2v_median_rank"] == 2.0
    assert (itc["v2t_R@1"], itc["v2t_R@5"]) == (50.0, 100.0)  # v2t ranks [0, 1, 0, 1]: t3 ties t4 at .2
    assert (itm["t2v_R@1"], itm["t2v_R@5"]) == (80.0, 100.0)  # ITM lifts t0, t2; t4 stays outside (rank 2)
    assert itm["t2v_mean_rank"] == pytest.approx(1.4) and itm["t2v_median_rank"] == 1.0
    assert itm["v2t_R@1"] == 100.0  # each video's top-2 texts hold its best GT
    # fused pairs: 5 texts x top-2 videos, plus the pairs of the videos' top-2 texts not among them: one of the
    # texts tied at 0.1 with video 2, and (t4, video 3)
    assert model.itm_calls == m["itm_pairs"] == 12
    assert (m["num_videos"], m["num_texts"], m["itm_k"]) == (4, 5, 2)
    full = evaluate_cosa_retrieval(model, tok, transform(), eval_set, str(root / "frames"), 4, 16, itm_k=10)
    assert full["itm"]["t2v_R@1"] == 100.0 and full["itm"]["v2t_R@1"] == 100.0  # k >= N: ITM alone ranks


def test_caption_runner_scores_generated_captions(clips):
    root, captions = clips
    tok = WordPieceTokenizer(str(root / "vocab.txt"))
    eval_set = load_eval_set(str(root / "test.json"))
    oracle = FakeCosa(tok, {0: captions[0], 1: captions[2], 2: captions[3], 3: captions[4]}, {})
    metrics, predictions = evaluate_cosa_caption(
        oracle, tok, transform(), eval_set, str(root / "frames"), 8, caption_tokenizer="simple", meteor=False
    )
    assert predictions == {"vid0": captions[0], "vid1": captions[2], "vid2": captions[3], "vid3": captions[4]}
    assert metrics["BLEU-4"] == pytest.approx(100.0) and metrics["ROUGE-L"] == pytest.approx(100.0)
    assert metrics["num_images"] == 4 and "METEOR" not in metrics
    wrong = FakeCosa(tok, {v: captions[4] for v in range(4)}, {})
    worse, _ = evaluate_cosa_caption(
        wrong, tok, transform(), eval_set, str(root / "frames"), 8, caption_tokenizer="simple", meteor=False
    )
    assert worse["CIDEr"] < metrics["CIDEr"] and worse["BLEU-4"] < 100.0


def test_qa_runner(clips):
    root, _ = clips
    tok = WordPieceTokenizer(str(root / "vocab.txt"))
    entries = [
        {"video_id": "vid1", "question": "what moves", "answer": "circle", "question_id": 1},
        {
            "video_id": "vid2",
            "question": ["what moves", "how many"],
            "answer": [["circle"] * 4, ["two"] * 4],
            "question_id": [2, 3],
        },
    ]
    (root / "qa.json").write_text(json.dumps(entries))
    eval_set = load_eval_set(str(root / "qa.json"))
    what, how = tok.vocab["what"], tok.vocab["how"]
    answers = {(1, what): "circle", (2, what): "up", (2, how): "two"}
    model = FakeCosa(tok, {}, answers)
    metrics, decoded = evaluate_cosa_qa(model, tok, transform(), eval_set, str(root / "frames"), 4, 16, batch_size=2)
    assert decoded == ["circle", "up", "two"]
    assert metrics["exact_match"] == pytest.approx(200 / 3)
    # 4 of 4 humans: every leave-one-out subset keeps 3 -> 1.0 for "two", 0 for "up"
    assert metrics["num_vqa_questions"] == 2 and metrics["vqa_accuracy"] == pytest.approx(50.0)


def test_missing_eval_video_is_an_error_naming_it(clips):
    root, _ = clips
    (root / "bad.json").write_text(json.dumps([{"video_id": "nope", "desc": "alpha"}]))
    tok = WordPieceTokenizer(str(root / "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_cosa_retrieval(
            FakeCosa(tok, {}, {}),
            tok,
            transform(),
            load_eval_set(str(root / "bad.json")),
            str(root / "frames"),
            4,
            16,
            itm_k=None,
        )


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pretrain_finetune_and_benchmark_clis_end_to_end(tmp_path):
    """fairseq-train cosa_pretrain (images + clips, K = 4 concatenation) -> cosa_finetune retrieval -> the three
    benchmark CLIs on the checkpoint of the real cosa model."""
    from test_train_e2e import run

    from unilm_vl.eval import cosa_caption, cosa_qa, cosa_retrieval

    from conftest import BIN, REPO, write_wds

    write_wds(str(tmp_path / "wds" / "part"), 16, 16)
    texts = ["a red circle moves left", "a blue square moves right", "a green circle grows", "a yellow square"]
    for v, text in enumerate(texts):
        folder = tmp_path / "frames" / f"vid{v}"
        os.makedirs(folder)
        for j in range(3 + v):
            Image.new("RGB", (48, 40), (60 * v, 20 * j, 90)).save(folder / f"frame_{j + 1:04d}.jpg")
    (tmp_path / "train.json").write_text(json.dumps([{"video_id": f"vid{v}", "desc": t} for v, t in enumerate(texts)]))
    (tmp_path / "test.json").write_text(
        json.dumps([{"video_id": f"vid{v}", "desc": [t, t + " slowly"]} for v, t in enumerate(texts)])
    )
    (tmp_path / "qa.json").write_text(
        json.dumps([{"video_id": "vid1", "question": "what moves", "answer": "square", "question_id": 5}])
    )
    (tmp_path / "mix.json").write_text(
        json.dumps(
            [
                {"name": "images", "source": "wds/part-*.tar", "weight": 1.0},
                {"name": "videos", "source": "train.json", "kind": "frames", "frames_root": "frames", "weight": 1.0},
            ]
        )
    )
    vocab = build_wordpiece_vocab(
        texts + [f"a {c} picture" for c in ("red", "green", "blue", "yellow")] + ["slowly", "what moves"]
    )
    write_vocab(vocab, str(tmp_path / "vocab.txt"))
    common = [
        "--user-dir",
        os.path.join(REPO, "unilm_vl"),
        str(tmp_path),
        "--vocab-file",
        str(tmp_path / "vocab.txt"),
        "--max-text-tokens",
        "12",
        "--arch",
        "cosa_tiny",
        "--criterion",
        "cosa",
        "--optimizer",
        "adam",
        "--lr",
        "1e-4",
        "--batch-size",
        "4",
        "--max-update",
        "1",
        "--cpu",
        "--seed",
        "1",
        "--no-epoch-checkpoints",
        "--disable-validation",
        "--log-format",
        "simple",
        "--log-interval",
        "1",
    ]
    out = run(
        [
            f"{BIN}/fairseq-train",
            *common,
            "--task",
            "cosa_pretrain",
            "--train-data",
            "mix.json",
            "--cosa-tasks",
            "ret_cret_ccap_cmlm",
            "--concatenated-nums",
            "4",
            "--num-frame-embeddings",
            "4",
            "--save-dir",
            str(tmp_path / "pre"),
        ]
    )
    for term in ("itc_loss_origin", "itm_loss_concatenated", "caption_loss_concatenated", "mlm_loss_concatenated"):
        assert term + "=" in out
    out = run(
        [
            f"{BIN}/fairseq-train",
            *common,
            "--task",
            "cosa_finetune",
            "--finetune-task",
            "retrieval",
            "--train-data",
            "train.json",
            "--num-frames",
            "2",
            "--num-frames-test",
            "2",
            "--num-frame-embeddings",
            "2",
            "--cosa-tasks",
            "ret",
            "--itm-ratio",
            "0.1",
            "--finetune-from-model",
            str(tmp_path / "pre" / "checkpoint_last.pt"),
            "--save-dir",
            str(tmp_path / "ft"),
        ]
    )
    assert "itc_loss_origin=" in out and "num_updates=1" in out
    ckpt = str(tmp_path / "ft" / "checkpoint_last.pt")
    ret = cosa_retrieval.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(tmp_path / "test.json"),
            "--itm-k",
            "2",
            "--output",
            str(tmp_path / "ret.json"),
        ]
    )
    assert (ret["num_videos"], ret["num_texts"]) == (4, 8)
    assert 8 * 2 <= ret["itm_pairs"] <= 8 * 2 + 4 * 2  # texts' top-2 videos and videos' top-2 texts
    for scores in (ret["itc"], ret["itm"]):
        assert 0.0 <= scores["t2v_R@1"] <= scores["t2v_R@5"] == 100.0  # 4 videos: every GT is in the top 5
    assert json.loads((tmp_path / "ret.json").read_text())["itc"]["video_recall"] == ret["itc"]["video_recall"]
    cap = cosa_caption.main(
        [
            "--checkpoint",
            ckpt,
            "--data",
            str(tmp_path / "test.json"),
            "--max-len",
            "6",
            "--tokenizer",
            "simple",
            "--no-meteor",
            "--predictions",
            str(tmp_path / "caps.json"),
        ]
    )
    assert cap["num_images"] == 4 and 0.0 <= cap["CIDEr"]
    assert [p["video_id"] for p in json.loads((tmp_path / "caps.json").read_text())] == [f"vid{v}" for v in range(4)]
    qa = cosa_qa.main(["--checkpoint", ckpt, "--data", str(tmp_path / "qa.json"), "--max-len", "4"])
    assert qa["num_questions"] == 1 and qa["exact_match"] in (0.0, 100.0) and qa["vqa_accuracy"] is None
