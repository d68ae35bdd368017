"""LoRA for open_clip towers (FSC-CLIP, ytaek-oh/fsc-clip src/training/models/lora_utils/): targets, init values, frozen
parameters, merge into a plain open_clip state dict, and WiSE-FT interpolation."""

import copy

import open_clip
import pytest
import torch

import unilm_vl.modules.clip  # noqa: F401  (registers unilm-vl-clip-tiny)
from unilm_vl.modules.lora import (
    LoraConfig,
    LoraConv2d,
    LoraLinear,
    LoraMultiheadAttention,
    apply_lora,
    mark_only_lora_as_trainable,
    merge_lora_state_dict,
)
from unilm_vl.wise_ft import wise_ft_state_dict

NAME = "unilm-vl-clip-tiny"


def tiny(seed=0):
    torch.manual_seed(seed)
    return open_clip.create_model(NAME, pretrained=None).eval()


def inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 64, 64, generator=g), torch.randint(1, 400, (2, 32), generator=g)


def outputs(model):
    image, text = inputs()
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


def lora_model(zero_init=False, seed=0):
    model = tiny(seed)
    torch.manual_seed(1)
    replaced = apply_lora(model, LoraConfig(rank=4, alpha=1.0, zero_init=zero_init))
    return model, replaced


def test_targets_are_mlp_linears_patch_conv_and_every_attention():
    model, replaced = lora_model()
    kinds = sorted(replaced.values())
    # 2 visual + 2 text blocks: 4 attentions, 8 MLP linears (c_fc, c_proj), the patch embedding
    assert kinds.count("attention") == 4 and kinds.count("linear") == 8 and kinds.count("conv2d") == 1
    assert all(name.endswith(("mlp.c_fc", "mlp.c_proj")) for name, k in replaced.items() if k == "linear")
    assert replaced["visual.conv1"] == "conv2d"
    assert isinstance(model.transformer.resblocks[0].attn, LoraMultiheadAttention)
    assert isinstance(model.transformer.resblocks[0].attn.out_proj, LoraLinear)


def test_only_lora_tensors_are_trainable():
    model, _ = lora_model()
    count = mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    # per attention: in-proj A/B + out_proj A/B; per linear and the conv: A/B
    assert count == len(trainable) == 4 * 4 + 8 * 2 + 2
    assert not model.logit_scale.requires_grad and not model.visual.class_embedding.requires_grad


def test_init_values_scaling_and_conv_shapes():
    model, _ = lora_model()
    mlp = model.visual.transformer.resblocks[0].mlp.c_fc
    conv = model.visual.conv1
    attn = model.visual.transformer.resblocks[0].attn
    assert mlp.scaling == conv.scaling == attn.scaling == 0.25  # alpha / r = 1 / 4
    assert torch.count_nonzero(mlp.lora_B) == 0 and torch.count_nonzero(mlp.lora_A) > 0
    assert torch.count_nonzero(attn.out_proj.delta_weight()) == 0
    assert isinstance(conv, LoraConv2d)
    # A: (r k) x (C_in k), B: (C_out k) x (r k), the delta reshaped to the kernel (k = 8, width 128)
    assert conv.lora_A.shape == (4 * 8, 3 * 8) and conv.lora_B.shape == (128 * 8, 4 * 8)
    assert conv.delta_weight().shape == conv.weight.shape == (128, 3, 8, 8)
    assert torch.count_nonzero(conv.delta_weight()) == 0
    # the reference's quirk: in-proj A and B both xavier-uniform, so its delta 0.25 B A is non-zero at init
    torch.testing.assert_close(attn.delta_weight(), 0.25 * attn.lora_B @ attn.lora_A)
    assert attn.lora_A.shape == (4, 128) and attn.lora_B.shape == (3 * 128, 4)
    assert attn.delta_weight().abs().max() > 1e-3
    bound = (6 / (4 + 3 * 128)) ** 0.5  # xavier-uniform bound of B
    assert attn.lora_B.abs().max() <= bound


def test_default_init_changes_outputs_zero_init_does_not():
    base = outputs(tiny())
    quirk = outputs(lora_model()[0])
    fixed = outputs(lora_model(zero_init=True)[0])
    for a, b in zip(fixed, base):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # functional vs fused attention: rounding only
    assert (quirk[0] - base[0]).abs().max() > 1e-4


def perturbed_lora_model():
    model, _ = lora_model()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_merged_state_dict_loads_into_plain_open_clip_with_the_same_outputs():
    model = perturbed_lora_model()
    merged = merge_lora_state_dict(model.state_dict(), alpha=1.0)
    assert not any("lora_" in k for k in merged)
    plain = tiny(seed=3)
    plain.load_state_dict(merged)  # strict: exactly open_clip's keys
    for a, b in zip(outputs(plain), outputs(model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_wise_ft_of_lora_interpolates_only_lora_tensors_towards_zero():
    model = perturbed_lora_model()
    state = model.state_dict()
    zero = wise_ft_state_dict(state, None, 0.0)
    half = wise_ft_state_dict(state, None, 0.5)
    one = wise_ft_state_dict(state, None, 1.0)
    key = "visual.transformer.resblocks.0.attn.lora_B"
    torch.testing.assert_close(half[key], 0.5 * state[key], atol=0, rtol=0)
    torch.testing.assert_close(half["visual.conv1.weight"], state["visual.conv1.weight"], atol=0, rtol=0)
    plain = tiny(seed=3)
    plain.load_state_dict(merge_lora_state_dict(zero, 1.0))  # every delta 0: the pretrained towers
    for a, b in zip(outputs(plain), outputs(tiny())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for k in state:
        torch.testing.assert_close(one[k], state[k], atol=0, rtol=0)


def test_wise_ft_of_full_fine_tuning_is_the_weight_average():
    theta0 = tiny(0).state_dict()
    theta1 = tiny(1).state_dict()
    key = "text_projection"
    half = wise_ft_state_dict(theta1, theta0, 0.5)
    torch.testing.assert_close(half[key], (theta0[key] + theta1[key]) / 2, atol=1e-7, rtol=0)
    for alpha, ref in [(0.0, theta0), (1.0, theta1)]:
        out = wise_ft_state_dict(theta1, theta0, alpha)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-7, rtol=0)
    broken = dict(theta0)
    broken.pop(key)
    with pytest.raises(ValueError, match="differ"):
        wise_ft_state_dict(theta1, broken, 0.5)


def test_lora_gradients_reach_only_lora_tensors():
    model, _ = lora_model()
    mark_only_lora_as_trainable(model)
    image, text = inputs()
    loss = model.encode_image(image).sum() + model.encode_text(text).sum()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    # with B = 0 the MLP's A gets no gradient yet but its B does
    mlp = model.visual.transformer.resblocks[0].mlp.c_fc
    assert mlp.lora_B.grad.abs().max() > 0 and mlp.lora_A.grad.abs().max() == 0


def test_apply_twice_and_bad_rank_raise():
    model, _ = lora_model()
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="rank"):
        apply_lora(copy.deepcopy(tiny()), LoraConfig(rank=0))
