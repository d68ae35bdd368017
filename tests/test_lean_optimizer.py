"""unilm_vl/trainer.py ``_lean_fp32_optimizer``: fairseq's fp32 ``adam`` with a foreach update, a foreach gradient
norm and no multiplication by 1 gives bit-identical parameters, moments and gradient norms to fairseq's own loop."""

import pytest
import torch
from fairseq import utils as fairseq_utils
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

from unilm_vl.trainer import _lean_fp32_optimizer, adam_denominators


class Net(torch.nn.Module):
    """Linear-LayerNorm-Linear, plus an embedding whose rows 4-9 never get a gradient (their exp_avg_sq stays 0)
    and a scalar whose gradient is about 1e-21 (its exp_avg_sq is denormal)."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
        self.embed = torch.nn.Embedding(10, 5)
        self.faint = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        tokens = torch.arange(x.size(0)) % 4
        return self.mlp(x + self.embed(tokens)) + self.faint * 1e-21


def build(lean, amsgrad=False, eps=1e-6):
    torch.manual_seed(0)
    model = Net()
    cfg = FairseqAdamConfig(lr=[1e-2], adam_betas="(0.9, 0.98)", adam_eps=eps, weight_decay=0.2)
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
@pytest.mark.parametrize("eps", [1e-6, 1e-8, 1e-12])  # 1e-12: too small for the zero-safe square root
def test_lean_adam_is_bit_identical_to_fairseq(clip, amsgrad, eps):
    (m1, o1), (m2, o2) = build(False, amsgrad, eps), build(True, amsgrad, eps)
    initial = [p.detach().clone() for p in m1.parameters()]
    n1, n2 = train(m1, o1, clip=clip), train(m2, o2, clip=clip)
    assert all(torch.equal(a, b) for a, b in zip(n1, n2))
    assert n1[0] > 0.5  # with clip 0.5 the gradients really were clipped
    second = o1.optimizer.state[m1.embed.weight]["exp_avg_sq"]
    assert torch.all(second[4:] == 0) and torch.all(second[:4] > 0)  # the zero entries the lean step special-cases
    faint = o1.optimizer.state[m1.faint]["exp_avg_sq"]
    assert 0 < float(faint) < torch.finfo(torch.float32).tiny  # a denormal second moment
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


@pytest.mark.parametrize("eps", [1e-6, 1e-8, 2e-11, 1e-11, 1e-12, 0.0])
def test_adam_denominators_equal_the_plain_root_bitwise(eps):
    """Zeros, denormals, the smallest normal and ordinary second moments: sqrt(v) + eps to the bit, for eps on both
    sides of the zero-safe root's limit (1e-12 would differ if it took the clamped root: sqrt(tiny) ~ 1.1e-19 is
    above half an ulp of 1e-12)."""
    tiny = torch.finfo(torch.float32).tiny
    v = torch.tensor([0.0, 1e-45, 3e-42, 1e-39, tiny, 2 * tiny, 1e-30, 1e-20, 1e-12, 3.7e-7, 1.0, 5e3])
    table = torch.zeros(4096)  # one long all-zero tensor, as an unreached embedding
    got = adam_denominators([v, table], eps)
    assert torch.equal(got[0], v.sqrt().add_(eps)) and torch.equal(got[1], table.sqrt().add_(eps))
