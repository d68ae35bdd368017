"""NegCLIP / FSC-CLIP loss maths against values computed with the reference's ``src/training/losses/loss.py``
(``ytaek-oh/fsc-clip``), NegCLIP == CLIP without negatives, and 2 gloo ranks x B == 1 rank x 2B (loss and
gradients)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unilm_vl.losses import negatives as fn
from unilm_vl.losses.clip import clip_loss

from two_ranks import run_ranks

ONE = torch.tensor(1.0)


# ---------------------------------------------------------------------------------------------------------- SCR
@pytest.mark.parametrize(
    "gamma,eps,expected",
    [(0, None, 0.493812), (0, 0.02, 0.513812), (2, None, 0.074995), (2, 0.02, 0.093976), (2, 0.0, 0.074995)],
)
def test_scr_hand_case_keeps_the_missing_column_in_the_softmax(gamma, eps, expected):
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # the 3rd negative is missing: zero-filled, logit 0
    valid = torch.tensor([[1, 1, 0]])
    assert fn.selective_calibrated_loss(logits, valid, gamma, eps).item() == pytest.approx(expected, abs=1e-5)


def test_scr_with_mask_missing_drops_the_column():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)  # 3-way softmax, the missing column gone
    y = torch.tensor([0.98 + 0.02 / 3, 0.02 / 3, 0.02 / 3])
    expected = (y * -((1 - p) ** 2) * p.log()).sum().item()
    got = fn.selective_calibrated_loss(logits.requires_grad_(True), torch.tensor([[1, 1, 0]]), 2, 0.02, True)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 3] == 0


def test_focal_identity_gamma0_eps0_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    neg = F.normalize(torch.randn(2 * 4, 8, generator=g), dim=-1)  # T = 2, all valid
    mask = torch.ones(8, dtype=torch.long)
    s = torch.tensor(3.0)
    logits = fn.global_hn_logits(img, txt, neg, s)
    ce = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert fn.global_hn_loss(img, txt, neg, mask, s, 0.0, None).item() == pytest.approx(ce.item(), abs=1e-6)
    # T = 1: ln(1 + e^{z1 - z0}) per row
    one = fn.global_hn_loss(img, txt, neg[:4], mask[:4], s, 0.0, 0.0)
    z = fn.global_hn_logits(img, txt, neg[:4], s)
    assert one.item() == pytest.approx(torch.log1p(torch.exp(z[:, 1] - z[:, 0])).mean().item(), abs=1e-6)
    # the type-major layout: logits column 1 + t is <i_b, row t*B + b>
    assert z[2, 1].item() == pytest.approx((s * img[2] @ neg[2]).item(), abs=1e-6)


def test_no_valid_negative_gives_zero_with_a_graph():
    logits = torch.randn(3, 3, requires_grad=True)
    loss = fn.selective_calibrated_loss(logits, torch.zeros(3, 2, dtype=torch.long), 2.0, 0.02)
    assert loss.item() == 0.0
    loss.backward()
    assert (logits.grad == 0).all()


# ----------------------------------------------------------------------------------------------- worked example
IMG, TXT, NEG = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.6]]), torch.tensor([[0.6, 0.8]])
PATCHES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
POS_TOKENS = torch.tensor([[[3.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
NEG_TOKENS = torch.tensor([[[3.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
MASK = torch.tensor([[0, 1, 1]])


def example_losses(s, extra_row=False):
    img, txt, neg, neg_mask = IMG, TXT, NEG, torch.tensor([1])
    patches, pos_tok, neg_tok, mask = PATCHES, POS_TOKENS, NEG_TOKENS, MASK
    if extra_row:  # a second sample with image [0,1], text [0,1] and its negative missing (an all-zero row)
        img = torch.cat([IMG, torch.tensor([[0.0, 1.0]])])
        txt = torch.cat([TXT, torch.tensor([[0.0, 1.0]])])
        neg, neg_mask = torch.cat([NEG, torch.zeros(1, 2)]), torch.tensor([1, 0])
        patches, pos_tok = torch.cat([PATCHES, PATCHES.flip(1)]), torch.cat([POS_TOKENS, POS_TOKENS])
        neg_tok, mask = torch.cat([NEG_TOKENS, torch.zeros(1, 3, 2)]), torch.cat([MASK, MASK])
    s = torch.tensor(float(s))
    return {
        "clip_loss": clip_loss(img, txt, s)["clip_loss"].item(),
        "clip_neg_loss": fn.global_hn_loss(img, txt, neg, neg_mask, s, 2.0, 0.02).item(),
        "local_neg_loss": fn.local_hn_loss(patches, pos_tok, mask, neg_tok, mask, neg_mask, s, 2.0, 0.02).item(),
    }


def test_worked_example_s1():
    out = example_losses(1)
    assert out["clip_loss"] == 0.0
    assert out["clip_neg_loss"] == pytest.approx(0.122413, abs=1e-5)
    assert out["local_neg_loss"] == pytest.approx(0.180285, abs=1e-5)
    sigma = fn.local_hn_logits(PATCHES, POS_TOKENS, MASK, NEG_TOKENS, MASK, torch.tensor([1]), ONE)
    torch.testing.assert_close(sigma, torch.tensor([[1.644546, 1.668105]]), atol=1e-5, rtol=0)
    grouped = fn.token_grouped_visual_features(PATCHES, fn.token_patch_weights(POS_TOKENS, PATCHES))
    expected = torch.tensor([[[0.917857, 0.396911], [0.942990, 0.332820], [0.280899, 0.959737]]])
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=0)


def test_worked_example_s10():
    out = example_losses(10)
    assert out["clip_neg_loss"] == pytest.approx(0.018286, abs=1e-5)
    assert out["local_neg_loss"] == pytest.approx(0.256602, abs=1e-5)


def test_row_without_negatives_is_dropped():
    out = example_losses(1, extra_row=True)
    assert out["clip_neg_loss"] == pytest.approx(0.122413, abs=1e-5)
    assert out["local_neg_loss"] == pytest.approx(0.180285, abs=1e-5)
    assert out["clip_loss"] == pytest.approx(0.448879, abs=1e-5)


# ------------------------------------------------------------------------------------------- LHN invariances (11)
def random_tokens(seed, b=2, length=6, p=5, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, d, generator=g), torch.randn(b, length, d, generator=g)


def test_sigma_ignores_padding_and_sot_tokens():
    patches, tokens = random_tokens(0)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]])
    s = torch.tensor(2.0)
    sigma = fn.local_alignment_score(patches, tokens, mask, s)
    changed = tokens.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), 4) * 5
    torch.testing.assert_close(fn.local_alignment_score(patches, changed, mask, s), sigma, atol=1e-6, rtol=0)


def test_sigma_is_invariant_to_patch_and_token_order():
    patches, tokens = random_tokens(1)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    s = torch.tensor(2.0)
    sigma = fn.local_alignment_score(patches, tokens, mask, s)
    perm_p, perm_t = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([5, 2, 0, 4, 1, 3])
    permuted = fn.local_alignment_score(patches[:, perm_p], tokens[:, perm_t], mask[:, perm_t], s)
    torch.testing.assert_close(permuted, sigma, atol=1e-6, rtol=0)


def test_single_token_sigma_is_scaled_cosine():
    patches, tokens = random_tokens(2)
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[:, 2] = 1
    s = torch.tensor(3.0)
    w = fn.token_patch_weights(tokens, patches)
    v = torch.einsum("blp,bpd->bld", w, patches)[:, 2]
    expected = s * F.cosine_similarity(v, tokens[:, 2], dim=-1)
    torch.testing.assert_close(fn.local_alignment_score(patches, tokens, mask, s), expected, atol=1e-6, rtol=0)


def test_weights_carry_no_gradient():
    patches, tokens = random_tokens(3)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    s = torch.tensor(2.0)
    tok_a = tokens.clone().requires_grad_(True)
    fn.local_alignment_score(patches, tok_a, mask, s).sum().backward()
    w = fn.token_patch_weights(tokens, patches)  # a constant
    tok_b = tokens.clone().requires_grad_(True)
    v = F.normalize(torch.einsum("blp,bpd->bld", w, patches), dim=-1)
    c = (s * (v * F.normalize(tok_b, dim=-1)).sum(-1)).masked_fill(mask == 0, float("-inf"))
    torch.logsumexp(c, dim=1).sum().backward()
    torch.testing.assert_close(tok_a.grad, tok_b.grad, atol=1e-6, rtol=0)
    assert tok_a.grad.abs().max() > 0


def test_minmax_weights_and_the_tied_similarity_quirk():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # token 1 is orthogonal to every patch: all similarities tie
    w = fn.token_patch_weights(tokens, patches)
    torch.testing.assert_close(w[0, 0], torch.tensor([0.5, 0.0, 0.5]))  # (S - min) / (max - min), then sum to 1
    assert torch.isnan(w[0, 1]).all()  # the reference: 0 / 0
    fixed = fn.token_patch_weights(tokens, patches, sim_eps=1e-6)
    torch.testing.assert_close(fixed[0, 0], w[0, 0])
    torch.testing.assert_close(fixed[0, 1], torch.full((3,), 1 / 3))  # uniform fallback
    mask = torch.tensor([[1, 1]])
    assert torch.isnan(fn.local_alignment_score(patches, tokens, mask, ONE)).all()
    assert torch.isfinite(fn.local_alignment_score(patches, tokens, mask, ONE, sim_eps=1e-6)).all()


def test_softmax_normalizer_and_sparsify():
    patches, tokens = random_tokens(4)
    sim = torch.einsum("bld,bpd->blp", tokens, patches)
    torch.testing.assert_close(fn.token_patch_weights(tokens, patches, "softmax"), sim.softmax(-1))
    sparse = fn.token_patch_weights(tokens, patches, "minmax", sparsify=True)
    lo, hi = sim.min(-1, keepdim=True).values, sim.max(-1, keepdim=True).values
    scaled = (sim - lo) / (hi - lo)
    scaled = torch.where(scaled < 1 / 5, torch.zeros_like(scaled), scaled)
    torch.testing.assert_close(sparse, scaled / scaled.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="minmax"):
        fn.token_patch_weights(tokens, patches, "softmax", sparsify=True)


# ----------------------------------------------------------------------------------------------------- NegCLIP
def features(seed, n, d=4):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_negclip_without_negatives_is_clip():
    img, txt, s = features(0, 5), features(1, 5), torch.tensor(4.0)
    ref = clip_loss(img, txt, s)["clip_loss"]
    assert fn.negclip_loss(img, txt, s)["clip_loss"].item() == pytest.approx(ref.item(), abs=1e-7)
    empty = fn.negclip_loss(img, txt, s, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty["clip_loss"].item() == pytest.approx(ref.item(), abs=1e-7)
    # every negative missing but masked out of the softmax: CLIP again
    masked = fn.negclip_loss(img, txt, s, torch.zeros(10, 4), torch.zeros(10, dtype=torch.long), mask_missing=True)
    assert masked["clip_loss"].item() == pytest.approx(ref.item(), abs=1e-6)


def test_negclip_adds_negatives_to_image_to_text_only():
    img, txt, s = features(0, 3), features(1, 3), torch.tensor(4.0)
    neg = torch.cat([features(2, 3), torch.zeros(3, 4)])  # T = 2: the 2nd type missing (zero rows, logit 0)
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    got = fn.negclip_loss(img, txt, s, neg, mask)["clip_loss"]
    labels = torch.arange(3)
    i2t = F.cross_entropy(s * img @ torch.cat([txt, neg]).T, labels)  # 3 x 9: three zero columns included
    t2i = F.cross_entropy(s * txt @ img.T, labels)
    assert got.item() == pytest.approx((0.5 * (i2t + t2i)).item(), abs=1e-6)
    masked = fn.negclip_loss(img, txt, s, neg, mask, mask_missing=True)["clip_loss"]
    i2t_masked = F.cross_entropy(s * img @ torch.cat([txt, neg[:3]]).T, labels)
    assert masked.item() == pytest.approx((0.5 * (i2t_masked + t2i)).item(), abs=1e-6)


def _negclip_by_hand(img, txt, s, neg, label_smoothing=0.0):
    """1 process: image->text CE over [positives; every negative row, zero rows included], text->image over the
    positives (the reference's ``ClipLoss`` with zero-filled negatives)."""
    labels = torch.arange(img.shape[0])
    i2t = F.cross_entropy(s * img @ torch.cat([txt, neg]).T, labels, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(s * txt @ img.T, labels, label_smoothing=label_smoothing)
    return 0.5 * (i2t + t2i)


@pytest.mark.parametrize(
    "b,t,d,seed,scale,smoothing", [(2, 1, 3, 0, 1.0, 0.0), (5, 3, 8, 1, 14.3, 0.0), (7, 2, 16, 2, 100.0, 0.1)]
)
def test_negclip_batch_without_any_valid_negative_is_exactly_clip(b, t, d, seed, scale, smoothing):
    """The reference appends no column when the batch holds no valid negative: plain CLIP, not CLIP plus T*B
    logit-0 columns."""
    img = features(seed, b, d).requires_grad_(True)
    txt = features(seed + 10, b, d).requires_grad_(True)
    s = torch.tensor(scale)
    ref = clip_loss(img, txt, s, label_smoothing=smoothing)["clip_loss"]
    ref_grads = torch.autograd.grad(ref, [img, txt])
    none = torch.zeros(t * b, dtype=torch.long)
    for neg, mask_missing in (
        (torch.zeros(t * b, d), False),
        (torch.zeros(t * b, d), True),
        (features(seed + 20, t * b, d), False),
    ):  # rows the mask calls missing are ignored
        got = fn.negclip_loss(img, txt, s, neg, none, label_smoothing=smoothing, mask_missing=mask_missing)
        assert got["clip_loss"].item() == ref.item()
        for g, r in zip(torch.autograd.grad(got["clip_loss"], [img, txt]), ref_grads):
            assert torch.equal(g, r)
    zero_columns = _negclip_by_hand(img, txt, s, torch.zeros(t * b, d), smoothing)  # the behaviour replaced
    assert abs(zero_columns.item() - ref.item()) > 1e-4


@pytest.mark.parametrize(
    "b,t,d,seed,valid",
    [(3, 1, 4, 3, [0, 1, 0]), (4, 2, 6, 4, [1, 0, 0, 0, 0, 0, 0, 1]), (2, 3, 5, 5, [0, 0, 0, 0, 1, 0])],
)
def test_negclip_partial_batch_keeps_the_zero_columns(b, t, d, seed, valid):
    """Some valid negative in the batch: every missing one stays a logit-0 column (the documented default), or is
    dropped with ``mask_missing``."""
    img, txt, s = features(seed, b, d), features(seed + 10, b, d), torch.tensor(5.0)
    mask = torch.tensor(valid)
    neg = fn.fill_missing(features(seed + 20, int(mask.sum()), d), mask)  # (T*B) x D, zero rows where missing
    got = fn.negclip_loss(img, txt, s, neg, mask)["clip_loss"]
    assert got.item() == pytest.approx(_negclip_by_hand(img, txt, s, neg).item(), abs=1e-6)
    masked = fn.negclip_loss(img, txt, s, neg, mask, mask_missing=True)["clip_loss"]
    assert masked.item() == pytest.approx(_negclip_by_hand(img, txt, s, neg[mask > 0]).item(), abs=1e-6)
    assert abs(got.item() - clip_loss(img, txt, s)["clip_loss"].item()) > 1e-4


def test_negclip_refuses_a_mask_of_another_length():
    img, txt = features(0, 2), features(1, 2)
    with pytest.raises(ValueError, match="neg_mask has 3 entries for 4 negative rows"):
        fn.negclip_loss(img, txt, ONE, torch.zeros(4, 4), torch.zeros(3, dtype=torch.long))


def test_fill_missing_scatters_type_major():
    values = torch.tensor([[1.0], [2.0], [3.0]])
    out = fn.fill_missing(values, torch.tensor([1, 0, 1, 1]))
    torch.testing.assert_close(out, torch.tensor([[1.0], [0.0], [2.0], [3.0]]))
    with pytest.raises(ValueError, match="valid"):
        fn.fill_missing(values, torch.tensor([1, 0, 0, 1]))
    assert fn.split_type_major(torch.arange(6), 3).tolist() == [[0, 3], [1, 4], [2, 5]]


def test_dense_token_mask_excludes_sot_and_padding():
    text = torch.tensor([[49406, 320, 49407, 0, 0], [49406, 1, 2, 3, 49407]])
    assert fn.dense_token_mask(text, 0).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------- 2 ranks vs 1 rank
D_IN, D, P, L, B, T, W = 6, 4, 5, 4, 3, 2, 2


def encoders():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D_IN, generator=g) for _ in range(2)]


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = W * B
    data = {
        "img": torch.randn(n, D_IN, generator=g),
        "txt": torch.randn(n, D_IN, generator=g),
        "neg": torch.randn(T, n, D_IN, generator=g),
        "patches": torch.randn(n, P, D_IN, generator=g),
        "tok": torch.randn(n, L, D_IN, generator=g),
        "neg_tok": torch.randn(T, n, L, D_IN, generator=g),
    }
    # the same number of valid negatives on each rank's half (per-rank means then average to the full mean)
    data["mask"] = torch.tensor([[1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1]])  # T x n
    data["tok_mask"] = torch.tensor([0, 1, 1, 0]).repeat(n, 1)
    return data


def local_part(data, rank):
    sl = slice(rank * B, (rank + 1) * B)
    return {k: (v[:, sl] if k in ("neg", "neg_tok", "mask") else v[sl]) for k, v in data.items()}


def losses_and_grads(data, rank=0, world=1):
    wi, wt = (w.clone().requires_grad_(True) for w in encoders())
    scale = torch.tensor(2.0, requires_grad=True)
    b = data["img"].shape[0]
    img = F.normalize(data["img"] @ wi.T, dim=-1)
    txt = F.normalize(data["txt"] @ wt.T, dim=-1)
    mask = data["mask"].reshape(-1)  # type-major (T*B,)
    neg = F.normalize(data["neg"].reshape(T * b, D_IN) @ wt.T, dim=-1) * mask[:, None]  # zero-filled
    patches, tok = data["patches"] @ wi.T, data["tok"] @ wt.T
    neg_tok = data["neg_tok"].reshape(T * b, L, D_IN) @ wt.T
    neg_tok_mask = data["tok_mask"].repeat(T, 1)
    out = {
        "negclip": fn.negclip_loss(img, txt, scale, neg, mask, rank, world)["clip_loss"],
        "negclip_local": fn.negclip_loss(img, txt, scale, neg, mask, rank, world, local_loss=True)["clip_loss"],
        "negclip_query": fn.negclip_loss(img, txt, scale, neg, mask, rank, world, gradient="query")["clip_loss"],
        "negclip_masked": fn.negclip_loss(img, txt, scale, neg, mask, rank, world, mask_missing=True)["clip_loss"],
        "fsc": clip_loss(img, txt, scale, rank, world)["clip_loss"]
        + 0.5 * fn.global_hn_loss(img, txt, neg, mask, scale, 2.0, 0.02)
        + 0.2 * fn.local_hn_loss(patches, tok, data["tok_mask"], neg_tok, neg_tok_mask, mask, scale, 2.0, 0.02),
    }
    results = {}
    for name, loss in out.items():
        grads = torch.autograd.grad(loss, [wi, wt, scale], retain_graph=True)
        results[name] = (loss.detach(), list(grads))
    return results


def _worker(rank, out_dir):
    results = losses_and_grads(local_part(global_batch(), rank), rank, W)
    for loss, grads in results.values():
        dist.all_reduce(loss)
        loss /= W
        for g in grads:  # DDP: average the gradients over ranks
            dist.all_reduce(g)
            g /= W
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dist.pt"))
    dist.barrier()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    run_ranks(_worker, (str(tmp_path),), world_size=W)
    two = torch.load(tmp_path / "dist.pt")
    one = losses_and_grads(global_batch())
    for name in ("negclip", "negclip_local", "negclip_query", "negclip_masked", "fsc"):
        assert two[name][0].item() == pytest.approx(one[name][0].item(), abs=1e-5), name
        for g2, g1 in zip(two[name][1], one[name][1]):
            torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4, msg=name)
    assert math.isfinite(one["fsc"][0].item())


# ------------------------------------------------------------------- 2 ranks: no valid negative on one or all ranks
# (B, T, D, seed) per configuration; rank r holds samples r*B .. r*B + B - 1 of the global batch
EMPTY_CONFIGS = [(3, 2, 4, 7), (2, 1, 5, 8)]
NEGCLIP_MODES = {
    "default": {},
    "local": {"local_loss": True},
    "masked": {"mask_missing": True},
    "own": {"gradient": "own"},
    "query": {"gradient": "query"},
}


def empty_batch(b, t, d, seed, scenario):
    """Global batch of W*b samples; ``scenario`` "all_empty": no valid negative anywhere, "one_empty": rank 0's
    half has some, rank 1's none."""
    g = torch.Generator().manual_seed(seed)
    n = W * b
    mask = torch.zeros(t, n, dtype=torch.long)
    if scenario == "one_empty":
        mask[0, 0] = mask[t - 1, b - 1] = 1
    return {
        "img": torch.randn(n, D_IN, generator=g),
        "txt": torch.randn(n, D_IN, generator=g),
        "neg": torch.randn(t, n, D_IN, generator=g),
        "mask": mask,
        "d": d,
    }


def negclip_modes(data, rank=0, world=1, clip_too=False):
    """{mode: (loss, grads wrt the two encoders and the scale)} of :func:`fn.negclip_loss` (and of the plain
    :func:`clip_loss` with the same gathering, ``clip_too``) on this rank's part of ``data``."""
    d, (t, b) = data["d"], data["mask"].shape
    g = torch.Generator().manual_seed(0)
    wi, wt = (torch.randn(d, D_IN, generator=g).requires_grad_(True) for _ in range(2))
    scale = torch.tensor(3.0, requires_grad=True)
    img, txt = F.normalize(data["img"] @ wi.T, dim=-1), F.normalize(data["txt"] @ wt.T, dim=-1)
    mask = data["mask"].reshape(-1)  # (T*B,) type-major
    neg = F.normalize(data["neg"].reshape(t * b, D_IN) @ wt.T, dim=-1) * mask[:, None]  # zero rows where missing
    results = {}
    for mode, kwargs in NEGCLIP_MODES.items():
        loss = fn.negclip_loss(img, txt, scale, neg, mask, rank, world, **kwargs)["clip_loss"]
        results[mode] = (loss.detach(), list(torch.autograd.grad(loss, [wi, wt, scale], retain_graph=True)))
        if clip_too:
            gather = {k: v for k, v in kwargs.items() if k != "mask_missing"}
            loss = clip_loss(img, txt, scale, rank, world, **gather)["clip_loss"]
            results["clip_" + mode] = (
                loss.detach(),
                list(torch.autograd.grad(loss, [wi, wt, scale], retain_graph=True)),
            )
    return results


def _identical(a, b):
    """Same loss and same gradients, bit for bit."""
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _empty_worker(rank, out_dir):
    torch.set_num_threads(1)
    results = {}
    for config in EMPTY_CONFIGS:
        b = config[0]
        for scenario in ("all_empty", "one_empty"):
            data = empty_batch(*config, scenario)
            local = {
                k: (
                    v[:, rank * b : (rank + 1) * b]
                    if k in ("neg", "mask")
                    else v[rank * b : (rank + 1) * b]
                    if torch.is_tensor(v)
                    else v
                )
                for k, v in data.items()
            }
            per_rank = negclip_modes(local, rank, W, clip_too=True)
            # this rank's own values, before averaging: negclip == clip, bit for bit, when no rank has a negative
            exact = torch.tensor([float(all(_identical(per_rank[m], per_rank["clip_" + m]) for m in NEGCLIP_MODES))])
            dist.all_reduce(exact, op=dist.ReduceOp.MIN)
            for loss, grads in per_rank.values():  # DDP: average over ranks
                for x in [loss] + grads:
                    dist.all_reduce(x)
                    x /= W
            results[(config, scenario)] = (per_rank, bool(exact.item()))
    # a rank without negative rows while the other has T*B: refused on both ranks, nobody left waiting
    img, txt = features(rank, B), features(rank + 2, B)
    neg, mask = (torch.zeros(T * B, 4), torch.zeros(T * B, dtype=torch.long)) if rank == 0 else (None, None)
    try:
        fn.negclip_loss(img, txt, ONE, neg, mask, rank, W)
        errors = ["none"]
    except ValueError as error:
        errors = [str(error)]
    gathered = [None] * W
    dist.all_gather_object(gathered, errors[0])
    results["mismatch"] = gathered
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "empty.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def empty_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("negclip_empty")
    run_ranks(_empty_worker, (str(tmp),), world_size=W)
    return torch.load(tmp / "empty.pt")


@pytest.mark.slow
@pytest.mark.parametrize("config", EMPTY_CONFIGS)
def test_negclip_two_ranks_without_any_negative_is_clip(empty_two_ranks, config):
    """No rank has a valid negative: every rank takes the plain CLIP branch (same value and gradients as the clip
    loss on each rank), and 2 ranks x B equal 1 process x 2B, which is plain CLIP too."""
    two, exact = empty_two_ranks[(config, "all_empty")]
    assert exact
    one = negclip_modes(empty_batch(*config, "all_empty"), clip_too=True)
    for mode in NEGCLIP_MODES:
        assert one[mode][0].item() == one["clip_" + mode][0].item(), mode
        assert two[mode][0].item() == pytest.approx(one[mode][0].item(), abs=1e-6), mode
        if mode != "own":  # the own-rows gather gives 1/W of the gradient (documented)
            for g2, g1 in zip(two[mode][1], one[mode][1]):
                torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5, msg=mode)


@pytest.mark.slow
@pytest.mark.parametrize("config", EMPTY_CONFIGS)
def test_negclip_two_ranks_one_without_negatives_equal_one_rank(empty_two_ranks, config):
    """Rank 1 has no valid negative, rank 0 has some: the ranks agree (gathered counts) to append every rank's
    T*B rows, zero rows included, as one process does with the concatenated (partially filled) batch."""
    two, exact = empty_two_ranks[(config, "one_empty")]
    assert not exact
    one = negclip_modes(empty_batch(*config, "one_empty"), clip_too=True)
    for mode in NEGCLIP_MODES:
        assert two[mode][0].item() == pytest.approx(one[mode][0].item(), abs=1e-6), mode
        assert abs(one[mode][0].item() - one["clip_" + mode][0].item()) > 1e-4, mode  # the negatives count
        if mode != "own":
            for g2, g1 in zip(two[mode][1], one[mode][1]):
                torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-5, msg=mode)


@pytest.mark.slow
def test_negclip_ranks_with_different_negative_rows_fail_together(empty_two_ranks):
    first, second = empty_two_ranks["mismatch"]
    assert first == second and first.startswith(f"negative rows per rank [{T * B}, 0]")
