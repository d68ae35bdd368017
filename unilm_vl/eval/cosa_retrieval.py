"""COSA text<->video retrieval: ITC scores, then ITM re-ranking of each text's top-k videos (TXH-mercury/COSA).

Protocol (``test.py:159-357`` of the release):

1. Every video of the annotation (test-mode clips, ``--num-frames`` middle frames) and every text (a ``desc``
   list gives several texts of one video) is encoded; ``S_itc = text_features @ video_features^T``
   (N_txt x N_vid, cosine, no temperature).
2. ITM re-rank: for each text its top-``k`` videos by ``S_itc`` (``--itm-k``, 50 as released) are scored by the
   fused encoder, ``S_itm[t, v] = P(match)``; in the release every other entry is exactly **0** and ITC scores are
   not added (:func:`itm_rerank` builds that matrix). ``P(match) = softmax(itm_head)[1]``; a model returning one
   match logit ``l`` gives ``sigmoid(l)``, the same number when ``l`` is the difference of the two logits.
3. Metrics of each score matrix, both directions: text->video ranks a text's video, video->text ranks a video by
   its best-ranked text; R@1/5/10, mean and median rank (1-based, lower median) from
   :func:`unilm_vl.eval.metrics.retrieval_ranks`; plus the release's keys ``video_r1``, ``video_recall``
   ("R1/R5/R10"), ``video_ravg`` (text->video, the release's "video" = the retrieved side) and ``txt_*``
   (video->text), x100 and rounded to 1 decimal.

Ranking after re-ranking (deviations, both only change what the release leaves to chance): the entries outside a
text's top-k are all 0 in the released matrix, so their order is arbitrary (the release sorts). Here they rank
below every re-ranked entry in ITC order (key ``sigmoid(S_itc) - 2 < 0``): R@k for k <= ``--itm-k`` is the
release's, and mean / median ranks stay meaningful. Video->text uses each video's own top-``k`` texts by ITC (the
ALBEF / BLIP protocol); the release reuses the text->video matrix, whose column for a video that is in no text's
top-k is all zeros, which ranks its ground truth first by tie (an untrained model then scores ~80% video->text
R@1 on the synthetic clips). With ``k >= N`` the ITM scores alone rank, in both directions.

Ties count against the ground truth (:mod:`unilm_vl.eval.metrics`): every video (text) scoring the same as the
ground truth ranks above it, so a model with constant scores gets R@1 = 0 both ways, never more than chance.
Where they can occur here:

- ITC scores: cosines of different items tie only when embeddings coincide (a collapsed model, duplicate texts).
- ITM re-ranking: P(match) is computed in float64 (``itm_probability``), which saturates to 1 only beyond a
  log-odds of ~37 (float32: ~17), so confident matches stay ordered instead of tying at 1.0; the ranking key
  (:func:`rerank_key`) is float64 too.
- Entries outside the top-k never tie with re-ranked ones (they sit in (-2, -1), below every P(match)).
- Which videos enter a text's top-k when several tie at the k-th ITC score is ``torch.topk``'s choice; a video
  left out ranks below every re-ranked one, so this can only lower a ground truth, except with ``--itm-k 1``
  on tied ITC scores, where the single re-ranked entry is rank 0 if it happens to be the ground truth.

Videos are encoded twice when their tokens do not fit ``--token-cache-gb`` (the second pass feeds ITM).

CLI::

    python -m unilm_vl.eval.cosa_retrieval --checkpoint CKPT --data videos/test.json [--frames-root DIR]
        [--num-frames 16] [--itm-k 50] [--no-itm] [--batch-size 16] [--device cpu] [--output out.json]
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from unilm_vl.cli import progress
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
    tokenize,
)
from unilm_vl.eval.metrics import recall_at_k
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- pure parts
def topk_pairs(sim: torch.Tensor, k: int) -> torch.Tensor:
    """``P x 2`` (text, video) index pairs of each text's top-``min(k, N_vid)`` videos of ``sim`` (N_txt x N_vid)."""
    if k <= 0:
        raise ValueError(f"itm k must be positive, got {k}")
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # N_txt x k
    texts = torch.arange(sim.shape[0]).repeat_interleave(k)  # N_txt*k
    return torch.stack([texts, top.reshape(-1)], dim=1)  # P x 2


def itm_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(match) of ITM outputs in float64: ``softmax(.)[:, 1]`` of B x 2 logits, ``sigmoid`` of B match logits.
    float64, so that two confident matches do not both round to 1.0 and tie (module docstring)."""
    if logits.dim() == 2 and logits.shape[1] == 2:
        return logits.double().softmax(dim=1)[:, 1]
    return logits.double().reshape(-1).sigmoid()


def scatter_scores(shape: Sequence[int], pairs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """A zero matrix of ``shape`` (dtype of ``scores``) holding ``scores[p]`` at ``pairs[p]`` (the re-ranked
    matrix)."""
    out = torch.zeros(tuple(shape), dtype=scores.dtype)
    out[pairs[:, 0], pairs[:, 1]] = scores
    return out


def itm_rerank(
    sim: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The re-ranked matrix: ``score_pairs(text_idx, video_idx) -> P(match)`` on each text's ITC top-k, 0
    elsewhere (in-memory form of what :func:`evaluate_cosa_retrieval` does video batch by video batch)."""
    pairs = topk_pairs(sim, k)
    return scatter_scores(sim.shape, pairs, score_pairs(pairs[:, 0], pairs[:, 1]))


def rerank_key(sim: torch.Tensor, itm: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Ranking key after re-ranking, float64: ``P(match)`` (in (0, 1)) inside the top-k, ``sigmoid(S_itc) - 2``
    (in (-2, -1), ITC order) outside (module docstring)."""
    return torch.where(inside, itm.double(), sim.double().sigmoid() - 2)


def _released_keys(prefix: str, ranks) -> Dict[str, Any]:
    r = recall_at_k(ranks)
    r1, r5, r10 = (round(r[f"R@{k}"], 1) for k in (1, 5, 10))
    return {
        f"{prefix}_r1": r1,
        f"{prefix}_recall": f"{r1}/{r5}/{r10}",
        f"{prefix}_ravg": round((r["R@1"] + r["R@5"] + r["R@10"]) / 3, 1),
    }


def cosa_retrieval_metrics(
    sim_t2v: torch.Tensor, text_to_video: Sequence[int], sim_v2t: Optional[torch.Tensor] = None
) -> Dict[str, Any]:
    """Metrics of text x video score matrices (module docstring): ``t2v_*`` ranks from ``sim_t2v``, ``v2t_*``
    ranks from ``sim_v2t`` (default: the same matrix); keys ``R@1/5/10``, ``mean_rank``, ``median_rank``, ``rsum``
    and the release's ``video_*`` (text->video) / ``txt_*`` (video->text)."""
    from unilm_vl.eval.metrics import mean_rank, median_rank, retrieval_ranks

    sim_t2v = torch.as_tensor(sim_t2v)
    _, t2v = retrieval_ranks(sim_t2v.T, text_to_video)  # the metrics module's image x text layout
    v2t, _ = retrieval_ranks((sim_t2v if sim_v2t is None else torch.as_tensor(sim_v2t)).T, text_to_video)
    out: Dict[str, Any] = {}
    for name, ranks in (("v2t", v2t), ("t2v", t2v)):
        out.update({f"{name}_{key}": value for key, value in recall_at_k(ranks).items()})
        out[f"{name}_mean_rank"] = mean_rank(ranks)
        out[f"{name}_median_rank"] = median_rank(ranks)
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("v2t", "t2v") for k in (1, 5, 10)))
    out.update(_released_keys("video", t2v))
    out.update(_released_keys("txt", v2t))
    return out


# ----------------------------------------------------------------------------------------------- runner
@torch.no_grad()
def evaluate_cosa_retrieval(
    model: CosaEvalModel,
    tokenizer,
    transform: Callable,
    eval_set: CosaEvalSet,
    frames_root: str,
    num_frames: int,
    max_text_tokens: int,
    itm_k: Optional[int] = 50,
    batch_size: int = 16,
    itm_batch_size: int = 25,
    device: Optional[str] = None,
    workers: int = 0,
    token_cache_gb: float = 2.0,
) -> Dict[str, Any]:
    """``{"itc": metrics, "itm": metrics, "itm_pairs": fused pairs (both absent when itm_k is None), "num_videos",
    "num_texts", "itm_k"}``."""
    if not eval_set.texts:
        raise ValueError("the evaluation set has no texts (desc/caption) to retrieve with")
    ids, mask = tokenize(tokenizer, eval_set.texts, max_text_tokens)  # N_txt x L
    text_feats = torch.cat(
        [
            model.encode_text(
                maybe_device(ids[i : i + batch_size], device), maybe_device(mask[i : i + batch_size], device)
            )["text_features"]
            .float()
            .cpu()
            for i in progress(range(0, len(ids), batch_size), "encoding texts")
        ]
    )  # N_txt x D
    video_feats: List[torch.Tensor] = []
    cached: Optional[List[torch.Tensor]] = [] if itm_k is not None else None
    cached_bytes = 0
    for _, frames in clip_batches(frames_root, eval_set.video_ids, num_frames, transform, batch_size, workers):
        out = model.encode_video(maybe_device(frames, device))
        video_feats.append(out["video_features"].float().cpu())  # B x D
        if cached is not None:
            cached_bytes += out["video_tokens"].numel() * out["video_tokens"].element_size()
            if cached_bytes > token_cache_gb * 2**30:
                logger.info(
                    "video tokens exceed --token-cache-gb %.1f: videos are encoded again for ITM", token_cache_gb
                )
                cached = None
            else:
                cached.append(out["video_tokens"])  # B x N x W
    sim = text_feats @ torch.cat(video_feats).T  # N_txt x N_vid
    metrics: Dict[str, Any] = {
        "itc": cosa_retrieval_metrics(sim, eval_set.text_to_video),
        "num_videos": len(eval_set.video_ids),
        "num_texts": len(eval_set.texts),
        "itm_k": itm_k,
    }
    if itm_k is None:
        return metrics

    t2v_pairs = topk_pairs(sim, itm_k)  # each text's top-k videos (the release)
    v2t_pairs = topk_pairs(sim.T, itm_k).flip(1)  # each video's top-k texts, as (text, video)
    inside_t2v = scatter_scores(sim.shape, t2v_pairs, torch.ones(len(t2v_pairs))).bool()
    inside_v2t = scatter_scores(sim.shape, v2t_pairs, torch.ones(len(v2t_pairs))).bool()
    pairs = (inside_t2v | inside_v2t).nonzero()  # P x 2, each pair scored once
    probs = torch.zeros(len(pairs), dtype=torch.float64)
    batches = (
        enumerate_cached(cached)
        if cached is not None
        else (
            (start, model.encode_video(maybe_device(frames, device))["video_tokens"])
            for start, frames in clip_batches(
                frames_root, eval_set.video_ids, num_frames, transform, batch_size, workers
            )
        )
    )
    total = len(cached) if cached is not None else None
    for start, tokens in progress(batches, "ITM re-ranking", total=total):  # b x N x W: videos start..start+b
        in_batch = ((pairs[:, 1] >= start) & (pairs[:, 1] < start + tokens.shape[0])).nonzero().flatten()
        for chunk in in_batch.split(itm_batch_size):
            text_idx, video_idx = pairs[chunk, 0], pairs[chunk, 1] - start
            logits = model.itm_logits(
                tokens[video_idx], maybe_device(ids[text_idx], device), maybe_device(mask[text_idx], device)
            )
            probs[chunk] = itm_probability(logits).cpu()
    itm = scatter_scores(sim.shape, pairs, probs)  # N_txt x N_vid
    metrics["itm"] = cosa_retrieval_metrics(
        rerank_key(sim, itm, inside_t2v), eval_set.text_to_video, rerank_key(sim, itm, inside_v2t)
    )
    metrics["itm_pairs"] = len(pairs)
    return metrics


def enumerate_cached(cached: List[torch.Tensor]):
    start = 0
    for tokens in cached:
        yield start, tokens
        start += tokens.shape[0]


def format_table(metrics: Dict[str, Any]) -> str:
    lines = [f"{'scores':<6}{'direction':<13}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medR':>7}{'meanR':>8}"]
    for name in ("itc", "itm"):
        if name not in metrics:
            continue
        m = metrics[name]
        for d, label in (("t2v", "text->video"), ("v2t", "video->text")):
            lines.append(
                f"{name:<6}{label:<13}{m[f'{d}_R@1']:>8.1f}{m[f'{d}_R@5']:>8.1f}{m[f'{d}_R@10']:>8.1f}"
                f"{m[f'{d}_median_rank']:>7.1f}{m[f'{d}_mean_rank']:>8.2f}"
            )
    lines.append(f"({metrics['num_videos']} videos, {metrics['num_texts']} texts, ITM top-k {metrics['itm_k']})")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COSA text<->video retrieval (ITC, then ITM re-ranking).")
    add_cosa_eval_args(parser)
    parser.add_argument("--itm-k", type=int, default=50, help="videos re-ranked by ITM per text (released: 50)")
    parser.add_argument("--no-itm", action="store_true", help="ITC scores only")
    parser.add_argument("--itm-batch-size", type=int, default=25, help="(text, video) pairs per ITM forward")
    parser.add_argument(
        "--token-cache-gb",
        type=float,
        default=2.0,
        help="keep video tokens for ITM up to this size, else encode the videos again",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = get_parser().parse_args(argv)
    setup_cli_logging()
    model, task = load_cosa(args.checkpoint, args.device)
    eval_set = load_eval_set(args.data)
    metrics = evaluate_cosa_retrieval(
        model,
        task.tokenizer,
        task.clip_transform(train=False),
        eval_set,
        frames_root_of(args),
        num_frames_of(args, task),
        task.cfg.max_text_tokens,
        None if args.no_itm else args.itm_k,
        args.batch_size,
        args.itm_batch_size,
        args.device,
        args.workers,
        args.token_cache_gb,
    )
    logger.info("retrieval metrics: %s\n%s", round_floats(metrics), format_table(metrics))
    write_metrics(metrics, args.output)
    return metrics


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
