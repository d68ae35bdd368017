"""CLIP loss against values computed with open_clip's ``ClipLoss`` (``mlfoundations/open_clip``
``src/open_clip/loss.py``) and by hand, and its invariances."""

import math

import pytest
import torch
import torch.nn.functional as F

from unilm_vl.losses.clip import clip_loss, contrastive_accuracy

I = torch.eye(2)
T = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
A = math.log(1 + math.exp(-1))  # 0.3132617
B = math.log(1 + math.exp(0.2))  # 0.7981389


def loss(img, txt, scale, **kw):
    return clip_loss(img, txt, torch.tensor(float(scale)), **kw)["clip_loss"].item()


def test_reference_values():
    assert loss(I, I, 1) == pytest.approx(0.313262, abs=1e-5) == pytest.approx(A, abs=1e-6)
    assert loss(I, T, 1) == pytest.approx(0.798139, abs=1e-5) == pytest.approx(B, abs=1e-6)
    assert loss(I, I, 100) == 0.0  # ln(1 + e^-100) underflows in float32
    assert loss(T, I, 1) == pytest.approx(loss(I, T, 1), abs=1e-7)  # symmetric in image/text


def test_invariances_and_matches_open_clip():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    ref = loss(img, txt, 14.3)
    perm = torch.randperm(6, generator=g)
    assert loss(img[perm], txt[perm], 14.3) == pytest.approx(ref, abs=1e-6)
    scaled = F.normalize(3.7 * img, dim=-1)
    assert loss(scaled, txt, 14.3) == pytest.approx(ref, abs=1e-6)
    assert ClipLoss()(img, txt, torch.tensor(14.3)).item() == pytest.approx(ref, abs=1e-6)


def test_batch_size_change_uses_fresh_labels():
    g = torch.Generator().manual_seed(1)
    x4 = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    y4 = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    first = loss(x4, y4, 5)
    second = loss(x4[:3], y4[:3], 5)
    logits = 5 * x4[:3] @ y4[:3].T
    labels = torch.arange(3)
    fresh = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item()
    assert second == pytest.approx(fresh, abs=1e-6) and first != pytest.approx(second)


def test_label_smoothing_closed_form():
    # with I, s=1: each row's logits are [1, 0]; smoothed targets [1-e/2, e/2]
    eps = 0.1
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = -((1 - eps / 2) * p[0].log() + (eps / 2) * p[1].log()).item()
    assert loss(I, I, 1, label_smoothing=eps) == pytest.approx(expected, abs=1e-6)


def test_logit_scale_clamped_after_step():
    from unilm_vl.modules.clip import ClipModule, ClipTowersConfig

    module = ClipModule(ClipTowersConfig())
    opt = torch.optim.SGD([module.clip.logit_scale], lr=1.0)
    module.clip.logit_scale.grad = torch.tensor(-1e4)  # a huge step upwards
    opt.step()
    module.clamp_logit_scale()
    assert module.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_contrastive_accuracy():
    # sim = I @ txt.T: image rows [1,1,0] (tie -> first, correct), [0,.1,0], [0,0,1] are all right;
    # text 1 scores 1.0 with image 0 and 0.1 with image 1, so one text of three is wrong
    acc = contrastive_accuracy(torch.eye(3), torch.tensor([[1.0, 0, 0], [1.0, 0.1, 0], [0, 0, 1.0]]))
    assert acc["i2t_acc"].item() == 1.0 and acc["t2i_acc"].item() == pytest.approx(2 / 3)
