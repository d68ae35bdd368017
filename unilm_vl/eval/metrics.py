"""Pure metric functions for image-text retrieval, zero-shot classification, phrase grounding / referring
expressions, captioning and VQA.

Tensors or arrays in, plain floats / dicts (or a weight matrix) out; no files, no model, no global state.
Every score is a percentage (0-100), except CIDEr-D whose coco-caption value (0-10) is also scaled by 100, and
the segmentation IoUs of :func:`mean_iou`, which lie in [0, 1].

One ranking convention is used everywhere (retrieval ranks, top-k accuracy, per-class accuracy, and the
positive-vs-negatives test of compositionality):

    rank(gt) = #{ other items whose score is greater than OR EQUAL to the score of gt }      (0-based)

so ``top-k correct <=> rank < k``. **Ties count against the ground truth**: every item tied with it is placed
above it, the worst position any tie-breaking order could give it. Why this rule:

- A tie never favours the ground truth. A collapsed model whose scores are all equal ranks every ground truth
  last (R@1 = 0, top-1 = 0): at most chance, never above it. (Counting only strictly greater scores, as the
  code did before, gave such a model R@1 = top-1 = 100.)
- It depends only on the scores, never on the order in which the items are stored, so it is deterministic and
  invariant to permuting the gallery. The usual protocols rank by a sort (``argsort(-scores)``, ``topk``) and
  take the GT's position in it, which breaks ties by storage order: a constant model then scores whatever share
  of the queries have their GT stored first (1/N on a balanced, grouped file; more when image 0 has more
  captions than the others).
- Where the ground truth ties with nothing, which for real-valued similarities of a trained model is almost
  every query, it equals the sort-based rank of those protocols, whatever their tie-breaking; where it does
  tie, it is the lowest of their possible answers, so a reported R@k is one that every tie-breaking order
  reaches or beats.

The price: items that are exact duplicates (two identical caption strings of different images embed to the same
vector) tie and count against each other. :func:`retrieval_ranks` logs how many queries had a tie at their
ground truth, so such cases are visible.

Protocols follow CLIP / OpenCLIP and the COSMOS / COSA evaluation code (ExplainableML/cosmos ``src/training/train.py``
``compute_retrieval``, facebookresearch/clip-rocket ``eval_zeroshot.py``, TXH-mercury/COSA ``test.py``): i2t ranks an
image by its best-ranked caption, t2i ranks a caption's single GT image; mean and median ranks are reported 1-based
(rank + 1), the median being the lower median as ``torch.median`` returns it.
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

# Rows of the similarity matrix compared per step; bounds the boolean temporaries to chunk x num_texts.
_CHUNK_ROWS = 1024


def _as_tensor(x: ArrayLike, dtype: torch.dtype = None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.cpu()
    return t.to(dtype) if dtype is not None else t


def retrieval_ranks(sim: ArrayLike, text_to_image: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the ground truth for image->text and text->image retrieval.

    ``sim`` is N_img x N_txt (``sim[i, j]`` = score of image ``i`` with text ``j``); ``text_to_image[j]`` is the
    index of the single GT image of text ``j``. An image may have several GT texts and must have at least one.

    With ``g(j) = text_to_image[j]`` and ``T(i) = {j : g(j) = i}``, ties counting against the ground truth
    (module docstring):

    - text->image:  ``t2i[j] = #{ i' != g(j) : sim[i', j] >= sim[g(j), j] }``
    - image->text:  ``i2t[i] = #{ j' not in T(i) : sim[i, j'] >= max_{j in T(i)} sim[i, j] }``

    (the rank of an image is that of its best-ranked GT caption; its other GT captions never count against it).
    The result does not depend on the storage order of images or texts. The number of queries whose GT ties with
    another item is logged (INFO).

    Returns ``(i2t_ranks, t2i_ranks)``: int64 arrays of length N_img and N_txt.
    Raises ``ValueError`` for a malformed input, a non-finite score, or an image without any GT text.
    """
    s = _as_tensor(sim)
    if s.dim() != 2:
        raise ValueError(f"sim must be 2-D (num_images x num_texts), got shape {tuple(s.shape)}")
    if not s.is_floating_point() or s.dtype in (torch.float16, torch.bfloat16):
        s = s.double()  # exact for these inputs: order and ties are kept
    n_img, n_txt = s.shape
    gt = _as_tensor(text_to_image, torch.long).reshape(-1)
    if gt.numel() != n_txt:
        raise ValueError(f"text_to_image has {gt.numel()} entries but sim has {n_txt} texts (columns)")
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"empty similarity matrix of shape {tuple(s.shape)}")
    if int(gt.min()) < 0 or int(gt.max()) >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img}), got [{int(gt.min())}, {int(gt.max())}]")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sim holds NaN or inf; ranks would be meaningless")
    captions_per_image = torch.bincount(gt, minlength=n_img)
    orphans = (captions_per_image == 0).nonzero().flatten().tolist()
    if orphans:
        raise ValueError(f"{len(orphans)} images have no GT text (first indices: {orphans[:10]})")

    gt_score = s[gt, torch.arange(n_txt)]  # N_txt: score of each text with its GT image
    best_gt = torch.full((n_img,), float("-inf"), dtype=s.dtype)
    best_gt.scatter_reduce_(0, gt, gt_score, reduce="amax")  # N_img: best score over each image's GT texts
    # N_img: GT texts of each image scoring its best; they are among the ">=" counts of its row but never above it
    gt_at_best = torch.bincount(gt, weights=(gt_score == best_gt[gt]).double(), minlength=n_img).long()

    t2i_ge = torch.zeros(n_txt, dtype=torch.long)  # images scoring >= the GT image, the GT included
    t2i_gt = torch.zeros(n_txt, dtype=torch.long)  # images scoring > the GT image
    i2t_ge = torch.empty(n_img, dtype=torch.long)
    i2t_gt = torch.empty(n_img, dtype=torch.long)
    for r0 in range(0, n_img, _CHUNK_ROWS):
        block = s[r0 : r0 + _CHUNK_ROWS]  # R x N_txt
        t2i_ge += (block >= gt_score[None, :]).sum(0)
        t2i_gt += (block > gt_score[None, :]).sum(0)
        best = best_gt[r0 : r0 + _CHUNK_ROWS, None]  # R x 1
        i2t_ge[r0 : r0 + _CHUNK_ROWS] = (block >= best).sum(1)
        i2t_gt[r0 : r0 + _CHUNK_ROWS] = (block > best).sum(1)
    t2i = t2i_ge - 1  # the GT image itself
    i2t = i2t_ge - gt_at_best
    _log_ties("text->image", int((t2i > t2i_gt).sum()), n_txt)
    _log_ties("image->text", int((i2t > i2t_gt).sum()), n_img)
    return i2t.numpy(), t2i.numpy()


def _log_ties(direction: str, tied: int, total: int) -> None:
    if tied:
        logger.info(
            "%s: %d of %d queries have another item tied with their ground truth; the ties count "
            "against it (unilm_vl.eval.metrics)",
            direction,
            tied,
            total,
        )


def recall_at_k(ranks: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@k in percent from 0-based ranks: ``R@k = 100 * mean(rank < k)``.

    Returns ``{"R@1": ..., "R@5": ..., "R@10": ...}`` for the default ``ks``.
    """
    r = np.asarray(ranks).reshape(-1)
    if r.size == 0:
        raise ValueError("recall_at_k needs at least one rank")
    return {f"R@{k}": float(100.0 * np.mean(r < k)) for k in ks}


def mean_rank(ranks: ArrayLike) -> float:
    """Mean of the 1-based ranks: ``mean(rank) + 1``."""
    r = np.asarray(ranks).reshape(-1)
    if r.size == 0:
        raise ValueError("mean_rank needs at least one rank")
    return float(r.mean() + 1)


def median_rank(ranks: ArrayLike) -> float:
    """Lower median of the 1-based ranks: ``sorted(rank)[(n - 1) // 2] + 1`` (what ``torch.median`` returns).

    For an even count this is the smaller of the two middle values, not their average.
    """
    r = np.sort(np.asarray(ranks).reshape(-1))
    if r.size == 0:
        raise ValueError("median_rank needs at least one rank")
    return float(r[(r.size - 1) // 2] + 1)


def retrieval_metrics(sim: ArrayLike, text_to_image: ArrayLike, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """All retrieval metrics of a similarity matrix (N_img x N_txt), from :func:`retrieval_ranks`.

    Keys: ``i2t_R@k`` and ``t2i_R@k`` for each k (percent, ``100 * mean(rank < k)``);
    ``i2t_mean_rank``, ``i2t_median_rank``, ``t2i_mean_rank``, ``t2i_median_rank`` (1-based: mean(rank) + 1 and
    the lower median of rank + 1); ``rsum`` = the sum of all the ``R@k`` values of both directions (for the
    default ks: i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10, at most 600).
    """
    i2t, t2i = retrieval_ranks(sim, text_to_image)
    out: Dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_{key}": value for key, value in recall_at_k(ranks, ks).items()})
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_mean_rank"] = mean_rank(ranks)
        out[f"{name}_median_rank"] = median_rank(ranks)
    out["rsum"] = float(sum(out[f"{name}_R@{k}"] for name in ("i2t", "t2i") for k in ks))
    return out


def _label_ranks(logits: ArrayLike, labels: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of the true class in each row, ties counting against it (module docstring):
    ``#{c != y_n : logits[n, c] >= logits[n, y_n]}``; and the labels."""
    z = _as_tensor(logits)
    if not z.is_floating_point():
        z = z.double()
    y = _as_tensor(labels, torch.long).reshape(-1)
    if z.dim() != 2 or z.shape[0] != y.numel():
        raise ValueError(f"logits must be N x C with N = len(labels); got {tuple(z.shape)} and {y.numel()} labels")
    if y.numel() == 0:
        raise ValueError("no samples")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{int(y.min())}, {int(y.max())}]")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits hold NaN or inf")
    true = z.gather(1, y[:, None])  # N x 1
    return (z >= true).sum(1) - 1, y  # - 1: the true class itself


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent: ``top{k} = 100 * mean_n [ #{c != y_n : z[n, c] >= z[n, y_n]} < k ]``.

    ``logits`` is N x C, ``labels`` N class indices. A class tied with the true class counts above it (module
    ranking convention: a constant classifier scores 0, not 100); for k >= C every sample counts as correct.
    Returns ``{"top1": ..., "top5": ...}`` for the default ``ks``.
    """
    ranks, _ = _label_ranks(logits, labels)
    return {f"top{k}": float(100.0 * (ranks < k).double().mean()) for k in ks}


def mean_per_class_accuracy(logits: ArrayLike, labels: ArrayLike, num_classes: int) -> float:
    """Balanced top-1 accuracy in percent: ``100 * mean_{c in P} ( #{n : y_n = c, correct_n} / #{n : y_n = c} )``.

    ``correct_n`` is the top-1 test of :func:`topk_accuracy`; ``P`` is the set of classes that have at least one
    sample (a class absent from ``labels`` has no defined accuracy and is left out of the mean, as in
    scikit-learn's ``balanced_accuracy_score``).
    """
    ranks, y = _label_ranks(logits, labels)
    if int(y.max()) >= num_classes:
        raise ValueError(f"label {int(y.max())} does not fit num_classes={num_classes}")
    correct = torch.bincount(y, weights=(ranks == 0).double(), minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes).double()
    present = total > 0
    return float(100.0 * (correct[present] / total[present]).mean())


def per_class_accuracy(logits: ArrayLike, labels: ArrayLike, num_classes: int) -> List[float]:
    """Top-1 accuracy in percent of each class, ``nan`` for a class without samples (list of length C)."""
    ranks, y = _label_ranks(logits, labels)
    correct = torch.bincount(y, weights=(ranks == 0).double(), minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes).double()
    return [float(100.0 * c / t) if t > 0 else float("nan") for c, t in zip(correct.tolist(), total.tolist())]


ClassName = Union[str, Sequence[str]]


@torch.no_grad()
def zeroshot_classifier(
    encode_texts: Callable[[List[str]], torch.Tensor], classnames: Sequence[ClassName], templates: Sequence[str]
) -> torch.Tensor:
    """Zero-shot classifier weights W (D x C), the CLIP prompt-ensembling protocol.

    For class c with prompts ``p = t.format(name)`` over all templates t (and over all synonyms when a class is
    given as a list of names, as in clip-rocket's ``labels.json``):

        e_p = f(p) / ||f(p)||,      w_c = mean_p e_p,      W[:, c] = w_c / ||w_c||

    where ``f = encode_texts``. With a single template and name, ``W[:, c]`` is the normalised text embedding.
    The result is float32 on the CPU.
    """
    if not classnames:
        raise ValueError("zeroshot_classifier needs at least one class name")
    if not templates:
        raise ValueError("zeroshot_classifier needs at least one template")
    columns = []
    for name in classnames:
        names = [name] if isinstance(name, str) else list(name)
        prompts = [template.format(n) for n in names for template in templates]
        emb = encode_texts(prompts).detach().float().cpu()  # P x D
        emb = F.normalize(emb, dim=-1)
        columns.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(columns, dim=1)  # D x C


def ensemble_scores(z_scores: ArrayLike, h_scores: ArrayLike, weight: float) -> torch.Tensor:
    """clip-rocket's two-head zero-shot ensemble ``w * z_sim + (1 - w) * h_sim`` (CLIP head z, l2l head h);
    ``w = 1`` is the CLIP head alone."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"ensemble weight must be in [0, 1], got {weight}")
    z, h = _as_tensor(z_scores).float(), _as_tensor(h_scores).float()
    if z.shape != h.shape:
        raise ValueError(f"score matrices differ in shape: {tuple(z.shape)} vs {tuple(h.shape)}")
    return weight * z + (1.0 - weight) * h


# ---------------------------------------------------------------------------------------------------------------------
# Compositionality (SugarCrepe / ARO) and zero-shot semantic segmentation (mIoU).
# As ytaek-oh/fsc-clip src/training/eval_compo.py and ExplainableML/cosmos src/training/clip_segmentor.py score them.
# ---------------------------------------------------------------------------------------------------------------------


def compositional_correct(scores_pos: ArrayLike, scores_neg: ArrayLike) -> torch.Tensor:
    """Per-item correctness of a positive-vs-hard-negatives benchmark: ``s_pos[n] > max_j s_neg[n, j]``.

    ``scores_pos`` has N scores (image n with its positive caption), ``scores_neg`` is N x K (image n with its K
    negatives; 1-D means K = 1). The comparison is strict: a negative tied with the positive makes the item wrong
    (the module's ranking convention with the positive as the ground truth among 1 + K items: correct <=> rank 0).
    Items with fewer than K negatives pad their row with ``-inf`` (never greater than a finite positive score).
    Returns a bool tensor of length N. Raises ``ValueError`` for mismatched shapes, K = 0 or a NaN score.
    """
    pos = _as_tensor(scores_pos).double().reshape(-1)  # N
    neg = _as_tensor(scores_neg).double()
    if neg.dim() == 1:
        neg = neg[:, None]  # N x 1
    if neg.dim() != 2 or neg.shape[0] != pos.numel():
        raise ValueError(
            f"scores_neg must be N x K with N = {pos.numel()} (the number of positive scores), "
            f"got shape {tuple(neg.shape)}"
        )
    if neg.shape[1] == 0:
        raise ValueError("every item needs at least one negative score (scores_neg has K = 0 columns)")
    if bool(torch.isnan(pos).any()) or bool(torch.isnan(neg).any()):
        raise ValueError("compositional scores hold NaN; correctness would be meaningless")
    if pos.numel() and not bool(torch.isfinite(pos).all()):
        raise ValueError("positive scores must be finite")
    return pos > neg.max(dim=1).values  # N


def compositional_accuracy(scores_pos: ArrayLike, scores_neg: ArrayLike) -> float:
    """Accuracy in percent: ``100 * mean_n [s_pos[n] > max_j s_neg[n, j]]`` (:func:`compositional_correct`;
    ties count as wrong). Raises ``ValueError`` when there is no item."""
    correct = compositional_correct(scores_pos, scores_neg)
    if correct.numel() == 0:
        raise ValueError("compositional_accuracy needs at least one item")
    return float(100.0 * correct.double().mean())


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: Optional[int] = 255
) -> np.ndarray:
    """Pixel confusion matrix ``conf[t, p]`` = number of pixels of true class t predicted as class p.

    ``pred`` and ``target`` are integer label maps of the same shape (any number of dimensions). Pixels whose
    target equals ``ignore_index`` are left out. Every other target and every prediction must lie in
    ``[0, num_classes)``. Returns a ``num_classes x num_classes`` int64 array; confusion matrices of several images
    add up to the dataset's.
    """
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in shape: {p.shape} vs {t.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, labels in (("target", t), ("pred", p)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}) (or be ignore_index={ignore_index} in "
                f"target), got values in [{labels.min()}, {labels.max()}]"
            )
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: ArrayLike) -> Dict[str, Any]:
    """Semantic segmentation scores from an accumulated confusion matrix (rows = truth, columns = prediction).

    Per class c (the PASCAL VOC / mmseg ``IoUMetric`` definition, accumulated over the whole dataset, not averaged
    per image)::

        IoU_c = TP_c / (TP_c + FP_c + FN_c) = conf[c, c] / (sum_p conf[c, p] + sum_t conf[t, c] - conf[c, c])

    A class with zero union (absent from both the truth and the prediction) has no defined IoU: its entry is
    ``nan`` and it is excluded from the mean. A class predicted but never present (or present but never predicted)
    has IoU 0 and is included. Returns ``mIoU`` (mean over classes with a defined IoU, in [0, 1]),
    ``per_class_iou`` (list, ``nan`` where undefined), ``pixel_accuracy`` (correct / counted pixels, in [0, 1]),
    ``num_valid_classes`` and ``num_pixels``. Raises ``ValueError`` for a non-square matrix or when every class
    has zero union (no counted pixel).
    """
    c = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {c.shape}")
    tp = np.diag(c)  # C
    union = c.sum(1) + c.sum(0) - tp  # C
    valid = union > 0
    if not valid.any():
        raise ValueError("empty confusion matrix: no counted pixel, mIoU is undefined")
    iou = np.full(c.shape[0], np.nan)
    iou[valid] = tp[valid] / union[valid]
    return {
        "mIoU": float(iou[valid].mean()),
        "per_class_iou": [float(v) for v in iou],
        "pixel_accuracy": float(tp.sum() / c.sum()),
        "num_valid_classes": int(valid.sum()),
        "num_pixels": int(c.sum()),
    }


logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Boxes, phrase grounding (Flickr30k Entities) and referring expressions (RefCOCO / RefCOCO+ / RefCOCOg)
# As microsoft/unilm kosmos-2/evaluation/flickr_entities/ and kosmos-2/evaluation/refcoco/refexp_evaluate.py score them.
# ---------------------------------------------------------------------------------------------------------------------

Box = Sequence[float]


def _boxes_array(boxes: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[-1] != 4 or (arr.ndim == 2 and arr.shape[0] == 0):
        raise ValueError(f"{name} must be one box [4] or a non-empty N x 4 array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf: {arr.tolist()}")
    return arr


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """``[x, y, w, h]`` (COCO ``bbox``) -> ``[x1, y1, x2, y2] = [x, y, x + w, y + h]``, for one box [4] or N x 4.

    Continuous coordinates: no ``- 1`` on the far corner. Returns a float64 array of the input's shape.
    """
    arr = _boxes_array(boxes, "boxes")
    out = arr.copy()
    out[..., 2:] = arr[..., :2] + arr[..., 2:]
    return out


def box_iou(a: ArrayLike, b: ArrayLike) -> Union[float, np.ndarray]:
    """Intersection over union of xyxy boxes on continuous coordinates (no ``+ 1`` in widths and heights).

    ``area = max(0, x2 - x1) * max(0, y2 - y1)``, ``IoU = inter / (area_a + area_b - inter)``; a pair whose union
    is 0 (two degenerate boxes, e.g. Kosmos-2's ``[0, 0, 0, 0]`` "no box") has IoU 0.
    ``a`` and ``b`` are each one box [4] or N x 4 / M x 4: two single boxes give a float, otherwise the N x M
    matrix (a single box counts as N = 1 or M = 1).
    """
    a_arr, b_arr = _boxes_array(a, "a"), _boxes_array(b, "b")
    single = a_arr.ndim == 1 and b_arr.ndim == 1
    a2, b2 = a_arr.reshape(-1, 4), b_arr.reshape(-1, 4)
    top_left = np.maximum(a2[:, None, :2], b2[None, :, :2])  # N x M x 2
    bottom_right = np.minimum(a2[:, None, 2:], b2[None, :, 2:])  # N x M x 2
    wh = np.clip(bottom_right - top_left, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]  # N x M
    area_a = np.clip(a2[:, 2] - a2[:, 0], 0.0, None) * np.clip(a2[:, 3] - a2[:, 1], 0.0, None)  # N
    area_b = np.clip(b2[:, 2] - b2[:, 0], 0.0, None) * np.clip(b2[:, 3] - b2[:, 1], 0.0, None)  # M
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return float(iou[0, 0]) if single else iou


def _predicted_boxes(pred: Any, where: str) -> np.ndarray:
    """Predicted boxes of one item as K x 4 (K = 0 for ``None`` or an empty list; one flat box -> 1 x 4)."""
    if pred is None or len(pred) == 0:
        return np.zeros((0, 4))
    return _boxes_array(pred, where).reshape(-1, 4)


def preview_ids(ids, n: int = 5) -> str:
    """The first ``n`` ids for an error message, with the total when there are more."""
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _check_known_ids(predictions: Mapping, ground_truth: Mapping, what: str) -> None:
    unknown = [key for key in predictions if key not in ground_truth]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted ids have no {what}: {preview_ids(unknown)}")


def _recall_label(k: int) -> str:
    return "R@upper_bound" if k == -1 else f"R@{k}"


def phrase_grounding_recall(
    predictions: Mapping[Hashable, Sequence[Box]],
    ground_truth: Mapping[Hashable, Any],
    ks: Sequence[int] = (1, 5, 10, -1),
    iou_threshold: float = 0.5,
) -> Dict[str, Any]:
    """Flickr30k Entities phrase-grounding Recall@k, the **any-box** protocol (MDETR / Kosmos-2 evaluator with
    ``merge_boxes=False``; microsoft/unilm ``kosmos-2/evaluation/flickr_entities/``).

    Inputs, keyed by a phrase id (any hashable, e.g. ``(sentence_id, phrase_index)``):

    - ``ground_truth[pid]``: either a dict ``{"boxes": [[x1, y1, x2, y2], ...], "phrase_type": "people"}``
      (``phrase_type`` optional; a str or a list of str: Flickr30k Entities phrases can have several types and
      count once for each) or just the list of GT boxes. Pixel xyxy boxes, continuous coordinates.
      A phrase with no GT box cannot be scored; it is left out and counted in ``num_skipped_without_gt``.
    - ``predictions[pid]``: the predicted xyxy boxes of that phrase **in ranked (generation) order**, in the same
      coordinate frame as the GT. A phrase absent from ``predictions`` or with an empty list is a miss at every k.
      A predicted id that is not in ``ground_truth`` raises ``ValueError``.

    Hit at k: ``max_{p in pred[:k], g in GT} IoU(p, g) >= iou_threshold``; ``k = -1`` uses all predictions (the
    "upper bound"). ``R@k = 100 * hits / #phrases`` over the phrases that have GT boxes.

    Returns ``{"R@1", "R@5", "R@10", "R@upper_bound", "num_phrases", "num_missing_predictions",
    "num_skipped_without_gt", "per_type": {type: {"R@1", ..., "num_phrases"}}}`` (for the default ``ks``).
    """
    for k in ks:
        if not isinstance(k, (int, np.integer)) or (k < 1 and k != -1):
            raise ValueError(f"ks must be positive ints or -1 (all predictions), got {k!r}")
    _check_known_ids(predictions, ground_truth, "ground-truth phrase")
    hits = np.zeros(len(ks), dtype=np.int64)
    per_type: Dict[str, List] = {}  # type -> [num_phrases, hits per k]
    num_phrases = missing = skipped = 0
    for pid, gt in ground_truth.items():
        if isinstance(gt, Mapping):
            gt_boxes, types = gt.get("boxes"), gt.get("phrase_type")
        else:
            gt_boxes, types = gt, None
        if gt_boxes is None or len(gt_boxes) == 0:
            skipped += 1
            continue
        gt_arr = _boxes_array(gt_boxes, f"GT boxes of phrase {pid!r}").reshape(-1, 4)
        pred = _predicted_boxes(predictions.get(pid), f"predicted boxes of phrase {pid!r}")
        if len(pred) == 0:
            missing += 1
            best = np.zeros(0)
        else:
            best = box_iou(pred, gt_arr).max(axis=1)  # K: best IoU of each prediction over the GT boxes
        hit = np.array(
            [bool(len(top) and top.max() >= iou_threshold) for top in (best if k == -1 else best[:k] for k in ks)],
            dtype=np.int64,
        )
        num_phrases += 1
        hits += hit
        for t in [types] if isinstance(types, str) else list(types or []):
            entry = per_type.setdefault(t, [0, np.zeros(len(ks), dtype=np.int64)])
            entry[0] += 1
            entry[1] += hit
    if num_phrases == 0:
        raise ValueError("no phrase with GT boxes to evaluate")
    out: Dict[str, Any] = {_recall_label(k): float(100.0 * h / num_phrases) for k, h in zip(ks, hits)}
    out.update(num_phrases=num_phrases, num_missing_predictions=missing, num_skipped_without_gt=skipped)
    out["per_type"] = {
        t: {**{_recall_label(k): float(100.0 * h / n) for k, h in zip(ks, type_hits)}, "num_phrases": n}
        for t, (n, type_hits) in sorted(per_type.items())
    }
    return out


def rec_accuracy(
    predictions: Mapping[Hashable, Any],
    ground_truth: Mapping[Hashable, Box],
    groups: Optional[Mapping[Hashable, str]] = None,
    gt_format: str = "xyxy",
    iou_threshold: float = 0.5,
) -> Dict[str, Any]:
    """Referring-expression comprehension accuracy (RefCOCO / RefCOCO+ / RefCOCOg; microsoft/unilm
    ``kosmos-2/evaluation/refcoco/refexp_evaluate.py``).

    Inputs, keyed by a sample id (one referring expression):

    - ``ground_truth[sid]``: its single GT box, ``[x1, y1, x2, y2]`` or, with ``gt_format="xywh"``, the COCO /
      MDETR ``bbox`` ``[x, y, w, h]`` (converted with :func:`xywh_to_xyxy`).
    - ``predictions[sid]``: the predicted xyxy boxes in generation order (one flat box is accepted too). Absent
      or empty -> a miss for every variant. A predicted id that is not in ``ground_truth`` raises ``ValueError``.
    - ``groups[sid]`` (optional): the group the sample is counted in, e.g. ``"refcoco/testA"`` (MDETR
      ``dataset_name`` + split). Must name every GT id.

    Three variants, each a hit when its box has ``IoU >= iou_threshold`` with the GT:
    ``acc@1`` the first predicted box (the reported number), ``acc@mean`` the coordinate-wise mean of all
    predicted boxes, ``acc@upper_bound`` any predicted box. Each is ``100 * hits / #GT samples`` (of the group),
    so missing predictions stay in the denominator.

    Returns ``{"acc@1", "acc@mean", "acc@upper_bound", "num_samples", "num_missing_predictions"}`` plus
    ``"per_group": {group: {"acc@1", "acc@mean", "acc@upper_bound", "num_samples"}}`` when ``groups`` is given.
    """
    if gt_format not in ("xyxy", "xywh"):
        raise ValueError(f"gt_format must be 'xyxy' or 'xywh', got {gt_format!r}")
    if not ground_truth:
        raise ValueError("rec_accuracy needs at least one ground-truth sample")
    _check_known_ids(predictions, ground_truth, "ground-truth box")
    if groups is not None:
        ungrouped = [sid for sid in ground_truth if sid not in groups]
        if ungrouped:
            raise ValueError(f"{len(ungrouped)} ground-truth ids have no group: {preview_ids(ungrouped)}")
    names = ("acc@1", "acc@mean", "acc@upper_bound")
    counts: Dict[Optional[str], List] = {}  # group (None = all) -> [num_samples, hits per variant]
    missing = 0
    for sid, gt in ground_truth.items():
        gt_box = _boxes_array(gt, f"GT box of {sid!r}")
        if gt_box.ndim != 1:
            raise ValueError(f"GT of {sid!r} must be a single box, got shape {gt_box.shape}")
        if gt_format == "xywh":
            gt_box = xywh_to_xyxy(gt_box)
        pred = _predicted_boxes(predictions.get(sid), f"predicted boxes of {sid!r}")
        if len(pred) == 0:
            missing += 1
            hit = np.zeros(3, dtype=np.int64)
        else:
            ious = box_iou(pred, gt_box[None])[:, 0]  # K
            mean_iou = box_iou(pred.mean(axis=0), gt_box)
            hit = np.array(
                [ious[0] >= iou_threshold, mean_iou >= iou_threshold, ious.max() >= iou_threshold], dtype=np.int64
            )
        for key in [None] if groups is None else [None, groups[sid]]:
            entry = counts.setdefault(key, [0, np.zeros(3, dtype=np.int64)])
            entry[0] += 1
            entry[1] += hit

    def summary(n: int, h: np.ndarray) -> Dict[str, Any]:
        return {**{name: float(100.0 * v / n) for name, v in zip(names, h)}, "num_samples": n}

    out = summary(*counts.pop(None))
    out["num_missing_predictions"] = missing
    if groups is not None:
        out["per_group"] = {g: summary(n, h) for g, (n, h) in sorted(counts.items())}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (the coco-caption protocol, through pycocoevalcap)
# ---------------------------------------------------------------------------------------------------------------------

# Tokens the coco-caption PTB wrapper drops after Stanford PTB tokenisation (quotes, sentence and clause
# punctuation, dashes, ellipses). Its list also names -LRB- -RRB- -LCB- -RCB-, but PTB runs with -lowerCase and
# prints them as -lrb- ..., so the case-sensitive check never drops brackets: they stay as tokens.
_PTB_DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Characters peeled off the start and end of a word: brackets become their PTB names, the others are dropped.
_EDGE_PUNCT = frozenset(".,?!:;\"'`") | frozenset(_PTB_BRACKETS)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def simple_caption_tokenize(text: str) -> List[str]:
    """A Java-free stand-in for coco-caption's tokenisation (Stanford PTBTokenizer 3.4.1 ``-lowerCase``, then
    dropping the tokens ``'' ' `` ` . ? ! , : - -- ... ;``).

    Lower-cases; splits on whitespace; peels punctuation off both ends of each word, keeping brackets as PTB's
    lower-cased names (``(`` -> ``-lrb-``, ``]`` -> ``-rsb-``; the official pipeline keeps them too) and dropping
    the rest; splits the English clitics as PTB does (``don't`` -> ``do n't``, ``can't`` -> ``ca n't``,
    ``man's`` -> ``man 's``); drops pure-punctuation words (``-``, ``--``, ``...``). Word-internal punctuation
    stays (``black-and-white``, ``3.5``, ``o'clock``), as with PTB.
    An approximation: PTB also splits off symbols such as ``$`` and ``%`` and knows abbreviations, so scores can
    differ slightly from the official ones; results therefore name the tokenizer used.
    """
    tokens: List[str] = []
    for word in text.lower().split():
        begin, end = 0, len(word)
        while begin < end and word[begin] in _EDGE_PUNCT:
            begin += 1
        while end > begin and word[end - 1] in _EDGE_PUNCT:
            end -= 1
        core = word[begin:end]
        lead = [_PTB_BRACKETS[c] for c in word[:begin] if c in _PTB_BRACKETS]
        trail = [_PTB_BRACKETS[c] for c in word[end:] if c in _PTB_BRACKETS]
        if core and not all(c in "-." for c in core):
            match = _CLITIC.match(core)
            middle = [match.group(1), match.group(2)] if match else [core]
        else:
            middle = []  # pure punctuation: "-", "--", "..."
        tokens.extend(t for t in lead + middle + trail if t not in _PTB_DROPPED)
    return tokens


def _ptb_tokenize(captions: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """coco-caption's PTBTokenizer (Java) on ``{id: [caption, ...]}``; the result must keep every caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one caption per line: any run of whitespace (newlines included) becomes one space
    flat = {key: [{"caption": " ".join(c.split())} for c in caps] for key, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(flat)
    if any(len(tokenized.get(key, [])) != len(caps) for key, caps in captions.items()):
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
    return tokenized


def _tokenize_captions(captions: Dict[str, List[str]], tokenizer: str) -> Dict[str, List[str]]:
    if tokenizer == "ptb":
        return _ptb_tokenize(captions)
    return {key: [" ".join(simple_caption_tokenize(c)) for c in caps] for key, caps in captions.items()}


def _meteor(gts: Dict[str, List[str]], res: Dict[str, List[str]]) -> Optional[float]:
    """Corpus METEOR 1.5 (coco-caption's Java wrapper) or ``None`` with a warning when it cannot run."""
    if shutil.which("java") is None:
        logger.warning("METEOR needs Java, which is not on PATH: METEOR is not reported")
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        score, _ = Meteor().compute_score(gts, res)
        return float(score)
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("METEOR failed (%s: %s): METEOR is not reported", type(err).__name__, err)
        return None


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenizer: str = "auto",
    meteor: bool = True,
) -> Dict[str, Any]:
    """Corpus captioning metrics as coco-caption (``pycocoevalcap``) computes them, in percent.

    ``predictions``: ``{id: caption}``, one generated caption per image; ``references``: ``{id: [caption, ...]}``.
    Scored over the predicted ids (as coco-caption scores the images of the result file); a predicted id absent
    from ``references`` raises ``ValueError``, reference ids without a prediction are only counted
    (``num_unpredicted``) and logged.

    Tokenisation: ``"ptb"`` = coco-caption's Stanford PTBTokenizer (Java); ``"simple"`` =
    :func:`simple_caption_tokenize`; ``"auto"`` = PTB when ``java`` is on PATH, else simple with a warning (also
    when PTB fails). Scores: ``BLEU-1..4`` (closest reference length, corpus level), ``ROUGE-L`` (LCS F-measure,
    beta 1.2, averaged over images), ``CIDEr`` = CIDEr-D (n = 4, sigma = 6, clipped counts, x10; document
    frequencies from the references of the scored images, so it needs more than one image to be informative),
    ``METEOR`` 1.5 (Java; the key is absent, with a warning, when Java is missing, METEOR fails or
    ``meteor=False``; never a made-up value). Each value is the coco-caption number x 100 (papers' scale: CIDEr
    1.23 -> 123.0).

    Returns those scores plus ``num_images``, ``num_unpredicted`` and ``tokenizer`` (the one used).
    """
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    _check_known_ids(predictions, references, "reference captions")
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError("caption metrics need pycocoevalcap (scripts/install.sh pins it)") from err

    keys = list(predictions)
    # string keys: coco-caption's scorers and the PTB wrapper only need hashable, but one type keeps ids like 1
    # and "1" from silently becoming one image
    gts_raw: Dict[str, List[str]] = {}
    res_raw: Dict[str, List[str]] = {}
    for i, key in enumerate(keys):
        refs, pred = references[key], predictions[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of {key!r} must be a non-empty list of strings, got {refs!r}")
        if not isinstance(pred, str):
            raise ValueError(f"prediction of {key!r} must be a string, got {pred!r}")
        gts_raw[str(i)], res_raw[str(i)] = list(refs), [pred]

    used = tokenizer
    if tokenizer == "auto":
        used = "ptb" if shutil.which("java") else "simple"
        if used == "simple":
            logger.warning("Java is not on PATH: captions are tokenized with simple_caption_tokenize, not PTB")
    if used == "ptb":
        try:
            gts, res = _tokenize_captions(gts_raw, "ptb"), _tokenize_captions(res_raw, "ptb")
        except (OSError, RuntimeError) as err:
            if tokenizer == "ptb":
                raise
            logger.warning(
                "PTBTokenizer failed (%s: %s); falling back to simple_caption_tokenize", type(err).__name__, err
            )
            used = "simple"
    if used == "simple":
        gts, res = _tokenize_captions(gts_raw, "simple"), _tokenize_captions(res_raw, "simple")

    out: Dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = float(100.0 * value)
    if meteor:
        value = _meteor(gts, res)
        if value is not None:
            out["METEOR"] = 100.0 * value
    out["ROUGE-L"] = float(100.0 * Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(100.0 * Cider().compute_score(gts, res)[0])
    unpredicted = sum(1 for key in references if key not in predictions)
    if unpredicted:
        logger.warning("%d of %d reference images have no prediction and are not scored", unpredicted, len(references))
    out.update(num_images=len(keys), num_unpredicted=unpredicted, tokenizer=used)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy: the official VQAv2 evaluation rule (GT-Vision-Lab VQA API, vqaEval.py)
# ---------------------------------------------------------------------------------------------------------------------

_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset(["a", "an", "the"])
# The official contraction map restores apostrophes: each written form below is reached from every spelling
# with exactly one of its apostrophes missing ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've",
# but not "couldntve"). Only lower-case keys are listed: the official "Im", "Ive", "Id've", "I'dve" are never
# reached because words are lower-cased first, and its identity entries "let's", "she's" change nothing.
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_map() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for written in _VQA_CONTRACTED:
        positions = [i for i, c in enumerate(written) if c == "'"]
        for i in positions:
            table[written[:i] + written[i + 1 :]] = written
    table["somebody'd"] = "somebodyd"  # sic: the official table maps this one the wrong way round
    return table


_VQA_CONTRACTIONS = _contraction_map()
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)


def _vqa_punctuation(text: str) -> str:
    out = text
    strip_all = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _VQA_PUNCT:
        # decided on the input text: next to a space (or with a digit,digit anywhere) the mark vanishes,
        # inside a word it becomes a space ("black/white" -> "black white", "1,000" -> "1000")
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=32)  # official: re.UNICODE (= 32) lands in sub's count argument


def _vqa_digits_articles(text: str) -> str:
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer processing: punctuation, then number words / articles / contractions.

    1. Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space in
       the text (or when the text holds digit,digit anywhere), otherwise replaced by a space; then every period
       not followed by a digit is deleted (at most 32, as the official call does).
    2. Lower-case, split on whitespace, number words ``none/zero..ten`` -> ``0..10``, drop ``a an the``,
       restore apostrophes of contractions (``dont`` -> ``don't``), join with single spaces.

    ``"Two"`` -> ``"2"``, ``"a dog."`` -> ``"dog"``, ``"1,000"`` -> ``"1000"``, ``"3.5"`` -> ``"3.5"``.
    """
    return _vqa_digits_articles(_vqa_punctuation(answer))


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, answers: Sequence[str], normalize_always: bool = False) -> float:
    """Official VQA accuracy of one answer, in [0, 1].

    With ``n`` human answers (10 in VQAv2): ``acc = mean_i min(1, #{j != i : answers[j] == pred} / 3)``, the
    average of ``min(#humans that said it / 3, 1)`` over the ``n`` leave-one-out subsets of ``n - 1`` humans.
    If ``m`` of 10 humans gave the answer: m = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0.

    Strings are compared exactly after removing newlines / tabs and outer spaces. As in the official code, the
    prediction and the answers are passed through :func:`normalize_vqa_answer` **only when the humans disagree**
    (more than one distinct answer): against ten times ``"2"``, ``"two"`` scores 0. ``normalize_always=True``
    normalises in every case (not the official rule).
    """
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError(f"need a list of at least 2 human answers, got {answers!r}")
    pred = _vqa_clean(prediction)
    gts = [_vqa_clean(a) for a in answers]
    if normalize_always or len(set(gts)) > 1:
        pred = normalize_vqa_answer(pred)
        gts = [normalize_vqa_answer(a) for a in gts]
    same = sum(g == pred for g in gts)
    # leaving out a matching human leaves same - 1 matches, leaving out another one leaves same
    return float(sum(min(1.0, (same - (g == pred)) / 3.0) for g in gts) / len(gts))


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    annotations: Mapping[Hashable, Sequence[str]],
    answer_types: Optional[Mapping[Hashable, str]] = None,
    question_types: Optional[Mapping[Hashable, str]] = None,
    normalize_always: bool = False,
) -> Dict[str, Any]:
    """Official VQAv2 accuracy in percent (:func:`vqa_question_accuracy` averaged over questions).

    ``predictions``: ``{question_id: answer}``; ``annotations``: ``{question_id: [the 10 human answers]}``;
    ``answer_types`` / ``question_types`` (optional): ``{question_id: "yes/no" | "number" | "other"}`` and the
    question-type strings of the annotation file. Every annotated question is scored; one without a prediction
    scores 0 (counted in ``num_missing_predictions`` and logged). A predicted id that is not annotated raises
    ``ValueError``. Values are not rounded (the official script rounds to 2 decimals).

    Returns ``{"accuracy", "num_questions", "num_missing_predictions"}`` plus ``"per_answer_type"`` and
    ``"per_question_type"`` (``{type: accuracy}``) for the type maps that are given.
    """
    if not annotations:
        raise ValueError("vqa_accuracy needs at least one annotated question")
    _check_known_ids(predictions, annotations, "annotation")
    scores: Dict[Hashable, float] = {}
    missing = 0
    for qid, answers in annotations.items():
        pred = predictions.get(qid)
        if pred is None:
            missing += 1
            scores[qid] = 0.0
            continue
        if not isinstance(pred, str):
            raise ValueError(f"answer of question {qid!r} must be a string, got {pred!r}")
        scores[qid] = vqa_question_accuracy(pred, answers, normalize_always)
    if missing:
        logger.warning("%d of %d questions have no prediction; they score 0", missing, len(annotations))
    out: Dict[str, Any] = {
        "accuracy": float(100.0 * np.mean(list(scores.values()))),
        "num_questions": len(scores),
        "num_missing_predictions": missing,
    }
    for name, types in (("per_answer_type", answer_types), ("per_question_type", question_types)):
        if types is None:
            continue
        untyped = [qid for qid in scores if qid not in types]
        if untyped:
            raise ValueError(f"{len(untyped)} questions have no entry in {name}: {preview_ids(untyped)}")
        by_type: Dict[str, List[float]] = {}
        for qid, score in scores.items():
            by_type.setdefault(types[qid], []).append(score)
        out[name] = {t: float(100.0 * np.mean(v)) for t, v in sorted(by_type.items())}
    return out
