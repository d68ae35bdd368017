"""clip-rocket loss maths against values computed with the reference's ``losses.py``
(``facebookresearch/clip-rocket``) and by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from unilm_vl.losses import rocket as fn
from unilm_vl.losses.clip import clip_loss
from unilm_vl.losses.ema import ema_update_

I = torch.eye(2)
T = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
ONE = torch.tensor(1.0)


def cl2l(reduction, eps, image_views=None, h_scale=ONE):
    views = torch.stack([I, I])
    out = fn.cl2l_loss(
        I,
        I,
        ONE,
        views if image_views is None else image_views,
        views,
        h_scale,
        label_smoothing=eps,
        reduction=reduction,
    )
    return out


@pytest.mark.parametrize(
    "reduction,eps,expected",
    [("avg", 0.0, 0.313262), ("avg", 0.1, 0.346595), ("sum", 0.0, 0.626523), ("sum", 0.1, 0.693190)],
)
def test_cl2l_reference_values(reduction, eps, expected):
    assert cl2l(reduction, eps)["clip_loss"].item() == pytest.approx(expected, abs=1e-5)


def test_cl2l_asymmetric_views_and_smoothing_only_on_local_terms():
    out = cl2l("sum", 0.1, image_views=torch.stack([I, T]))
    assert out["clip_loss"].item() == pytest.approx(0.976441, abs=1e-5)
    assert out["clip_loss_image_local"].item() == pytest.approx(0.5757, abs=1e-4)
    # the global terms carry no smoothing: ln(1 + e^-1) whatever eps
    assert out["global_loss"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # without views only the global terms remain, and label smoothing does not change them
    no_views = fn.cl2l_loss(I, I, ONE, label_smoothing=0.1)
    assert no_views["clip_loss"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_cl2l_global_terms_equal_the_clip_loss():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    s = torch.tensor(7.0)
    assert fn.cl2l_loss(img, txt, s)["clip_loss"].item() == pytest.approx(
        clip_loss(img, txt, s)["clip_loss"].item(), abs=1e-6
    )


def test_cl2l_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="avg"):
        fn.cl2l_loss(I, I, ONE, reduction="mean")


def test_barlow_twins_reference_values():
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    z2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert fn.barlow_twins_loss(z, z).item() == pytest.approx(2.5e-4, abs=1e-9)  # C = all ones
    assert fn.barlow_twins_loss(z, z2).item() == pytest.approx(0.10025, abs=1e-7)
    w = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert fn.barlow_twins_loss(w, w).item() == pytest.approx(0.0, abs=1e-9)  # whitened: C = I


def test_barlip_averages_global_and_all_view_pairs():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    iv, tv = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    terms = [fn.barlow_twins_loss(img, txt)] + [fn.barlow_twins_loss(iv[a], tv[b]) for a in range(2) for b in range(2)]
    assert fn.barlip_loss(img, txt, iv, tv).item() == pytest.approx(sum(t.item() for t in terms) / 5, abs=1e-7)


def test_simsiam_distance_values_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert fn.simsiam_distance(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert fn.simsiam_distance(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    assert fn.simsiam_distance(p, p.flip(1)).item() == pytest.approx(2.0, abs=1e-6)  # orthogonal rows
    v = torch.randn(2, 2, requires_grad=True)
    pp = torch.randn(2, 2, requires_grad=True)
    d = fn.simsiam_distance(pp, v)
    assert d.item() == pytest.approx(fn.simsiam_distance(pp, 5.0 * v).item(), abs=1e-6)
    d.backward()
    assert v.grad is None and pp.grad is not None and pp.grad.abs().sum() > 0


def test_siamlip_is_the_mean_of_cross_modal_terms():
    g = torch.Generator().manual_seed(4)
    p_i, p_t, v_i, v_t = (torch.randn(3, 5, generator=g) for _ in range(4))
    pv_i, pv_t, vv_i, vv_t = (torch.randn(2, 3, 5, generator=g) for _ in range(4))
    d = fn.simsiam_distance
    terms = [d(p_i, v_t), d(p_t, v_i)]
    terms += [d(pv_i[a], vv_t[b]) for a in range(2) for b in range(2)]
    terms += [d(pv_t[a], vv_i[b]) for a in range(2) for b in range(2)]
    got = fn.siamlip_loss(p_i, p_t, v_i, v_t, pv_i, pv_t, vv_i, vv_t)
    assert got.item() == pytest.approx(sum(t.item() for t in terms) / 10, abs=1e-6)
    assert fn.siamlip_loss(p_i, p_t, p_t, p_i).item() == pytest.approx(0.0, abs=1e-6)


def test_sinkhorn_reference_values():
    q = fn.sinkhorn_knopp(I)
    assert q.diagonal().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert q[0, 1].item() == pytest.approx(2.06e-9, rel=0.02)
    assert fn.sinkhorn_knopp(torch.full((2, 2), 0.3)).flatten().tolist() == pytest.approx([0.5] * 4, abs=1e-7)
    assert fn.sinkhorn_knopp(torch.full((3, 4), -0.2)).flatten().tolist() == pytest.approx([0.25] * 12, abs=1e-7)
    s = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.2, 0.3]])
    expected = [[0.375146, 0.618496, 0.006358], [0.284459, 7.8e-6, 0.715533]]
    got = fn.sinkhorn_knopp(s)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(2), atol=1e-6, rtol=0)


def test_swalip_reference_value_and_total():
    views = torch.stack([I, I])
    hs = torch.tensor(10.0)
    sw = fn.swalip_loss(views, views, hs)
    assert sw.item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)  # 4.5e-5
    total = 0.2 * sw + fn.cl2l_loss(I, I, ONE, views, views, hs, reduction="avg")["clip_loss"]
    assert total.item() == pytest.approx(0.104460, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        fn.swalip_loss(I[None], I[None], hs)


def test_swalip_targets_come_from_the_other_view_pair():
    g = torch.Generator().manual_seed(5)
    iv = F.normalize(torch.randn(2, 4, 3, generator=g), dim=-1)
    tv = F.normalize(torch.randn(2, 4, 3, generator=g), dim=-1)
    hs = torch.tensor(3.0)

    def h(q, z):
        return -(q * F.log_softmax(z, -1)).sum(-1).mean()

    total = 0.0
    for a in range(2):
        for b in range(2):
            q_i = fn.sinkhorn_knopp(iv[1 - a] @ tv[1 - b].T)
            q_t = fn.sinkhorn_knopp(tv[1 - a] @ iv[1 - b].T)
            total += 0.5 * (h(q_i, hs * iv[a] @ tv[b].T) + h(q_t, hs * tv[a] @ iv[b].T)).item()
    assert fn.swalip_loss(iv, tv, hs).item() == pytest.approx(total / 4, abs=1e-6)


def test_ema_update():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    online = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]])]
    ema_update_(target, online, 0.99)
    assert target[0].tolist() == pytest.approx([0.99 + 0.03, 1.98], abs=1e-6)
    assert target[1].item() == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="as many"):
        ema_update_(target, online[:1], 0.99)
