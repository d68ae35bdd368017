"""unilm_vl/trainer.py ``_lean_fp32_optimizer``: fairseq's fp32 ``adam`` with a foreach update, a foreach gradient
norm and no multiplication by 1 gives bit-identical parameters, moments and gradient norms to fairseq's own loop."""

import pytest
import torch
from fairseq import utils as fairseq_utils
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

from unilm_vl.trainer import _lean_fp32_optimizer


def build(lean, amsgrad=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    cfg = FairseqAdamConfig(lr=[1e-2], adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.2)
    optimizer = FairseqAdam(cfg, list(model.parameters()))
    optimizer.optimizer.param_groups[0]["amsgrad"] = amsgrad  # not a fairseq flag; the foreach step falls back
    if lean:
        _lean_fp32_optimizer(optimizer)
    return model, optimizer


def train(model, optimizer, steps=3, clip=0.0):
    norms = []
    for step in range(steps):
        optimizer.zero_grad()
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).sum().mul(10).backward()
        optimizer.multiply_grads(1.0)
        norms.append(optimizer.clip_grad_norm(clip))
        optimizer.step()
    return norms


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_lean_adam_is_bit_identical_to_fairseq(clip, amsgrad):
    (m1, o1), (m2, o2) = build(False, amsgrad), build(True, amsgrad)
    initial = [p.detach().clone() for p in m1.parameters()]
    n1, n2 = train(m1, o1, clip=clip), train(m2, o2, clip=clip)
    assert all(torch.equal(a, b) for a, b in zip(n1, n2))
    assert n1[0] > 0.5  # with clip 0.5 the gradients really were clipped
    for p1, p2, p0 in zip(m1.parameters(), m2.parameters(), initial):
        assert torch.equal(p1, p2) and not torch.equal(p1, p0)
        s1, s2 = o1.optimizer.state[p1], o2.optimizer.state[p2]
        assert s1["step"] == s2["step"] == 3
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])


def test_lean_gradient_norm_equals_fairseq_and_multiply_by_one_is_skipped():
    model, optimizer = build(True)
    model(torch.randn(2, 5)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = fairseq_utils.clip_grad_norm_(list(model.parameters()), 0.0)
    assert torch.equal(optimizer.clip_grad_norm(0.0), expected)
    optimizer.multiply_grads(1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    optimizer.multiply_grads(0.5)
    assert all(torch.equal(p.grad, g * 0.5) for p, g in zip(model.parameters(), grads))


def test_only_fairseqs_plain_adam_is_changed():
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    step = sgd.step
    _lean_fp32_optimizer(sgd)
    assert sgd.step == step
