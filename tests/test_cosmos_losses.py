"""COSMOS maths and model wiring against the reference (``ExplainableML/cosmos``, values computed by hand):
loss wiring with hand values, teacher gradient and EMA, cosine momentum, cross-attention invariances, the
multi-resolution tower, and the 2-rank equivalence of the loss."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unilm_vl.losses import cosmos as fc
from unilm_vl.losses.ema import cosine_momentum, teacher_momentum
from unilm_vl.modules.clip import ClipTowersConfig
from unilm_vl.modules.cosmos import (
    AttentionalCrossPooler,
    CosmosConfig,
    CosmosModule,
    interpolate_pos_embed,
    vision_forward,
)

from two_ranks import run_ranks

I = torch.eye(2)
T = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
ONE = torch.tensor(1.0)
A = math.log(1 + math.exp(-1))  # 0.3132617: CLIP(I, I, s=1)
B_ = math.log(1 + math.exp(0.2))  # 0.7981389: CLIP(I, T, s=1)


def views(*mats):
    return torch.stack(list(mats))  # V x B x D


def reference_case(num_global_crops=2):
    """The reference's ``COSMOSLoss`` on B=2, both scales 1."""
    return fc.cosmos_loss(
        image_features=views(I, I, T),
        text_features=views(I, T, I),
        image_cross=views(I, T, T),
        text_cross=views(I, I, T),
        teacher_image=views(I, I),
        teacher_text=views(I, I),
        logit_scale=ONE,
        distill_logit_scale=ONE,
        num_global_crops=num_global_crops,
    )


def test_loss_wiring_reference_values():
    out = reference_case()
    assert out["distill_loss"].item() == pytest.approx(0.555700, abs=1e-5)
    assert out["distill_loss"].item() == pytest.approx(
        0.25 * (2 * (2 * A + 4 * B_) / 6 + 2 * (4 * A + 2 * B_) / 6), abs=1e-6
    )
    assert out["clip_loss"].item() == pytest.approx(0.474887, abs=1e-5)
    assert out["clip_loss"].item() == pytest.approx((4 * A + 2 * B_) / 6, abs=1e-6)
    assert sum(out.values()).item() == pytest.approx(1.030587, abs=1e-5)


def test_local_crops_stay_out_of_the_clip_term():
    with_local = reference_case(num_global_crops=3)["clip_loss"].item()
    # feeding the 3rd image view (T) in adds the pairs (T, I), (T, T), (T, I): b, c, b with c = ln(1 + e^-0.04)
    # (T T^T has 1 on the diagonal and 0.96 off it) -> (4a + 4b + c) / 9
    c = math.log(1 + math.exp(-0.04))
    assert with_local == pytest.approx((4 * A + 4 * B_ + c) / 9, abs=1e-6)
    assert with_local != pytest.approx(0.474887, abs=1e-3)
    # the distillation term uses all student views whatever the number of global crops
    assert reference_case(3)["distill_loss"].item() == pytest.approx(0.555700, abs=1e-5)


def test_multi_view_clip_loss_is_the_mean_over_pairs():
    assert fc.multi_view_clip_loss([I], [I], ONE).item() == pytest.approx(A, abs=1e-6)
    assert fc.multi_view_clip_loss([I], [T], ONE).item() == pytest.approx(B_, abs=1e-6)
    assert fc.multi_view_clip_loss([I, T], [I], ONE).item() == pytest.approx((A + B_) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        fc.multi_view_clip_loss([], [I], ONE)


def test_teacher_side_carries_no_gradient():
    t_img = views(I, I).clone().requires_grad_(True)
    t_txt = views(I, I).clone().requires_grad_(True)
    s_cross = views(I, T, T).clone().requires_grad_(True)
    out = fc.cosmos_loss(views(I, I, T), views(I, T, I), s_cross, views(I, I, T), t_img, t_txt, ONE, ONE)
    sum(out.values()).backward()
    assert t_img.grad is None and t_txt.grad is None
    assert s_cross.grad is not None and s_cross.grad.abs().sum() > 0


@pytest.mark.parametrize("step,expected", [(0, 0.99), (500, 0.995), (999, 1.0), (1000, 1.0)])
def test_cosine_momentum_schedule(step, expected):
    assert round(cosine_momentum(step, 0.99, 1000), 6) == pytest.approx(expected, abs=1e-9)
    assert teacher_momentum(step, 0.99, 1000, "fixed") == 0.99
    assert teacher_momentum(step, 0.99, 1000, "cosine") == cosine_momentum(step, 0.99, 1000)


# ------------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CosmosModule(CosmosConfig(ClipTowersConfig(), cross_attn_heads=4)).eval()


def batch(Bsz=3, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, Bsz, 3, 64, 64, generator=g)
    local = torch.randn(3, Bsz, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (K, Bsz, 32), generator=g)
    text[..., 0] = 49406
    text[..., 9] = 49407  # EOT at position 9, padding after it
    text[..., 10:] = 0
    return image, local, text


def test_shapes_view_major_and_teacher_inputs(tiny):
    image, local, text = batch()
    with torch.no_grad():
        out = tiny(image, text, local)
        assert out["image_features"].shape == (5, 3, 64) and out["text_features"].shape == (4, 3, 64)
        assert out["image_cross"].shape == (5, 3, 64) and out["text_cross"].shape == (4, 3, 64)
        # view v of sample b sits at [v, b]: the student's pooled view equals encoding that view alone
        all_views = list(image) + list(local)  # 2 crops of 64 px, then 3 of 32 px
        for v in range(5):
            torch.testing.assert_close(
                out["image_features"][v], tiny.student.encode_image(all_views[v]), atol=1e-5, rtol=1e-4
            )
        for u in range(4):
            torch.testing.assert_close(out["text_features"][u], tiny.student.encode_text(text[u]), atol=1e-5, rtol=1e-4)
        # the teacher sees exactly the two global crops and the first two (global) captions
        assert out["teacher_image_features"].shape == (2, 3, 64)
        assert out["teacher_text_features"].shape == (2, 3, 64)
        for v in range(2):
            torch.testing.assert_close(
                out["teacher_image_features"][v], tiny.teacher.encode_image(image[v]), atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                out["teacher_text_features"][v], tiny.teacher.encode_text(text[v]), atol=1e-5, rtol=1e-4
            )


def test_plain_batches_are_one_view_each(tiny):
    image, _, text = batch()
    with torch.no_grad():
        out = tiny(image[0], text[0])
    assert out["image_features"].shape == (1, 3, 64) and out["teacher_text_features"].shape == (1, 3, 64)
    assert out["num_global_crops"] == 1


def test_native_resolution_forward_equals_open_clip(tiny):
    image, local, _ = batch()
    clip = tiny.student.clip
    with torch.no_grad():
        pooled, tokens = vision_forward(clip.visual, image[0])
        torch.testing.assert_close(pooled, clip.visual(image[0]), atol=1e-5, rtol=1e-4)
        assert tokens.shape == (3, 64, 128)  # 8 x 8 patches of width 128
        pooled_local, tokens_local = vision_forward(clip.visual, local[0])
        assert tokens_local.shape == (3, 16, 128)  # 32 px crops: a 4 x 4 grid
        dense_pooled, dense_tokens = tiny.student.encode_image_dense(image[0])
        torch.testing.assert_close(dense_pooled, F.normalize(pooled, dim=-1))
        torch.testing.assert_close(dense_tokens, tokens @ clip.visual.proj)


def test_interpolate_pos_embed():
    pos = torch.randn(1 + 16, 5)
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    small = interpolate_pos_embed(pos, (4, 4), (2, 2))
    assert small.shape == (5, 5)
    torch.testing.assert_close(small[0], pos[0])  # the class row is kept
    const = torch.cat([torch.zeros(1, 5), torch.ones(16, 5)])  # a constant table stays constant
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4), (3, 3))[1:], torch.ones(9, 5))


def test_cross_pooler_single_key_is_independent_of_the_query():
    torch.manual_seed(0)
    pool = AttentionalCrossPooler(8, 2).eval()
    x = torch.randn(4, 1, 8)
    out_a = pool(torch.randn(4, 8), x)
    out_b = pool(torch.randn(4, 8), x)
    torch.testing.assert_close(out_a, out_b)
    attn = pool.attn
    w_v = attn.in_proj_weight[16:]
    b_v = attn.in_proj_bias[16:]
    expected = attn.out_proj(pool.ln_k(x[:, 0]) @ w_v.T + b_v)
    torch.testing.assert_close(out_a, expected, atol=1e-6, rtol=1e-5)


def test_cross_pooler_is_invariant_to_permuting_keys():
    torch.manual_seed(0)
    pool = AttentionalCrossPooler(8, 2).eval()
    q, x = torch.randn(3, 8), torch.randn(3, 7, 8)
    perm = torch.randperm(7)
    torch.testing.assert_close(pool(q, x[:, perm]), pool(q, x), atol=1e-6, rtol=1e-5)


def test_image_cross_uses_only_the_first_global_caption(tiny):
    image, local, text = batch()
    other = text.clone()
    other[1:] = torch.randint(1, 1000, other[1:].shape)
    with torch.no_grad():
        a, b = tiny(image, text, local), tiny(image, other, local)
    torch.testing.assert_close(a["image_cross"], b["image_cross"])
    assert not torch.allclose(a["text_cross"][1:], b["text_cross"][1:])
    # text_cross attends to the patches of global crop 1 only: changing crop 2 and the local crops leaves it
    image2 = image.clone()
    image2[1] = torch.randn_like(image2[1])
    with torch.no_grad():
        c = tiny(image2, text, torch.randn_like(local))
    torch.testing.assert_close(a["text_cross"], c["text_cross"])


def test_text_padding_mask_option():
    """Reference (no mask): the image query attends to padding positions too; --mask-text-padding removes them."""
    image, local, text = batch()
    padded = text.clone()
    padded[0, :, 10:] = 7  # other ids after EOT (the EOT, argmax id, stays the pooled position)
    results = {}
    for mask in (False, True):
        torch.manual_seed(0)
        model = CosmosModule(CosmosConfig(ClipTowersConfig(), cross_attn_heads=4, mask_text_padding=mask)).eval()
        with torch.no_grad():
            results[mask] = (model(image, text, local)["image_cross"], model(image, padded, local)["image_cross"])
    assert not torch.allclose(*results[False])
    torch.testing.assert_close(*results[True])


def test_ema_update_value_and_no_teacher_gradient():
    torch.manual_seed(0)
    module = CosmosModule(CosmosConfig(ClipTowersConfig(), cross_attn_heads=4))
    image, local, text = batch(Bsz=2)
    out = module(image, text, local)
    loss = sum(
        fc.cosmos_loss(
            out["image_features"],
            out["text_features"],
            out["image_cross"],
            out["text_cross"],
            out["teacher_image_features"],
            out["teacher_text_features"],
            out["logit_scale"],
            out["distill_logit_scale"],
        ).values()
    )
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())
    # the reference order: EMA on the pre-step student, then the optimiser step
    old_teacher = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    pre_step = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    module.update_teacher(0.9)
    torch.optim.SGD(module.student.parameters(), lr=0.1).step()
    for name, p in module.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * old_teacher[name] + 0.1 * pre_step[name], atol=1e-6, rtol=1e-6)
    assert not torch.equal(module.student.distill_logit_scale, pre_step["distill_logit_scale"])


@pytest.mark.parametrize("order", ["before_step", "after_step"])
def test_model_ema_order_and_clamp(order):
    """The fairseq hooks: before_step averages the pre-step student (the reference), after_step the new one; both
    clamp the logit scales of student and teacher after the step."""
    from unilm_vl.models.cosmos import CosmosModel, CosmosModelConfig

    torch.manual_seed(0)
    model = CosmosModel(
        CosmosModelConfig(
            momentum_teacher=0.5,
            momentum_schedule="cosine",
            momentum_total_updates=4,
            ema_order=order,
            cross_attn_heads=4,
        )
    )
    net = model.net
    old_teacher = net.teacher.clip.visual.proj.detach().clone()
    pre_step = net.student.clip.visual.proj.detach().clone()
    net.student.clip.visual.proj.grad = torch.ones_like(pre_step)
    net.student.distill_logit_scale.grad = torch.tensor(-100.0)
    optimizer = torch.optim.SGD(net.student.parameters(), lr=1.0)
    m = cosine_momentum(2, 0.5, 4)  # 0.75
    model.before_optimizer_step(2)
    optimizer.step()
    model.after_optimizer_step(2)
    post_step = pre_step - 1.0
    torch.testing.assert_close(net.student.clip.visual.proj, post_step)
    source = pre_step if order == "before_step" else post_step
    torch.testing.assert_close(net.teacher.clip.visual.proj, m * old_teacher + (1 - m) * source, atol=1e-6, rtol=1e-6)
    assert net.student.distill_logit_scale.item() == pytest.approx(math.log(100.0))
    assert net.teacher.distill_logit_scale.item() <= math.log(100.0) + 1e-6


# ------------------------------------------------------------------------------------------------- 2 ranks
W, BL, D_IN, D = 2, 3, 6, 4
MODES = [(False, "full"), (True, "full"), (False, "own"), (True, "query")]  # (local_loss, gradient)


def _weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(D, D_IN, generator=g) for _ in range(4)]


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(v, W * BL, D_IN, generator=g) for v in (3, 4, 3, 4, 2, 2)]


def loss_and_grads(xs, rank=0, world=1, local_loss=False, gradient="full"):
    """Student features are linear maps of the inputs (so parameter gradients can be compared)."""
    params = [w.clone().requires_grad_(True) for w in _weights()]
    scale = torch.tensor(2.0, requires_grad=True)
    distill_scale = torch.tensor(3.0, requires_grad=True)
    w_img, w_txt, w_ic, w_tc = params
    x_img, x_txt, x_ic, x_tc, t_img, t_txt = xs
    norm = lambda x, w: F.normalize(x @ w.T, dim=-1)
    out = fc.cosmos_loss(
        norm(x_img, w_img),
        norm(x_txt, w_txt),
        norm(x_ic, w_ic),
        norm(x_tc, w_tc),
        norm(t_img, _weights()[0]),
        norm(t_txt, _weights()[1]),
        scale,
        distill_scale,
        rank=rank,
        world_size=world,
        local_loss=local_loss,
        gradient=gradient,
    )
    loss = sum(out.values())
    loss.backward()
    return loss.detach(), [p.grad for p in params + [scale, distill_scale]]


def _worker(rank, out_dir):
    local = slice(rank * BL, (rank + 1) * BL)
    xs = [x[:, local] for x in _global_batch()]
    results = {}
    for mode in MODES:
        loss, grads = loss_and_grads(xs, rank, W, *mode)
        dist.all_reduce(loss)
        for g in grads:  # DDP: average the gradients over ranks
            dist.all_reduce(g)
            g /= W
        results[mode] = (loss / W, grads)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "dist.pt"))
    dist.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_cosmos")
    run_ranks(_worker, (str(tmp),), world_size=W)
    return torch.load(tmp / "dist.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_two_rank_loss_equals_full_batch(two_ranks, mode):
    full_loss, full_grads = loss_and_grads(_global_batch())
    loss, grads = two_ranks[mode]
    assert loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
    local_loss, gradient = mode
    if gradient == "full":  # rank-averaged gradients equal the 1-process full-batch gradients
        for g2, g1 in zip(grads, full_grads):
            torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    elif gradient == "own":  # open_clip's gather without grad: each rank back-props its own rows, 1/W of the
        for g2, g1 in zip(grads[:4], full_grads[:4]):  # feature gradients; the scales see the full loss on each rank
            torch.testing.assert_close(g2, g1 / W, atol=1e-5, rtol=1e-4)
        for g2, g1 in zip(grads[4:], full_grads[4:]):
            torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    else:  # query side only, at every world size: equal to one process in the same mode, not to the full gradient
        _, query_grads = loss_and_grads(_global_batch(), gradient="query")
        for g2, g1 in zip(grads, query_grads):
            torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(grads[0], full_grads[0], atol=1e-4)
