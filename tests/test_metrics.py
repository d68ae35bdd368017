"""unilm_vl.eval.metrics against hand-computed values."""

import numpy as np
import pytest
import torch

from unilm_vl.eval.metrics import (
    ensemble_scores,
    mean_per_class_accuracy,
    mean_rank,
    median_rank,
    per_class_accuracy,
    recall_at_k,
    retrieval_metrics,
    retrieval_ranks,
    topk_accuracy,
    zeroshot_classifier,
)

# 3 images x 6 texts; texts 0,1 -> image 0, texts 2,3 -> image 1, texts 4,5 -> image 2.
SIM = [
    [0.9, 0.2, 0.8, 0.1, 0.3, 0.4],
    [0.8, 0.6, 0.4, 0.5, 0.1, 0.2],
    [0.3, 0.1, 0.2, 0.9, 0.0, 0.5],
]
T2I = [0, 0, 1, 1, 2, 2]
# No ties at any ground truth here, so the ranks are those of every sort-based protocol.
# i2t, by hand (best GT score of the row, then count the non-GT entries of the row >= it):
#   image 0: GT scores .9, .2 -> best .9; nothing above            -> 0
#   image 1: GT scores .4, .5 -> best .5; .8 and .6 above          -> 2
#   image 2: GT scores .0, .5 -> best .5; .9 above                 -> 1
I2T_RANKS = [0, 2, 1]
# t2i, by hand (GT score of the column, count the other entries of the column >= it):
#   t0 [.9,.8,.3] GT .9 -> 0;  t1 [.2,.6,.1] GT .2 -> 1;  t2 [.8,.4,.2] GT .4 -> 1
#   t3 [.1,.5,.9] GT .5 -> 1;  t4 [.3,.1,.0] GT .0 -> 2;  t5 [.4,.2,.5] GT .5 -> 0
T2I_RANKS = [0, 1, 1, 1, 2, 0]


def test_retrieval_ranks_hand_case():
    i2t, t2i = retrieval_ranks(torch.tensor(SIM), T2I)
    assert i2t.tolist() == I2T_RANKS
    assert t2i.tolist() == T2I_RANKS


def test_retrieval_ranks_accepts_numpy_and_is_permutation_invariant():
    sim = np.array(SIM)
    i2t, t2i = retrieval_ranks(sim, np.array(T2I))
    assert i2t.tolist() == I2T_RANKS and t2i.tolist() == T2I_RANKS
    # Permute the texts (and their GT indices): every text keeps its rank.
    perm = [5, 2, 0, 4, 1, 3]
    i2t_p, t2i_p = retrieval_ranks(sim[:, perm], [T2I[p] for p in perm])
    assert i2t_p.tolist() == I2T_RANKS
    assert t2i_p.tolist() == [T2I_RANKS[p] for p in perm]


def test_retrieval_ranks_ties_count_against_the_ground_truth():
    # Column of text 0: image 0 (GT) .5 ties with image 1 .5, image 2 has .7 -> rank 2 (the tie counts above it).
    # Column of text 1: image 1 (GT) .5, the others .2 and .3 -> 0.  Column of text 2: image 2 (GT) .1 is the top -> 0.
    # Row of image 1 (GT text 1 at .5): text 0 .5 ties -> rank 1.  Row of image 2 (GT text 2 .1): .7, .3 above -> 2.
    sim = [[0.5, 0.2, 0.0], [0.5, 0.5, 0.0], [0.7, 0.3, 0.1]]
    i2t, t2i = retrieval_ranks(sim, [0, 1, 2])
    assert t2i.tolist() == [2, 0, 0]
    assert i2t.tolist() == [0, 1, 2]
    # An image's other GT caption tied with its best one does not count against it (image 0: texts 0 and 1 both
    # at .4); a non-GT caption does (image 1, GT text 2 at .4: rank 0, then 1 once text 0 also scores .4).
    i2t, _ = retrieval_ranks([[0.4, 0.4, 0.1], [0.0, 0.0, 0.4]], [0, 0, 1])
    assert i2t.tolist() == [0, 0]
    i2t, _ = retrieval_ranks([[0.4, 0.4, 0.1], [0.4, 0.0, 0.4]], [0, 0, 1])
    assert i2t.tolist() == [0, 1]


def test_constant_scores_score_at_most_chance():
    """A collapsed model (every score equal), 4 images x 2 captions. Chance (a uniformly random order) is
    R@1 = 1/4 for text->image and 1 - C(6,1)/C(8,1) = 2/8 for image->text. Under the rule every other image ranks
    above a text's GT (rank 3) and every non-GT caption above an image's (rank 8 - 2 = 6): R@1 = 0 both ways,
    R@5 = 100 / 0, R@10 = 100 / 100, mean = median rank 4 and 7, whatever the order of the items."""
    t2i_gt = [0, 0, 1, 1, 2, 2, 3, 3]
    for sim in (torch.zeros(4, 8), torch.full((4, 8), 0.37, dtype=torch.float16), np.ones((4, 8), dtype=np.int64)):
        i2t, t2i = retrieval_ranks(sim, t2i_gt)
        assert i2t.tolist() == [6] * 4 and t2i.tolist() == [3] * 8
        m = retrieval_metrics(sim, t2i_gt)
        assert m == pytest.approx(
            {
                "i2t_R@1": 0.0,
                "i2t_R@5": 0.0,
                "i2t_R@10": 100.0,
                "t2i_R@1": 0.0,
                "t2i_R@5": 100.0,
                "t2i_R@10": 100.0,
                "i2t_mean_rank": 7.0,
                "i2t_median_rank": 7.0,
                "t2i_mean_rank": 4.0,
                "t2i_median_rank": 4.0,
                "rsum": 300.0,
            }
        )
        assert m["t2i_R@1"] <= 100 / 4 and m["i2t_R@1"] <= 100 * 2 / 8  # at most chance
    # constant logits: top-1 = 0 of chance 1/3, top-3 = 100 (k >= C), per-class 0
    assert topk_accuracy(torch.zeros(6, 3), [0, 1, 2, 0, 1, 2], ks=(1, 2, 3)) == {
        "top1": 0.0,
        "top2": 0.0,
        "top3": 100.0,
    }
    assert mean_per_class_accuracy(torch.zeros(6, 3), [0, 1, 2, 0, 1, 2], 3) == 0.0


def test_ranks_equal_the_sort_based_rank_without_ties_and_are_its_worst_case_with_them():
    """Distinct random scores: the rank is the GT's position in a descending sort (the usual protocol), for both
    directions. Integer scores with many ties: it is the position in a sort that puts the GT after everything tied
    with it, i.e. the largest position any tie-breaking order gives it."""
    gen = torch.Generator().manual_seed(0)
    t2i_gt = torch.arange(12) % 5  # 5 images, 12 texts
    for sim, gt_last in (
        (torch.rand(5, 12, generator=gen, dtype=torch.float64), False),
        (torch.randint(0, 3, (5, 12), generator=gen).double(), True),
    ):
        i2t, t2i = retrieval_ranks(sim, t2i_gt)
        for j in range(12):
            col = sim[:, j].tolist()
            key = [(-col[i], i == int(t2i_gt[j]) if gt_last else 0) for i in range(5)]  # GT after its ties
            order = sorted(range(5), key=lambda i: key[i])
            assert t2i[j] == order.index(int(t2i_gt[j]))
        for i in range(5):
            row = sim[i].tolist()
            gt_texts = [j for j in range(12) if int(t2i_gt[j]) == i]
            key = [(-row[j], j in gt_texts if gt_last else 0) for j in range(12)]
            order = sorted(range(12), key=lambda j: key[j])
            assert i2t[i] == min(order.index(j) for j in gt_texts)


def test_retrieval_ranks_input_checks():
    with pytest.raises(ValueError, match="no GT text"):
        retrieval_ranks(torch.zeros(3, 2), [0, 0])
    with pytest.raises(ValueError, match="entries"):
        retrieval_ranks(torch.zeros(2, 2), [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_ranks(torch.zeros(2, 2), [0, 2])


def test_recall_mean_median_rank():
    assert recall_at_k(T2I_RANKS) == pytest.approx({"R@1": 100 * 2 / 6, "R@5": 100.0, "R@10": 100.0})
    assert recall_at_k(I2T_RANKS, ks=(1, 2, 3)) == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})
    assert mean_rank(I2T_RANKS) == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert median_rank(I2T_RANKS) == 2.0
    assert mean_rank(T2I_RANKS) == pytest.approx(11 / 6)  # (1+2+2+2+3+1) / 6
    # Even count: lower median of 1-based [1, 1, 2, 3] is 1 (numpy's average median would be 1.5).
    assert median_rank([0, 2, 0, 1]) == 1.0


def test_retrieval_metrics_hand_case():
    m = retrieval_metrics(torch.tensor(SIM), T2I)
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@5": 100.0,
        "i2t_R@10": 100.0,
        "t2i_R@1": 100 / 3,
        "t2i_R@5": 100.0,
        "t2i_R@10": 100.0,
        "i2t_mean_rank": 2.0,
        "i2t_median_rank": 2.0,
        "t2i_mean_rank": 11 / 6,
        "t2i_median_rank": 2.0,
        "rsum": 2 * (100 / 3) + 400.0,
    }
    assert m == pytest.approx(expected)


def test_retrieval_metrics_cosa_case():
    # the release's metric, TXH-mercury/COSA test.py (texts x videos there; transposed here to images x texts).
    s_text_video = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.5, 0.4], [0.1, 0.8, 0.7], [0.6, 0.2, 0.5]])
    m = retrieval_metrics(s_text_video.T, [0, 0, 1, 2])
    assert m["t2i_R@1"] == pytest.approx(50.0)
    assert (m["t2i_R@5"], m["t2i_R@10"]) == (100.0, 100.0)
    assert m["t2i_median_rank"] == 1.0 and m["t2i_mean_rank"] == pytest.approx(1.75)
    assert m["i2t_R@1"] == pytest.approx(200 / 3)
    assert (m["i2t_R@1"] + m["i2t_R@5"] + m["i2t_R@10"]) / 3 == pytest.approx(88.888888, abs=1e-5)


# 4 samples x 6 classes.
LOGITS = [
    [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: best                               -> rank 0
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: five classes above                 -> rank 5
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4: four above                         -> rank 4
    [0.2, 0.2, 0.9, 0.1, 0.0, 0.0],  # label 0: .9 above, class 1 tied (counts above) -> rank 2
]
LABELS = [1, 5, 4, 0]


def test_topk_accuracy_hand_case():
    assert topk_accuracy(torch.tensor(LOGITS), LABELS) == pytest.approx({"top1": 25.0, "top5": 75.0})
    assert topk_accuracy(np.array(LOGITS), np.array(LABELS), ks=(2, 3, 6)) == pytest.approx(
        {"top2": 25.0, "top3": 50.0, "top6": 100.0}
    )


def test_mean_per_class_accuracy_imbalanced():
    # Class 0: 4 samples, all right; class 1: 1 sample, wrong; class 2: 1 sample, right.
    logits = torch.tensor([[3.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    labels = [0, 0, 0, 0, 1, 2]
    assert topk_accuracy(logits, labels, ks=(1,))["top1"] == pytest.approx(500 / 6)  # 5 of 6
    assert mean_per_class_accuracy(logits, labels, 3) == pytest.approx(200 / 3)  # (1 + 0 + 1) / 3
    # A class without samples is left out of the mean.
    logits4 = torch.cat([logits, torch.zeros(6, 1) - 1], dim=1)
    assert mean_per_class_accuracy(logits4, labels, 4) == pytest.approx(200 / 3)
    acc = per_class_accuracy(logits4, labels, 4)
    assert acc[:3] == [100.0, 0.0, 100.0] and np.isnan(acc[3])


class FixedTextEncoder:
    """encode_texts returning fixed, unnormalised vectors per prompt."""

    VECTORS = {
        "a cat": [3.0, 4.0],
        "a photo of cat": [0.0, 2.0],
        "a dog": [1.0, 0.0],
        "a photo of dog": [0.0, -5.0],
        "a hound": [0.0, 1.0],
        "a photo of hound": [0.0, 1.0],
    }

    def __call__(self, texts):
        return torch.tensor([self.VECTORS[t] for t in texts])


def test_zeroshot_classifier_normalises_each_prompt_then_the_mean():
    w = zeroshot_classifier(FixedTextEncoder(), ["cat", "dog"], ["a {}", "a photo of {}"])
    # cat: [.6,.8] and [0,1] -> mean [.3,.9] -> / sqrt(.9);  dog: [1,0] and [0,-1] -> mean [.5,-.5] -> / sqrt(.5)
    expected = torch.tensor([[0.3 / 0.9**0.5, 0.5 / 0.5**0.5], [0.9 / 0.9**0.5, -0.5 / 0.5**0.5]])
    assert w.shape == (2, 2)
    torch.testing.assert_close(w, expected)
    # Averaging raw embeddings instead would give cat = [3, 6] / |.| = [.447, .894]: the test tells them apart.
    assert abs(w[0, 0].item() - 3 / 45**0.5) > 0.1


def test_zeroshot_classifier_single_template_and_synonyms():
    w = zeroshot_classifier(FixedTextEncoder(), ["cat"], ["a {}"])
    torch.testing.assert_close(w[:, 0], torch.tensor([0.6, 0.8]))
    # Synonyms: prompts of "dog" and "hound" over both templates: [1,0], [0,-1], [0,1], [0,1] -> mean [.25,.25].
    w = zeroshot_classifier(FixedTextEncoder(), [["dog", "hound"]], ["a {}", "a photo of {}"])
    torch.testing.assert_close(w[:, 0], torch.tensor([0.5**0.5, 0.5**0.5]))


def test_two_head_ensemble():
    z = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    h = torch.tensor([[0.1, 0.5], [0.6, 0.0]])
    torch.testing.assert_close(ensemble_scores(z, h, 1.0), z)  # w = 1 is the z branch alone
    torch.testing.assert_close(ensemble_scores(z, h, 0.0), h)
    torch.testing.assert_close(ensemble_scores(z, h, 0.3), torch.tensor([[0.34, 0.38], [0.48, 0.09]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ensemble_scores(z, h, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ensemble_scores(z, h[:1], 0.5)
