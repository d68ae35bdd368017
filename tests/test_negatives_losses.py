"""NegCLIP / FSC-CLIP loss maths against the reference's computed values (contrastive.md 2.4 and checks 6.2.7-11),
NegCLIP == CLIP without negatives, and 2 gloo ranks x B == 1 rank x 2B (loss and gradients)."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unilm_vl.criterions import functional_negatives as fn
from unilm_vl.criterions.functional import clip_loss

ONE = torch.tensor(1.0)


# ------------------------------------------------------------------------------------------------ SCR (check 7, 8)
@pytest.mark.parametrize("gamma,eps,expected", [(0, None, 0.493812), (0, 0.02, 0.513812), (2, None, 0.074995),
                                                (2, 0.02, 0.093976), (2, 0.0, 0.074995)])
def test_scr_hand_case_keeps_the_missing_column_in_the_softmax(gamma, eps, expected):
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # the 3rd negative is missing: zero-filled, logit 0
    valid = torch.tensor([[1, 1, 0]])
    assert fn.selective_calibrated_loss(logits, valid, gamma, eps).item() == pytest.approx(expected, abs=1e-5)


def test_scr_with_mask_missing_drops_the_column():
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)  # 3-way softmax, the missing column gone
    y = torch.tensor([0.98 + 0.02 / 3, 0.02 / 3, 0.02 / 3])
    expected = (y * -(1 - p) ** 2 * p.log()).sum().item()
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


# ------------------------------------------------------------------------------------- worked example (check 9, 10)
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
    data = {"img": torch.randn(n, D_IN, generator=g), "txt": torch.randn(n, D_IN, generator=g),
            "neg": torch.randn(T, n, D_IN, generator=g), "patches": torch.randn(n, P, D_IN, generator=g),
            "tok": torch.randn(n, L, D_IN, generator=g), "neg_tok": torch.randn(T, n, L, D_IN, generator=g)}
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


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
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
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=W, join=True)
    two = torch.load(tmp_path / "dist.pt")
    one = losses_and_grads(global_batch())
    for name in ("negclip", "negclip_local", "negclip_masked", "fsc"):
        assert two[name][0].item() == pytest.approx(one[name][0].item(), abs=1e-5), name
        for g2, g1 in zip(two[name][1], one[name][1]):
            torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4, msg=name)
    assert math.isfinite(one["fsc"][0].item())
