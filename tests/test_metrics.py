"""unilm_vl.eval.metrics against hand-computed values."""
import numpy as np
import pytest
import torch

from unilm_vl.eval.metrics import (ensemble_scores, mean_per_class_accuracy, mean_rank, median_rank, per_class_accuracy,
                                   recall_at_k, retrieval_metrics, retrieval_ranks, topk_accuracy,
                                   zeroshot_classifier)

# 3 images x 6 texts; texts 0,1 -> image 0, texts 2,3 -> image 1, texts 4,5 -> image 2.
SIM = [
    [0.9, 0.2, 0.8, 0.1, 0.3, 0.4],
    [0.8, 0.6, 0.4, 0.5, 0.1, 0.2],
    [0.3, 0.1, 0.2, 0.9, 0.0, 0.5],
]
T2I = [0, 0, 1, 1, 2, 2]
# i2t, by hand (best GT score of the row, then count strictly greater entries of the row):
#   image 0: GT scores .9, .2 -> best .9; nothing above            -> 0
#   image 1: GT scores .4, .5 -> best .5; .8 and .6 above          -> 2
#   image 2: GT scores .0, .5 -> best .5; .9 above                 -> 1
I2T_RANKS = [0, 2, 1]
# t2i, by hand (GT score of the column, count strictly greater entries of the column):
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


def test_retrieval_ranks_ties_count_only_strictly_greater():
    # Column of text 0: image 0 (GT) .5 ties with image 1 .5, image 2 has .7 -> rank 1 (the tie is not counted).
    # Column of text 1: image 1 (GT) .5, the others .2 and .3 -> 0.  Column of text 2: image 2 (GT) .1 is the top -> 0.
    # Row of image 1 (GT text 1 at .5): text 0 .5 ties -> rank 0.  Row of image 2 (GT text 2 .1): .7, .3 above -> 2.
    sim = [[0.5, 0.2, 0.0],
           [0.5, 0.5, 0.0],
           [0.7, 0.3, 0.1]]
    i2t, t2i = retrieval_ranks(sim, [0, 1, 2])
    assert t2i.tolist() == [1, 0, 0]
    assert i2t.tolist() == [0, 0, 2]
    # All scores equal: everything is rank 0, whatever the order.
    i2t, t2i = retrieval_ranks(torch.zeros(2, 4), [1, 0, 1, 0])
    assert i2t.tolist() == [0, 0] and t2i.tolist() == [0, 0, 0, 0]


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
        "i2t_R@1": 100 / 3, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
        "t2i_R@1": 100 / 3, "t2i_R@5": 100.0, "t2i_R@10": 100.0,
        "i2t_mean_rank": 2.0, "i2t_median_rank": 2.0,
        "t2i_mean_rank": 11 / 6, "t2i_median_rank": 2.0,
        "rsum": 2 * (100 / 3) + 400.0,
    }
    assert m == pytest.approx(expected)


def test_retrieval_metrics_cosa_case():
    # cosa.md 6.1 check 8 (texts x videos there; transposed here to images x texts).
    s_text_video = torch.tensor([[.9, .1, .3], [.2, .5, .4], [.1, .8, .7], [.6, .2, .5]])
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
    [0.2, 0.2, 0.9, 0.1, 0.0, 0.0],  # label 0: .9 above, class 1 tied (not above) -> rank 1
]
LABELS = [1, 5, 4, 0]


def test_topk_accuracy_hand_case():
    assert topk_accuracy(torch.tensor(LOGITS), LABELS) == pytest.approx({"top1": 25.0, "top5": 75.0})
    assert topk_accuracy(np.array(LOGITS), np.array(LABELS), ks=(2, 6)) == pytest.approx({"top2": 50.0,
                                                                                          "top6": 100.0})


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
        "a cat": [3.0, 4.0], "a photo of cat": [0.0, 2.0],
        "a dog": [1.0, 0.0], "a photo of dog": [0.0, -5.0],
        "a hound": [0.0, 1.0], "a photo of hound": [0.0, 1.0],
    }

    def __call__(self, texts):
        return torch.tensor([self.VECTORS[t] for t in texts])


def test_zeroshot_classifier_normalises_each_prompt_then_the_mean():
    w = zeroshot_classifier(FixedTextEncoder(), ["cat", "dog"], ["a {}", "a photo of {}"])
    # cat: [.6,.8] and [0,1] -> mean [.3,.9] -> / sqrt(.9);  dog: [1,0] and [0,-1] -> mean [.5,-.5] -> / sqrt(.5)
    expected = torch.tensor([[0.3 / 0.9 ** 0.5, 0.5 / 0.5 ** 0.5],
                             [0.9 / 0.9 ** 0.5, -0.5 / 0.5 ** 0.5]])
    assert w.shape == (2, 2)
    torch.testing.assert_close(w, expected)
    # Averaging raw embeddings instead would give cat = [3, 6] / |.| = [.447, .894]: the test tells them apart.
    assert abs(w[0, 0].item() - 3 / 45 ** 0.5) > 0.1


def test_zeroshot_classifier_single_template_and_synonyms():
    w = zeroshot_classifier(FixedTextEncoder(), ["cat"], ["a {}"])
    torch.testing.assert_close(w[:, 0], torch.tensor([0.6, 0.8]))
    # Synonyms: prompts of "dog" and "hound" over both templates: [1,0], [0,-1], [0,1], [0,1] -> mean [.25,.25].
    w = zeroshot_classifier(FixedTextEncoder(), [["dog", "hound"]], ["a {}", "a photo of {}"])
    torch.testing.assert_close(w[:, 0], torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))


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
