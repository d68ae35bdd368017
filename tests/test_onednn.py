"""The oneDNN inference GEMMs of unilm_vl/modules/onednn.py: the same values as ``F.linear`` and
``nn.MultiheadAttention`` to float rounding where oneDNN runs, the parents' own code (bitwise, differentiable)
everywhere else, and a Kosmos-2 model that generates the same tokens with the path on and off."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unilm_vl.modules import onednn
from unilm_vl.modules.generation import SearchConfig, generate
from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

pytestmark = pytest.mark.skipif(not onednn.onednn_available(), reason="this torch build has no oneDNN linear op")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach oneDNN's op."""
    seen = []
    op = onednn._LINEAR

    def counted(*args):
        seen.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(onednn, "_LINEAR", counted)
    monkeypatch.setattr(onednn, "_ENABLED", True)
    return seen


@pytest.fixture
def everywhere(calls, monkeypatch):
    """Every fp32 GEMM without autograd takes oneDNN, however small (the tiny models' layers would not)."""
    monkeypatch.setattr(onednn, "MIN_WORK", 1)
    return calls


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(32, 256), (2, 16, 256), (16, 2, 256)], ids=["2d", "3d", "3d-transposed"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_f_linear(calls, shape, with_bias):
    """32 rows by a 256 x 256 weight: exactly MIN_WORK multiply-adds."""
    x = randn(*shape)
    if shape == (16, 2, 256):
        x = x.transpose(0, 1)  # a non-contiguous input
    weight, bias = randn(256, 256, seed=1), randn(256, seed=2) if with_bias else None
    with torch.no_grad():
        out = onednn.linear(x, weight, bias)
    assert len(calls) == 1
    assert out.shape == (*x.shape[:-1], 256)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_small_gemms_and_autograd_keep_f_linear(calls):
    """One row under MIN_WORK multiply-adds with a small weight, an input that needs a gradient, fp64, CPU autocast
    and the path switched off all give F.linear's result bitwise; a large weight takes oneDNN from one row."""
    weight, bias = randn(256, 256, seed=1), randn(256, seed=2)
    assert 32 * weight.numel() == onednn.MIN_WORK
    few = randn(31, 256)
    with torch.no_grad():
        assert torch.equal(onednn.linear(few, weight, bias), F.linear(few, weight, bias))
        double = randn(32, 256).double()
        assert torch.equal(onednn.linear(double, weight.double()), F.linear(double, weight.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            many = randn(32, 256)
            assert torch.equal(onednn.linear(many, weight, bias), F.linear(many, weight, bias))
        previous = onednn.set_onednn_enabled(False)
        try:
            assert torch.equal(onednn.linear(many, weight, bias), F.linear(many, weight, bias))
        finally:
            onednn.set_onednn_enabled(previous)
    assert calls == []
    x = randn(32, 256).requires_grad_()
    out = onednn.linear(x, weight, bias)
    assert calls == [] and torch.equal(out, F.linear(x, weight, bias))
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(32, 256))
    big = randn(onednn.MIN_WEIGHT // 64, 64, seed=3)
    with torch.no_grad():
        one_row = onednn.linear(randn(1, 64), big)
    assert len(calls) == 1
    torch.testing.assert_close(one_row, F.linear(randn(1, 64), big), rtol=1e-5, atol=1e-5)


def test_a_frozen_layer_takes_onednn_in_grad_mode_and_gradients_still_flow(everywhere):
    """A frozen layer under an input without grad (a frozen tower in training) runs oneDNN; a trainable layer
    after it keeps autograd and gets F.linear's gradient."""
    frozen, trained = nn.Linear(64, 64), nn.Linear(64, 8)
    frozen.requires_grad_(False)
    onednn.use_onednn(nn.Sequential(frozen, trained))
    x = randn(32, 64)
    hidden = frozen(x)
    assert len(everywhere) == 1 and not hidden.requires_grad
    trained(hidden).sum().backward()
    assert len(everywhere) == 1
    torch.testing.assert_close(trained.weight.grad, F.linear(x, frozen.weight, frozen.bias).sum(0).expand(8, 64))


def reference_attention(seed=0):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(64, 4, batch_first=True).eval()


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_attention_equals_nn_multihead_attention(everywhere, mask):
    """Self-attention over 2 x 20 tokens with no mask, an additive causal mask and a boolean one (True = masked)."""
    ref = reference_attention()
    ours = reference_attention()
    assert onednn.use_onednn(ours) == 1 and type(ours) is onednn.OneDnnMultiheadAttention
    x = randn(2, 20, 64)
    causal = torch.ones(20, 20, dtype=torch.bool).triu(1)
    attn_mask = {None: None, "bool": causal, "float": torch.zeros(20, 20).masked_fill(causal, float("-inf"))}[mask]
    with torch.no_grad():
        expected, _ = ref(x, x, x, need_weights=False, attn_mask=attn_mask)
        out, weights = ours(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None and len(everywhere) == 2  # the packed in-projection and the out-projection
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_other_calls_are_the_parent_forward(everywhere):
    """Weights asked for, a padding mask, cross-attention and training all run nn.MultiheadAttention's own code."""
    ref, ours = reference_attention(), reference_attention()
    onednn.use_onednn(ours)
    x, y = randn(2, 20, 64), randn(2, 7, 64, seed=1)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, -3:] = True
    with torch.no_grad():
        for kwargs, args in (
            ({"need_weights": True}, (x, x, x)),
            ({"need_weights": False, "key_padding_mask": pad}, (x, x, x)),
            ({"need_weights": False}, (x, y, y)),
        ):
            out, weights = ours(*args, **kwargs)
            expected, expected_weights = ref(*args, **kwargs)
            assert torch.equal(out, expected)
            assert (weights is None) == (expected_weights is None)
    assert everywhere == []


def test_use_onednn_keeps_state_dicts_and_skips_subclasses():
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2))
    keys = list(model.state_dict())
    assert onednn.use_onednn(model) == 3
    assert list(model.state_dict()) == keys
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # used through its weight
    assert onednn.use_onednn(model) == 0  # already switched


def test_kosmos2_generates_the_same_tokens_with_onednn_on_and_off(everywhere):
    """A tiny random Kosmos-2 whose vision tower, connector, decoder layers and vocabulary projection all run
    through oneDNN: the same greedy and beam tokens as with the path off, and prompt logits equal to float
    rounding."""
    calls = everywhere
    torch.manual_seed(0)
    model = Kosmos2Module(kosmos2_tiny_config()).eval()
    assert isinstance(model.decoder.output_projection, onednn.OneDnnLinear)
    assert isinstance(model.vision.visual.transformer.resblocks[0].attn, onednn.OneDnnMultiheadAttention)
    L = model.num_image_tokens
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat(
        [torch.tensor([[0, 5]] * 8), torch.arange(6, 6 + L).expand(8, L), torch.tensor([[4]] * 8)], dim=1
    )
    tokens = torch.cat([tokens, torch.randint(10, 100, (8, 4), generator=g)], dim=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 2 : 2 + L] = True
    image = torch.randn(8, 3, 32, 32, generator=g)
    outputs = {}
    for enabled in (True, False):
        previous = onednn.set_onednn_enabled(enabled)
        try:
            with torch.no_grad():
                logits = model(tokens, image, mask)["lm_logits"]
                hyps = [
                    [h[0].tokens.tolist() for h in generate(model, tokens, image, mask, search, pad_idx=1, eos_idx=2)]
                    for search in (SearchConfig(beam=1, max_len_b=6), SearchConfig(beam=3, max_len_b=6))
                ]
        finally:
            onednn.set_onednn_enabled(previous)
        outputs[enabled] = (logits, hyps)
        if enabled:
            assert len(calls) > 0
            used = len(calls)
    assert len(calls) == used  # nothing reached oneDNN while it was off
    torch.testing.assert_close(outputs[True][0], outputs[False][0], rtol=1e-4, atol=1e-4)
    assert outputs[True][1] == outputs[False][1]
