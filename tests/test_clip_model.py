"""Tiny-config forwards of the clip model, local pretrained weights, clear errors, and correlative self-attention."""

import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY

from unilm_vl.models.clip import ClipConfig, ClipModel
from unilm_vl.modules.clip import ClipModule, ClipTowersConfig, correlative_self_attention, csa_last_block


def build(arch, **overrides):
    from argparse import Namespace

    args = Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return ClipModel(ClipConfig(**vars(args)))


@pytest.mark.parametrize("arch, size, dim, ctx", [("clip_tiny", 64, 64, 32), ("clip_small", 96, 256, 77)])
def test_forward_shapes_and_normalisation(arch, size, dim, ctx):
    torch.manual_seed(0)
    model = build(arch).eval()
    assert (model.image_size, model.context_length) == (size, ctx)
    out = model(torch.randn(3, 3, size, size), torch.randint(1, 49000, (3, ctx)))
    assert out["image_features"].shape == out["text_features"].shape == (3, dim)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = ClipModule(ClipTowersConfig())
    with torch.no_grad():
        source.clip.logit_scale.fill_(3.0)
    path = tmp_path / "tiny.pt"
    torch.save(source.clip.state_dict(), path)
    torch.manual_seed(2)  # a different random init, then overwritten by the file
    loaded = build("clip_tiny", pretrained=str(path))
    for key, value in source.clip.state_dict().items():
        torch.testing.assert_close(loaded.towers.clip.state_dict()[key], value, msg=key)
    assert loaded.logit_scale_value() == pytest.approx(torch.tensor(3.0).exp().item())


def test_clear_errors():
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build("clip_tiny", pretrained="/nowhere/missing.pt")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        ClipModule(ClipTowersConfig(model_name="ViT-Nope"))


def test_correlative_self_attention_equals_twice_attention_when_q_equals_k():
    # with W_q = W_k (and equal biases) q q^T = q k^T, so CSA's weights are 2 x softmax(q k^T / sqrt d):
    # CSA(x) = out_proj(2 A v) = 2 MHA(x) - out_proj.bias
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight[16:32] = attn.in_proj_weight[:16]
        attn.in_proj_bias.normal_()
        attn.in_proj_bias[16:32] = attn.in_proj_bias[:16]
        attn.out_proj.bias.normal_()
    x = torch.randn(2, 5, 16)
    expected = 2 * attn(x, x, x, need_weights=False)[0] - attn.out_proj.bias
    torch.testing.assert_close(correlative_self_attention(x, attn), expected, rtol=1e-5, atol=1e-5)


def test_csa_last_block_changes_only_inside_the_context():
    torch.manual_seed(0)
    model = ClipModule(ClipTowersConfig()).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, plain = model.encode_image_dense(image)
        with csa_last_block(model):
            _, csa = model.encode_image_dense(image)
        _, after = model.encode_image_dense(image)
        # by hand: the first block as is, the last with x + CSA(ln_1 x) then its MLP residual
        visual = model.clip.visual
        blocks = visual.transformer.resblocks
        hook = {}
        handle = blocks[-1].register_forward_pre_hook(lambda m, a: hook.setdefault("x", a[0]))
        model.encode_image_dense(image)
        handle.remove()
        x = hook["x"]
        x = x + correlative_self_attention(blocks[-1].ln_1(x), blocks[-1].attn)
        x = x + blocks[-1].mlp(blocks[-1].ln_2(x))
        by_hand = visual.ln_post(x)[:, 1:] @ visual.proj
    torch.testing.assert_close(after, plain)
    torch.testing.assert_close(csa, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(csa, plain, atol=1e-3)
    with pytest.raises(TypeError, match="no open_clip VisionTransformer"):
        with csa_last_block(torch.nn.Linear(2, 2)):
            pass
