"""Pure metric functions for image-text retrieval and zero-shot classification.

Tensors or arrays in, plain floats / dicts (or a weight matrix) out; no files, no model, no global state.

One ranking convention is used everywhere (retrieval ranks, top-k accuracy, per-class accuracy):

    rank(gt) = #{ items whose score is strictly greater than the score of gt }      (0-based)

A tie with the ground truth therefore never pushes it down: tied items are not counted. The rank depends only on
the scores, never on the order in which the items are stored, so it is deterministic and invariant to permuting
the gallery. (A sort-based rank, ``argsort(-scores).index(gt)``, would instead break ties by storage order.)
With this convention, ``top-k correct <=> rank < k``; for distinct scores it equals the usual sort-based rank.

Protocols follow CLIP / OpenCLIP and the COSMOS / COSA evaluation code (reference notes, contrastive.md 1.8,
3.6; cosa.md 6.1): i2t ranks an image by its best-ranked caption, t2i ranks a caption's single GT image; mean and
median ranks are reported 1-based (rank + 1), the median being the lower median as ``torch.median`` returns it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

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

    With ``g(j) = text_to_image[j]`` and ``T(i) = {j : g(j) = i}``:

    - text->image:  ``t2i[j] = #{ i' : sim[i', j] > sim[g(j), j] }``
    - image->text:  ``i2t[i] = min_{j in T(i)} #{ j' : sim[i, j'] > sim[i, j] }
      = #{ j' : sim[i, j'] > max_{j in T(i)} sim[i, j] }``

    (the rank of an image is the best rank over its GT captions; the two forms agree because the rank is
    non-increasing in the score).

    Ties: only items with a strictly greater score count, so an item tied with the GT is not placed above it.
    The result does not depend on the storage order of images or texts.

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

    t2i = torch.zeros(n_txt, dtype=torch.long)
    i2t = torch.empty(n_img, dtype=torch.long)
    for r0 in range(0, n_img, _CHUNK_ROWS):
        block = s[r0:r0 + _CHUNK_ROWS]  # R x N_txt
        t2i += (block > gt_score[None, :]).sum(0)
        i2t[r0:r0 + _CHUNK_ROWS] = (block > best_gt[r0:r0 + _CHUNK_ROWS, None]).sum(1)
    return i2t.numpy(), t2i.numpy()


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
    """0-based rank of the true class in each row: ``#{c : logits[n, c] > logits[n, y_n]}``; and the labels."""
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
    return (z > true).sum(1), y


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent: ``top{k} = 100 * mean_n [ #{c : z[n, c] > z[n, y_n]} < k ]``.

    ``logits`` is N x C, ``labels`` N class indices. A class tied with the true class does not push it out of the
    top k (module ranking convention); for k >= C every sample counts as correct.
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
def zeroshot_classifier(encode_texts: Callable[[List[str]], torch.Tensor], classnames: Sequence[ClassName],
                        templates: Sequence[str]) -> torch.Tensor:
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
