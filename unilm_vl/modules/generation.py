"""Autoregressive search for prompt-conditioned LMs such as :class:`unilm_vl.modules.kosmos2.Kosmos2Module`:
greedy, beam search and sampling with a KV cache, in plain PyTorch (no fairseq import).

The model contract (what :class:`~unilm_vl.modules.kosmos2.Kosmos2Module` provides)::

    model(src_tokens B x T, image, image_mask B x T, incremental_state=dict, last_only=bool)
        -> {"lm_logits": B x T' x V}   (T' = 1 with last_only: only the last position's logits)
    model.reorder_incremental_state(incremental_state, new_order)       # index_select of the cache rows

``generate`` puts ``incremental_state["max_new_tokens"]`` (the most steps the search may run after the prompt) in
the dict before the first call, so that a model can size a preallocated cache; a model may ignore it. Reorders
that would keep every row in place (greedy decoding while no row has finished) are skipped.

The caller's ``incremental_state`` dict starts empty; every call passes the FULL token prefix. The first call runs
the whole prompt (image features spliced in; this is the only call that sees the image) and returns logits for
every prompt position (only the last one with ``last_only``); later calls run only the last token and return
B x 1 x V.

Flow of :func:`generate` (B prompts, beam k)::

    prompts, LEFT-padded (B x T)  --one forward with the image-->  next-token log-probs (B x V)
      -> rows expanded to B*k by reordering the cache (the prompt runs once per input, not once per beam)
      -> per step: bans (pad, min_len, max_len, unk penalty, no-repeat n-grams) -> choose tokens
         (beam search: best 2k of k x V per input, fairseq's rule; sampling: one draw per row) ->
         finished rows leave the batch (cache reordered to the surviving rows) -> forward the last token only
      -> per input: the hypotheses sorted by score, ``nbest`` kept

Left padding keeps every prompt's last token in the last column, so all rows step together; the model masks the
pads (positions count real tokens only), so a batched prompt decodes like the same prompt alone. Prompt tokens are
forced (they are the prefix, never predicted) and the image is only seen by the first forward.

Scores follow fairseq's ``SequenceGenerator``: log-probs of ``log_softmax(logits / temperature)``; a hypothesis'
score is ``sum(positional scores) / len ** lenpen`` with ``len`` the generated tokens including ``</s>``; beam
candidates are ranked by the unnormalised sum. ``no_repeat_ngram_size`` looks at the whole history, prompt
included (as the Kosmos-2 release does), so with n = 3 a trigram such as ``</phrase> <object> <patch_index_X>``
can never occur twice in one output.

How the search ends and which finished hypotheses it returns (``SearchConfig.beam_rule``). Both rules take, at
each step and for each input, the best ``2k`` of its ``rows x V`` extensions by cumulative log-prob; a ``</s>``
among the first ``k`` finishes with score ``sum / len ** lenpen``, the first ``k`` others continue. They differ
at the length limit (the token after ``max_len`` generated ones) and in when an input stops:

- ``"fairseq"`` (default; fairseq's ``SequenceGenerator``, which the Kosmos-2 release decodes with): at the length
  limit every live row is forced to ``</s>``, and that ``</s>`` is scored like any token (its log-prob is in the
  sum, it counts in ``len``); an input stops as soon as it holds ``k`` finished hypotheses, which are returned
  best first.
- ``"hf"`` (HF transformers' ``generate(num_beams=k)`` with its default ``early_stopping=False``, v4.50+): at the
  length limit nothing is forced: the first ``k`` extensions finish as they are (a hypothesis may then end
  without ``</s>``, scored over the tokens it has); the input keeps the best ``k`` finished hypotheses seen so far
  and keeps searching until all ``k`` are filled and its best live row's ``sum / step ** lenpen`` no longer
  beats the worst of them (HF's heuristic). The same weights then give HF's hypotheses in HF's order. HF's
  ``max_new_tokens`` counts the last token, so it equals ``max_len + 1`` here. At beam 1 (greedy, sampling)
  the rule only changes the length limit: the last token is the model's choice, not ``</s>``.

The two rules return different hypotheses, or the same ones in another order, when beams reach the length
limit: there fairseq adds ``log p(</s>)`` to them while HF ranks them by what they have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

BEAM_RULES = ("fairseq", "hf")
"""Values of :attr:`SearchConfig.beam_rule`."""


@dataclass
class SearchConfig:
    """Decoding options; names and meanings follow fairseq's generation flags."""

    beam: int = 1
    """Beam size (1 = greedy). With ``sampling``: the number of independent samples per input."""
    nbest: int = 1
    """Hypotheses returned per input (at most ``beam``)."""
    max_len_a: float = 0.0
    """Generate at most ``max_len_a * prompt_len + max_len_b`` tokens after the prompt, then ``</s>`` is forced."""
    max_len_b: int = 200
    """See ``max_len_a``. Unlike the Kosmos-2 release, the prompt does not count towards this budget."""
    min_len: int = 1
    """``</s>`` is banned while fewer than ``min_len`` tokens have been generated."""
    lenpen: float = 1.0
    """Length penalty: final score = sum of log-probs / len ** lenpen (0 = unnormalised)."""
    unkpen: float = 0.0
    """Subtracted from the log-prob of ``<unk>`` (needs ``unk_idx``)."""
    sampling: bool = False
    """Sample instead of beam search."""
    sampling_topk: int = -1
    """Sample from the k most likely tokens only (-1: all)."""
    sampling_topp: float = -1.0
    """Sample from the smallest set of tokens whose probability reaches p (-1: all)."""
    temperature: float = 1.0
    """Logits are divided by this before the log-softmax (beam search and sampling alike)."""
    no_repeat_ngram_size: int = 0
    """Ban any token that would repeat an n-gram of the history (prompt included); 0 = off."""
    beam_rule: str = "fairseq"
    """How the search ends and ranks its finished hypotheses: ``"fairseq"`` (``</s>`` forced and scored at the
    length limit; an input stops at ``beam`` finished hypotheses) or ``"hf"`` (HF transformers' beam search); see
    the module docstring."""

    def __post_init__(self):
        if self.beam < 1 or not 1 <= self.nbest <= self.beam:
            raise ValueError(f"need beam >= 1 and 1 <= nbest <= beam, got beam={self.beam} nbest={self.nbest}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.min_len < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("min_len and no_repeat_ngram_size must be >= 0")
        if not self.sampling and (self.sampling_topk > 0 or self.sampling_topp > 0):
            raise ValueError("sampling_topk / sampling_topp need sampling=True")
        if self.sampling_topp > 1:
            raise ValueError(f"sampling_topp must be in (0, 1], got {self.sampling_topp}")
        if self.beam_rule not in BEAM_RULES:
            raise ValueError(f"beam_rule must be one of {BEAM_RULES}, got {self.beam_rule!r}")


@dataclass
class Hypothesis:
    """One finished output."""

    tokens: torch.Tensor
    """The generated tokens after the prompt (LongTensor), ending with ``</s>`` (with ``beam_rule="hf"``, a
    hypothesis cut at the length limit ends with its last token instead)."""
    score: float
    """``positional_scores.sum() / len(tokens) ** lenpen``."""
    positional_scores: torch.Tensor
    """Log-prob of each generated token (FloatTensor, same length as ``tokens``)."""
    prompt_scores: Optional[torch.Tensor] = None
    """With ``return_prompt_scores``: log-prob of each prompt token after the first given its prefix
    (length ``prompt_len - 1``; image placeholder positions included)."""


def left_pad(
    sequences: Sequence[Sequence[int]], pad_idx: int, masks: Optional[Sequence[Sequence[bool]]] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stack token lists into a LEFT-padded B x T LongTensor (and their bool masks, False on the pads)."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_idx, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool) if masks is not None else None
    for i, seq in enumerate(sequences):
        if len(seq):
            tokens[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            if mask is not None:
                mask[i, width - len(seq) :] = torch.as_tensor(list(masks[i]), dtype=torch.bool)
    return tokens, mask


def _check_left_padded(src_tokens: torch.Tensor, pad_idx: int) -> torch.Tensor:
    pad = src_tokens.eq(pad_idx)  # B x T
    if bool((~pad[:, :-1] & pad[:, 1:]).any()):
        raise ValueError("prompts must be LEFT-padded (a pad follows a real token); use left_pad()")
    lengths = (~pad).sum(dim=1)  # B
    if bool((lengths == 0).any()):
        raise ValueError("every prompt needs at least one token (e.g. <s>)")
    return lengths


def banned_ngram_tokens(history: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens that would complete an n-gram already present in ``history`` (1-D LongTensor): the last token of
    every earlier n-gram whose first ``n - 1`` tokens equal the last ``n - 1`` tokens of ``history``."""
    if n <= 0 or history.numel() < n:
        return history.new_empty(0)
    if n == 1:
        return history.unique()
    grams = history.unfold(0, n, 1)  # G x n
    match = (grams[:, :-1] == history[-(n - 1) :]).all(dim=1)  # G
    return grams[match, -1].unique()


def repeated_ngram_targets(tokens: torch.Tensor, n: int, pad_idx: int) -> torch.Tensor:
    """:func:`banned_ngram_tokens` for every row of a LEFT-padded N x S batch at once: an N x G LongTensor holding
    each row's banned tokens, the other entries ``pad_idx`` (which the search always bans), to scatter -inf into the
    N x V log-probs. Equal to the per-row function on each row's real tokens: an n-gram window that covers a left pad
    can never equal the row's last ``n - 1`` tokens (a window further left holds more pads)."""
    if n == 1:
        return tokens  # every token of the history, pads included (pad is banned anyway)
    if tokens.size(1) < n:
        return tokens[:, :1].clone().fill_(pad_idx)
    grams = tokens.unfold(1, n, 1)  # N x G x n
    match = (grams[:, :, :-1] == tokens[:, None, -(n - 1) :]).all(dim=-1)  # N x G
    return grams[:, :, -1].masked_fill(~match, pad_idx)  # N x G


def _truncate_for_sampling(lprobs: torch.Tensor, topk: int, topp: float) -> torch.Tensor:
    """Probabilities (unnormalised) restricted to the top-k tokens and/or the top-p nucleus (fairseq's rule: the
    token that crosses p is kept)."""
    probs = lprobs.exp()  # N x V
    if topk > 0:
        kth = probs.topk(min(topk, probs.size(-1)), dim=-1).values[:, -1:]  # N x 1
        probs = probs.masked_fill(probs < kth, 0.0)
    if topp > 0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # N x V
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        drop_sorted = before >= topp * sorted_probs.sum(dim=-1, keepdim=True)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    src_tokens: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    cfg: Optional[SearchConfig] = None,
    *,
    pad_idx: int = 1,
    eos_idx: int = 2,
    unk_idx: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_prompt_scores: bool = False,
) -> List[List[Hypothesis]]:
    """Decode a continuation of each LEFT-padded prompt row of ``src_tokens`` (B x T).

    ``image``/``image_mask`` are passed to the model's first forward only (the model's contract: ``image`` holds one
    entry per row whose ``image_mask`` marks slots). ``generator`` seeds sampling (reproducible draws). Returns, per
    input, up to ``cfg.nbest`` :class:`Hypothesis` sorted by score, best first.
    """
    cfg = cfg or SearchConfig()
    prompt_lens = _check_left_padded(src_tokens, pad_idx)  # B
    bsz, device = src_tokens.size(0), src_tokens.device
    max_lens = [int(cfg.max_len_a * int(n) + cfg.max_len_b) for n in prompt_lens]

    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if cfg.temperature != 1.0:  # x / 1 == x exactly: skip a pass over N x V at the default
            logits = logits / cfg.temperature
        return F.log_softmax(logits, dim=-1)

    state: Dict[Any, Any] = {"max_new_tokens": max(max_lens) + 1}  # a size hint for preallocated caches
    # without prompt scores only the last position needs vocabulary logits (B x 1 x V)
    logits = model(src_tokens, image, image_mask, incremental_state=state, last_only=not return_prompt_scores)[
        "lm_logits"
    ]  # B x T x V or B x 1 x V
    prompt_scores: List[Optional[torch.Tensor]] = [None] * bsz
    if return_prompt_scores:
        lp = log_probs(logits[:, :-1]).gather(-1, src_tokens[:, 1:, None]).squeeze(-1)  # B x T-1
        prompt_scores = [lp[i, src_tokens.size(1) - int(prompt_lens[i]) :].cpu() for i in range(bsz)]
    lprobs = log_probs(logits[:, -1])  # B x V: the last column is every row's last prompt token

    # one row per (input, beam); the prompt ran once per input, the cache is expanded by reordering
    order = torch.arange(bsz, device=device).repeat_interleave(cfg.beam)  # B*k
    model.reorder_incremental_state(state, order)
    tokens = src_tokens.index_select(0, order)  # N x T
    lprobs = lprobs.index_select(0, order)  # N x V
    row_input: List[int] = order.tolist()
    row_score = torch.zeros(len(row_input), device=device)  # N: cumulative log-prob
    row_pos = torch.zeros(len(row_input), 0, device=device)  # N x step
    finalized: List[List[Hypothesis]] = [[] for _ in range(bsz)]

    hf_rule = cfg.beam_rule == "hf"
    taking = [True] * bsz  # "hf": the input still takes finished hypotheses (HF's early-stopping heuristic)
    step = 0
    identity = list(range(len(row_input)))  # rows kept in place: no cache reorder needed
    while row_input:
        lprobs = _apply_bans(
            lprobs, tokens, row_input, step, max_lens, cfg, pad_idx, eos_idx, unk_idx, force_eos_at_limit=not hf_rule
        )
        at_limit = {b for b in row_input if step >= max_lens[b]}  # inputs whose next token is their last
        if cfg.sampling:
            probs = _truncate_for_sampling(lprobs, cfg.sampling_topk, cfg.sampling_topp)  # N x V
            drawn = torch.multinomial(probs, 1, generator=generator)  # N x 1
            picks = _sampling_picks(drawn.squeeze(1), lprobs)
        elif cfg.beam == 1:
            picks = _greedy_picks(lprobs)
        else:
            picks = _beam_picks(lprobs, row_score, row_input, step, cfg.beam, eos_idx, at_limit)
        keep_rows, keep_tokens, keep_lp = [], [], []
        scores_now = row_score.tolist()  # one device-to-host copy per step, not one per row
        for row, token, lp in picks:
            b = row_input[row]
            score = scores_now[row] + lp
            if token == eos_idx or b in at_limit:  # fairseq: only </s> is left at the limit; hf: any token ends
                if taking[b] if hf_rule else len(finalized[b]) < cfg.beam:
                    pos = torch.cat([row_pos[row], row_pos.new_tensor([lp])]).cpu()
                    toks = torch.cat([tokens[row, src_tokens.size(1) :], tokens.new_tensor([token])]).cpu()
                    finalized[b].append(Hypothesis(toks, score / (step + 1) ** cfg.lenpen, pos, prompt_scores[b]))
                    if hf_rule:  # HF keeps the best `beam` finished hypotheses seen so far
                        finalized[b] = sorted(finalized[b], key=lambda h: -h.score)[: cfg.beam]
            else:
                keep_rows.append(row)
                keep_tokens.append(token)
                keep_lp.append(lp)
        if hf_rule:
            _update_taking(taking, finalized, keep_rows, keep_lp, row_input, scores_now, step, cfg)
            live = [i for i, row in enumerate(keep_rows) if taking[row_input[row]]]
        else:  # an input is done once it holds `beam` finished hypotheses (fairseq's stopping rule)
            live = [i for i, row in enumerate(keep_rows) if len(finalized[row_input[row]]) < cfg.beam]
        if not live:
            break
        order_list = [keep_rows[i] for i in live]
        new_tok = torch.tensor([keep_tokens[i] for i in live], device=device)  # N'
        new_lp = torch.tensor([keep_lp[i] for i in live], device=device)  # N'
        if order_list != identity[: len(row_input)]:
            new_order = torch.tensor(order_list, device=device)
            model.reorder_incremental_state(state, new_order)
            tokens, row_score, row_pos = (t.index_select(0, new_order) for t in (tokens, row_score, row_pos))
            row_input = [row_input[r] for r in order_list]
        tokens = torch.cat([tokens, new_tok[:, None]], dim=1)  # N' x T+step+1
        row_score = row_score + new_lp  # N'
        row_pos = torch.cat([row_pos, new_lp[:, None]], dim=1)  # N' x step+1
        step += 1
        lprobs = log_probs(model(tokens, incremental_state=state)["lm_logits"][:, -1])  # N' x V
    return [sorted(hyps, key=lambda h: -h.score)[: cfg.nbest] for hyps in finalized]


def _update_taking(taking, finalized, keep_rows, keep_lp, row_input, row_score, step, cfg: SearchConfig):
    """HF's early-stopping heuristic (``early_stopping=False``), after a step: an input stops taking finished
    hypotheses once it holds ``beam`` of them and its best continuing row's ``sum / (step + 1) ** lenpen`` is not
    above the worst of them, or when no row of it continues."""
    best: Dict[int, float] = {}
    for row, lp in zip(keep_rows, keep_lp):
        b = row_input[row]
        best[b] = max(best.get(b, -math.inf), row_score[row] + lp)
    for b in set(row_input):
        if not taking[b]:
            continue
        if b not in best:
            taking[b] = False
        elif len(finalized[b]) == cfg.beam:
            taking[b] = best[b] / (step + 1) ** cfg.lenpen > min(h.score for h in finalized[b])


def _apply_bans(
    lprobs,
    tokens,
    row_input,
    step,
    max_lens,
    cfg: SearchConfig,
    pad_idx,
    eos_idx,
    unk_idx,
    force_eos_at_limit: bool = True,
):
    """The log-probs with forbidden choices at -inf: pad always; ``</s>`` before ``min_len``; anything but ``</s>``
    at an input's length limit (``force_eos_at_limit``, fairseq's rule); repeated n-grams. A row left with no
    allowed token may still end (``</s>``).

    Works IN PLACE on ``lprobs`` (N x V, owned by the search) and returns it: at a decode step these N x V passes
    are a visible share of the time (each fresh N x V buffer also costs page faults on CPU), so only the ``</s>``
    column is kept aside, and a stuck row is found with one max-reduction instead of an ``isfinite`` mask (the
    same rows for any log-probs without NaN, i.e. from finite logits)."""
    raw_eos = lprobs[:, eos_idx].clone()  # N: the </s> log-probs before any ban
    lprobs[:, pad_idx] = -math.inf
    if unk_idx is not None and cfg.unkpen:
        lprobs[:, unk_idx] -= cfg.unkpen
    if step < cfg.min_len:
        lprobs[:, eos_idx] = -math.inf
    at_limit = [i for i, b in enumerate(row_input) if step >= max_lens[b]] if force_eos_at_limit else []
    if at_limit:
        rows = torch.tensor(at_limit, device=lprobs.device)
        lprobs[rows] = -math.inf
        lprobs[rows, eos_idx] = raw_eos[rows]
    if cfg.no_repeat_ngram_size > 0:
        lprobs.scatter_(1, repeated_ngram_targets(tokens, cfg.no_repeat_ngram_size, pad_idx), -math.inf)
    stuck = lprobs.amax(dim=-1) == -math.inf  # N: rows left with no allowed token
    lprobs[:, eos_idx] = torch.where(stuck, raw_eos, lprobs[:, eos_idx])  # no host sync
    return lprobs


def _sampling_picks(drawn: torch.Tensor, lprobs: torch.Tensor):
    """Each row continues with its own draw: ``(row, token, log_prob)`` per row."""
    lp = lprobs.gather(1, drawn[:, None]).squeeze(1).tolist()
    return [(row, tok, lp[row]) for row, tok in enumerate(drawn.tolist())]


def _greedy_picks(lprobs: torch.Tensor):
    """Beam 1 without sampling: every row continues with (or ends on) its arg-max, which is what
    :func:`_beam_picks` keeps at beam 1 (a finishing ``</s>`` also ends the input there), in one reduction instead
    of a top-k per input. ``(row, token, log_prob)`` per row."""
    lp, tok = lprobs.max(dim=-1)  # N, N
    return [(row, t, v) for row, (t, v) in enumerate(zip(tok.tolist(), lp.tolist()))]


def _beam_picks(lprobs, row_score, row_input, step, beam, eos_idx, last=frozenset()):
    """fairseq's beam step for each input: the best ``2 * beam`` of its ``rows x V`` extensions by cumulative
    score; ``</s>`` candidates among the first ``beam`` finish, the first ``beam`` other candidates continue. For an
    input in ``last`` (at its length limit, HF's rule) the first ``beam`` candidates are returned, whatever their
    token: they all finish. Returns ``(row, token, log_prob)`` triples.

    Rows of one input are consecutive (the search keeps them so). While every input has the same number of rows
    (all of a search but its tail) the candidates of all inputs are ranked by one ``topk`` over a G x (rows * V)
    view and read back with one copy each, instead of a top-k, an index and host reads per input."""
    groups: Dict[int, List[int]] = {}
    for row, b in enumerate(row_input):
        groups.setdefault(b, []).append(row)
    vocab = lprobs.size(1)
    width = len(row_input) // len(groups)
    if all(rows == list(range(i * width, (i + 1) * width)) for i, rows in enumerate(groups.values())):
        used = 1 if step == 0 else width  # all beams of an input are the same prompt at step 0
        cand = row_score[:, None] + lprobs  # N x V
        cand = cand.view(len(groups), width * vocab)[:, : used * vocab]  # G x used*V
        top_scores, top_idx = cand.topk(min(2 * beam, used * vocab), dim=1)  # G x K
        first_row = torch.arange(0, len(row_input), width, device=lprobs.device)[:, None]  # G x 1
        top_lp = lprobs[first_row + top_idx // vocab, top_idx % vocab]  # G x K
        ranked = zip(groups.values(), top_scores.tolist(), top_idx.tolist(), top_lp.tolist())
    else:
        ranked = (_rank_input(lprobs, row_score, rows[:1] if step == 0 else rows, beam) for rows in groups.values())
    picks = []
    for rows, scores, idx, lps in ranked:
        kept = 0
        for rank, (s, j, lp) in enumerate(zip(scores, idx, lps)):
            if s == -math.inf or kept == beam or (rank == beam and row_input[rows[0]] in last):
                break
            row, token = rows[j // vocab], j % vocab
            if token == eos_idx:
                if rank < beam:
                    picks.append((row, token, lp))
            else:
                picks.append((row, token, lp))
                kept += 1
    return picks


def _rank_input(lprobs, row_score, rows, beam):
    """One input's best ``2 * beam`` extensions: ``(rows, scores, flat indices into rows x V, log-probs)``."""
    idx = torch.tensor(rows, device=lprobs.device)
    sub = lprobs[idx]  # rows x V
    top_scores, top_idx = (row_score[idx, None] + sub).view(-1).topk(min(2 * beam, sub.numel()))
    top_lp = sub.view(-1)[top_idx]
    return rows, top_scores.tolist(), top_idx.tolist(), top_lp.tolist()
