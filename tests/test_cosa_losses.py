"""COSA losses and their inputs (release ``TXH-mercury/COSA`` ``model/pretrain.py``): ITC values with label smoothing,
the ITM batch layout and hard-negative draw, the token maskers, the loss bookkeeping of task strings, and the
2-rank = 1-rank-with-twice-the-batch equivalence of the ITC term and of a whole ``ret_cret`` step."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unilm_vl.losses import cosa as fc
from unilm_vl.losses.distributed import gather_uneven_rows
from unilm_vl.modules import cosa as mc

from cosa_testlib import CLS, MASK, PAD, SEP, VOCAB, random_batch, tiny_model
from two_ranks import run_ranks


# ------------------------------------------------------------------------------------------------------- ITC
@pytest.mark.parametrize("n,expected", [(2, 0.6931), (4, 1.3863), (8, 2.0794)])
def test_itc_identical_features_give_log_n(n, expected):
    feats = F.normalize(torch.ones(n, 5), dim=-1)
    for temp in (0.07, 1.0):
        loss = fc.itc_loss(feats, feats, torch.tensor(temp), label_smoothing=0.1)
        assert loss.item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("n,expected", [(2, 0.7143), (4, 1.0714), (8, 1.2500)])
def test_itc_orthonormal_pairs_with_label_smoothing(n, expected):
    eye = torch.eye(n)
    assert fc.itc_loss(eye, eye, torch.tensor(0.07), label_smoothing=0.1).item() == pytest.approx(expected, abs=1e-4)
    assert fc.itc_loss(eye, eye, torch.tensor(0.07), label_smoothing=0.0).item() < 1e-5


def test_itc_matches_the_hand_written_formula():
    g = torch.Generator().manual_seed(0)
    v, t = F.normalize(torch.randn(5, 4, generator=g), dim=-1), F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    eps, temp = 0.1, 0.2

    def smoothed_ce(logits):
        logp = logits.log_softmax(dim=1)
        nll = -logp.diagonal()
        uniform = -logp.mean(dim=1)
        return ((1 - eps) * nll + eps * uniform).mean()

    expected = 0.5 * (smoothed_ce(v @ t.T / temp) + smoothed_ce(t @ v.T / temp))
    assert fc.itc_loss(v, t, torch.tensor(temp), label_smoothing=eps).item() == pytest.approx(expected.item(), abs=1e-6)


def _smoothed_ce_logit_grad(logits, eps):
    """d/d logits of ``F.cross_entropy(logits, arange(B), label_smoothing=eps)`` (mean over B rows):
    ``(softmax - y) / B`` with ``y = (1 - eps) onehot + eps / N``."""
    b, n = logits.shape
    target = (1 - eps) * torch.eye(b, n) + eps / n
    return (logits.softmax(dim=1) - target) / b


@pytest.mark.parametrize("b,e,temp,eps,seed", [(2, 3, 0.07, 0.1, 0), (5, 8, 0.2, 0.1, 1), (7, 4, 1.0, 0.0, 2)])
def test_itc_query_mode_in_one_process_detaches_the_gathered_side(b, e, temp, eps, seed):
    """World size 1, ``gradient="query"``: the release's ``ddp_allgather`` runs even on one rank and returns
    detached copies, so only the query side gets a gradient:
    ``dL/dv = 0.5/temp G_i2t t``, ``dL/dt = 0.5/temp G_t2i v`` with ``G = (softmax - y) / B`` of each direction.
    ``full`` adds the key side (``+ 0.5/temp G_t2i^T t`` and ``+ 0.5/temp G_i2t^T v``); the value is the same."""
    g = torch.Generator().manual_seed(seed)
    v0, t0 = F.normalize(torch.randn(b, e, generator=g), dim=-1), F.normalize(torch.randn(b, e, generator=g), dim=-1)
    grads, values = {}, {}
    for gradient in ("query", "full"):
        v, t = v0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        tau = torch.tensor(temp, requires_grad=True)
        loss = fc.itc_loss(v, t, tau, 0, 1, eps, gradient)
        loss.backward()
        grads[gradient], values[gradient] = (v.grad, t.grad, tau.grad), loss.detach()
    g_i2t = _smoothed_ce_logit_grad(v0 @ t0.T / temp, eps)  # B x B
    g_t2i = _smoothed_ce_logit_grad(t0 @ v0.T / temp, eps)
    query_v, query_t = 0.5 / temp * g_i2t @ t0, 0.5 / temp * g_t2i @ v0
    torch.testing.assert_close(grads["query"][0], query_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads["query"][1], query_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads["full"][0], query_v + 0.5 / temp * g_t2i.T @ t0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads["full"][1], query_t + 0.5 / temp * g_i2t.T @ v0, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grads["query"][0], grads["full"][0], atol=1e-4)
    assert torch.equal(values["query"], values["full"])
    torch.testing.assert_close(grads["query"][2], grads["full"][2])  # the temperature sees both sides' values


def test_gather_uneven_rows_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_uneven_rows(x, 0, 1, gradient="full") is x
    assert gather_uneven_rows(x, 0, 1, gradient="own") is x
    detached = gather_uneven_rows(x, 0, 1, gradient="query")
    assert not detached.requires_grad and torch.equal(detached, x.detach())
    with pytest.raises(ValueError, match="gradient must be one of full, own, query"):
        gather_uneven_rows(x, 0, 1, gradient="reference")


# ------------------------------------------------------------------------------------------------------- ITM
def test_hard_negative_weights_and_draws():
    sim = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))  # 3 local rows of rank 1 (offset 3), N = 8
    w = mc.hard_negative_weights(sim, offset=3)
    expected = sim.softmax(dim=1) + 1e-4
    for i in range(3):
        assert w[i, 3 + i] == 0
        others = [j for j in range(8) if j != 3 + i]
        torch.testing.assert_close(w[i, others], expected[i, others])
        assert (w[i, others] >= 1e-4).all()
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([mc.sample_hard_negatives(sim, 3, g) for _ in range(400)])  # 400 x 3
    for i in range(3):
        assert not draws[:, i].eq(3 + i).any()  # never the own positive
    peaked = torch.full((2, 6), -50.0)
    peaked[0, 4], peaked[1, 1] = 50.0, 50.0  # ITC says: row 0's hardest negative is 4, row 1's own positive is 1
    draws = torch.stack([mc.sample_hard_negatives(peaked, 0, g) for _ in range(200)])
    assert draws[:, 0].eq(4).all()  # follows the ITC similarities
    assert not draws[:, 1].eq(1).any()


@pytest.fixture(scope="module")
def model():
    return tiny_model(bert_dropout=0.0).eval()


def test_itm_batch_layout(model):
    batch = random_batch(6, seed=4)["net_input"]
    ctx = model.pass_context(0, 1, 6, "cpu")
    with torch.no_grad():
        out = model.net.forward_pass(batch["frames"], batch["text_ids"], batch["text_mask"], ["ret"], ctx)
        assert out["itm_logits"].shape == (18, 2)
        assert out["itm_labels"].tolist() == [1] * 6 + [0] * 12
        neg_video, neg_text = out["itm_negatives"].unbind(1)
        assert not neg_video.eq(torch.arange(6)).any() and not neg_text.eq(torch.arange(6)).any()
        video = model.encode_video(batch["frames"])["video_tokens"]
        ids, mask = batch["text_ids"], batch["text_mask"]
        blocks = [(ids, mask, video), (ids, mask, video[neg_video]), (ids[neg_text], mask[neg_text], video)]
        expected = torch.cat([model.net.itm_logits(i, m, v) for i, m, v in blocks])  # [(t,v), (t,v-), (t-,v)]
    torch.testing.assert_close(out["itm_logits"], expected, atol=1e-5, rtol=1e-4)
    ctx.itm_divisor = 3  # concatenated pass: the first B // 3 samples only
    with torch.no_grad():
        out = model.net.forward_pass(batch["frames"], ids, mask, ["ret"], ctx)
    assert out["itm_logits"].shape == (6, 2) and out["itm_labels"].tolist() == [1, 1, 0, 0, 0, 0]
    assert fc.itm_loss(torch.zeros(6, 2), out["itm_labels"]).item() == pytest.approx(math.log(2), abs=1e-6)
    assert fc.itm_loss(torch.zeros(6, 2), out["itm_labels"], 0.1).item() == pytest.approx(0.1 * math.log(2))


# ---------------------------------------------------------------------------------------------------- masker
def _mask(ids, prob, protect_sep, seed=0):
    ctx = mc.PassContext(
        generator=torch.Generator().manual_seed(seed),
        pad_id=PAD,
        cls_id=CLS,
        sep_id=SEP,
        mask_id=MASK,
        random_low=5,
        random_high=len(VOCAB),
    )
    return ctx.mask(ids, prob, protect_sep)


def _rows(n, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (n, length), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(6, length + 1, (n,), generator=g)
    for i, n_real in enumerate(lengths.tolist()):
        ids[i, n_real - 1] = SEP
        ids[i, n_real:] = PAD
    return ids


@pytest.mark.parametrize("prob,protect_sep", [(0.15, True), (0.6, False), (0.99, False)])
def test_masker_invariants(prob, protect_sep):
    ids = _rows(3000)
    masked, labels = _mask(ids, prob, protect_sep)
    selected = labels.ne(-100)
    assert torch.equal(labels[selected], ids[selected])  # labels are the originals exactly where selected
    assert not selected[:, 0].any() and not selected[ids.eq(PAD)].any() and not selected[ids.eq(CLS)].any()
    assert selected.any(dim=1).all()  # every row has at least one prediction
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes
    if protect_sep:
        assert not selected[ids.eq(SEP)].any()
    else:
        assert selected[ids.eq(SEP)].float().mean().item() == pytest.approx(prob, abs=0.03)
    candidates = ids.ne(PAD) & ids.ne(CLS) & (ids.ne(SEP) if protect_sep else torch.ones_like(ids, dtype=torch.bool))
    assert selected.sum().item() / candidates.sum().item() == pytest.approx(prob, abs=0.01)
    to_mask = masked[selected].eq(MASK).float().mean().item()
    unchanged = masked[selected].eq(ids[selected]).float().mean().item()
    kept = masked[selected]
    random_ids = kept[kept.ne(MASK) & kept.ne(ids[selected])]  # replaced by a random id
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1 + 0.1 / (len(VOCAB) - 5), abs=0.02)  # a random id may equal the original
    assert random_ids.ge(5).all() and random_ids.lt(len(VOCAB)).all()


def test_masker_redraws_rows_until_one_is_selected():
    ids = torch.tensor([[CLS, 7, SEP, PAD]] * 500)
    _, labels = _mask(ids, 0.15, protect_sep=True)
    assert labels[:, 1].eq(7).all()  # the only candidate: always selected after redraws
    empty = torch.tensor([[CLS, SEP, PAD]])
    _, labels = _mask(empty, 0.15, protect_sep=True)  # no candidate: no selection, no endless loop
    assert labels.eq(-100).all()


def test_qa_and_caption_objectives_predict_at_the_masked_positions(model):
    batch = random_batch(3, seed=1)["net_input"]
    qa = {"question_ids": batch["text_ids"], "question_mask": batch["text_mask"]}
    answer = torch.tensor([[CLS, 7, SEP, PAD], [CLS, 8, 9, SEP], [CLS, 10, SEP, PAD]])
    qa.update(answer_ids=answer, answer_mask=answer.ne(PAD).long())
    ctx = model.pass_context(0, 1, 3, "cpu")
    with torch.no_grad():
        out = model.net.forward_pass(batch["frames"], batch["text_ids"], batch["text_mask"], ["cap", "qa"], ctx, qa)
    assert out["qa_logits"].shape == (out["qa_labels"].numel(), len(VOCAB))
    assert set(out["qa_labels"].tolist()) <= {7, 8, 9, 10, SEP}  # answer tokens only, never the question
    assert out["caption_logits"].shape[0] == out["caption_labels"].numel() > 0


# ------------------------------------------------------------------------------------------- bookkeeping
def _criterion(tasks, itm_ratio=1.0):
    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig

    return CosaCriterion(CosaCriterionConfig(cosa_tasks=tasks, itm_ratio=itm_ratio), None)


def test_task_string_grammar():
    assert fc.parse_cosa_tasks("ret_cret_ccap_cmlm") == (["ret"], ["ret", "cap", "mlm"])
    assert fc.parse_cosa_tasks("qa") == (["qa"], [])
    with pytest.raises(ValueError, match="unknown COSA task"):
        fc.parse_cosa_tasks("ret_titc")


def test_pretraining_terms_and_total(model):
    sample = random_batch(6, seed=2)
    loss, sample_size, log = _criterion("ret_cret_ccap_cmlm")(model, sample)
    terms = {k: v for k, v in log.items() if "_loss_" in k}
    assert list(terms) == [
        "itc_loss_origin",
        "itm_loss_origin",
        "itc_loss_concatenated",
        "itm_loss_concatenated",
        "caption_loss_concatenated",
        "mlm_loss_concatenated",
    ]
    assert sample_size == 1 and log["loss"] == pytest.approx(sum(terms.values()), rel=1e-6)
    assert loss.item() == pytest.approx(log["loss"], rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for v in terms.values())


def test_itm_ratio_weights_the_itm_term_only():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    out = {
        "contra_temp": torch.tensor(0.07),
        "rank": 0,
        "world_size": 1,
        "local_sizes": None,
        "origin": {
            "video_features": feats,
            "text_features": feats.flip(0),
            "itm_logits": torch.randn(12, 2, generator=g),
            "itm_labels": torch.tensor([1] * 4 + [0] * 8),
        },
    }
    full, tenth = _criterion("ret").compute_losses(out), _criterion("ret", 0.1).compute_losses(out)
    assert list(tenth) == ["itc_loss_origin", "itm_loss_origin"]
    assert tenth["itc_loss_origin"].item() == pytest.approx(full["itc_loss_origin"].item())
    assert tenth["itm_loss_origin"].item() == pytest.approx(0.1 * full["itm_loss_origin"].item(), rel=1e-6)
    qa = _criterion("qa").compute_losses(
        {"origin": {"qa_logits": torch.zeros(3, 7), "qa_labels": torch.tensor([1, 2, 3])}}
    )
    assert list(qa) == ["vqa_loss_origin"] and qa["vqa_loss_origin"].item() == pytest.approx(math.log(7))


# -------------------------------------------------------------------------------------------- 2 ranks vs 1
W, B = 2, 3


def _itc_setup(x_v, x_t):
    g = torch.Generator().manual_seed(0)
    wv, wt = torch.randn(4, 6, generator=g).requires_grad_(True), torch.randn(4, 6, generator=g).requires_grad_(True)
    temp = torch.tensor(0.1, requires_grad=True)
    return (wv, wt, temp), F.normalize(x_v @ wv.T, dim=-1), F.normalize(x_t @ wt.T, dim=-1)


def _itc_global():
    g = torch.Generator().manual_seed(1)
    return torch.randn(W * B, 6, generator=g), torch.randn(W * B, 6, generator=g)


def _step_losses(model, sample, partners):
    """One ret_cret step (ITM weight 0: its negatives are random per rank) with fixed partners."""
    crit = _criterion("ret_cret", itm_ratio=0.0)
    out = model(**sample["net_input"], tasks="ret_cret", partners=partners)
    loss = sum(crit.compute_losses(out).values())
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _global_step_batch():
    sample = random_batch(W * B, seed=9, size=64)
    partners = torch.tensor([[1, 4, 5], [0, 3, 2], [5, 5, 1], [2, 0, 4], [3, 1, 0], [4, 2, 3]])  # global indices
    return sample, partners


def _local(sample, rank):
    rows = slice(rank * B, (rank + 1) * B)
    net = {k: v[rows] for k, v in sample["net_input"].items()}
    return {"id": sample["id"][rows], "nsentences": B, "ntokens": int(net["text_mask"].sum()), "net_input": net}


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    results = {}
    x_v, x_t = _itc_global()
    local = slice(rank * B, (rank + 1) * B)
    for gradient in ("full", "query"):
        params, v, t = _itc_setup(x_v[local], x_t[local])
        loss = fc.itc_loss(v, t, params[2], rank, W, 0.1, gradient)
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for g in grads + [loss.detach()]:
            dist.all_reduce(g)
            g /= W
        results[("itc", gradient)] = (loss.detach(), grads)
    uneven = slice(0, 4) if rank == 0 else slice(4, 6)  # 4 + 2 rows
    _, v, t = _itc_setup(x_v[uneven], x_t[uneven])
    loss = fc.itc_loss(v, t, torch.tensor(0.1), rank, W, 0.1, "full", sizes=[4, 2]) * (4 if rank == 0 else 2)
    dist.all_reduce(loss)
    results["uneven"] = loss.detach() / (W * B)
    model = tiny_model(bert_dropout=0.0, seed=0).train()  # same init on both ranks, as DDP's broadcast gives
    sample, partners = _global_step_batch()
    loss, grads = _step_losses(model, _local(sample, rank), partners[local])
    for g in grads + [loss]:
        dist.all_reduce(g)
        g /= W
    results["step"] = (loss, grads)
    torch.manual_seed(11)  # fairseq seeds every rank with seed + update number before a step
    local_sample = _local(sample, rank)["net_input"]
    draws = []
    for partners_from in ("global", "local"):
        model.cfg.concat_partners = partners_from
        torch.manual_seed(11)
        ctx = model.pass_context(rank, W, B, "cpu")
        frames, _, _, drawn = model.concatenate(
            local_sample["frames"], local_sample["text_ids"], local_sample["text_mask"], ctx
        )
        source = sample["net_input"]["frames"] if partners_from == "global" else local_sample["frames"]
        torch.testing.assert_close(frames[:, 1:], source[drawn.flatten()].view(B, 3, 3, 64, 64), atol=0, rtol=0)
        draws.append(drawn)
    parts = [torch.empty_like(draws[0]) for _ in range(W)]
    dist.all_gather(parts, draws[0])
    results["partners"] = (parts, draws[1])
    clip = torch.full((rank + 1, 2, 3, 1, 1), 0.0)  # rank 0: 1 sample of 2 frames, rank 1: 2 samples of 3 frames
    clip[:, :, 0] = torch.arange(2.0)[None, :, None, None]
    text = torch.full((rank + 1, 4 + rank), 7)
    if rank == 1:
        clip = torch.cat([clip, clip[:, -1:] + 5], dim=1)
    results["uneven_gather"] = mc.gather_batch([clip, text], W, [None, PAD])
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "cosa_dist.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cosa_dist")
    run_ranks(_worker, (str(tmp),), world_size=W)
    return torch.load(tmp / "cosa_dist.pt")


def _one_rank_itc():
    params, v, t = _itc_setup(*_itc_global())
    loss = fc.itc_loss(v, t, params[2], 0, 1, 0.1)
    loss.backward()
    return loss.detach(), [p.grad for p in params]


@pytest.mark.slow
def test_itc_two_ranks_equal_one_rank_with_the_global_batch(two_ranks):
    loss, grads = _one_rank_itc()
    loss2, grads2 = two_ranks[("itc", "full")]
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert two_ranks["uneven"].item() == pytest.approx(loss.item(), abs=1e-6)  # 4 + 2 rows: same global loss


@pytest.mark.slow
def test_itc_query_gather_keeps_the_value_but_not_the_gradient(two_ranks):
    loss, grads = _one_rank_itc()
    loss2, grads2 = two_ranks[("itc", "query")]
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert not torch.allclose(grads2[0], grads[0], atol=1e-4)


@pytest.mark.slow
def test_itc_query_mode_means_the_same_at_every_world_size(two_ranks):
    """Query-side-only gradients: 2 ranks x B (rank-averaged) equal 1 process x 2B in ``query`` mode too, now
    that one process also detaches the gathered side."""
    params, v, t = _itc_setup(*_itc_global())
    loss = fc.itc_loss(v, t, params[2], 0, 1, 0.1, "query")
    loss.backward()
    loss2, grads2 = two_ranks[("itc", "query")]
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    for a, p in zip(grads2, params):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_ret_cret_step_two_ranks_equal_one_rank(two_ranks):
    """The whole forward (origin + concatenated pass, partners from the all-gathered global batch) and backward:
    with fixed partners, rank-averaged gradients equal the 1-rank gradients on the global batch."""
    model = tiny_model(bert_dropout=0.0, seed=0).train()
    sample, partners = _global_step_batch()
    loss, grads = _step_losses(model, sample, partners)
    loss2, grads2 = two_ranks["step"]
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-5)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads2, grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3, msg=name)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_partners_come_from_the_global_batch_and_differ_per_rank(two_ranks):
    (rank0, rank1), local = two_ranks["partners"]
    assert rank0.shape == (B, 3) and int(torch.cat([rank0, rank1]).max()) < W * B
    assert not torch.equal(rank0, rank1)  # same global seed, different draws per rank
    assert int(torch.cat([rank0, rank1]).max()) >= B  # global indices beyond the local batch are drawn
    assert int(local.max()) < B  # --concat-partners local: indices into this rank's batch only


@pytest.mark.slow
def test_gather_of_uneven_batches(two_ranks):
    clips, text = two_ranks["uneven_gather"]
    assert clips.shape == (3, 3, 3, 1, 1) and text.shape == (3, 5)
    assert clips[0, :, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]  # rank 0's 2-frame clip repeats its last frame
    assert clips[1, :, 0, 0, 0].tolist() == [0.0, 1.0, 6.0]
    assert text[0].tolist() == [7, 7, 7, 7, PAD] and text[1:].eq(7).all()
