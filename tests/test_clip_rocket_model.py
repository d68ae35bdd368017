"""clip_rocket: projections moved out of the open_clip towers keep open_clip's features exactly; views go
through the l2l heads; logit scales clamp; the multi-view task batch feeds it."""

import math
from argparse import Namespace

import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY

from unilm_vl.models.clip_rocket import ClipRocketModel, ClipRocketModelConfig
from unilm_vl.modules.clip import ClipTowersConfig, build_open_clip


def build(**overrides):
    args = Namespace(**overrides)
    ARCH_CONFIG_REGISTRY["clip_rocket_tiny"](args)
    return ClipRocketModel(ClipRocketModelConfig(**vars(args)))


def test_global_features_equal_open_clip_and_export_roundtrips():
    torch.manual_seed(0)
    reference = build_open_clip(ClipTowersConfig())
    torch.manual_seed(0)
    model = build().eval()
    image, text = torch.randn(2, 3, 64, 64), torch.randint(1, 4000, (2, 32))
    torch.testing.assert_close(model.encode_image(image), reference.encode_image(image, normalize=True))
    torch.testing.assert_close(model.encode_text(text), reference.encode_text(text, normalize=True))
    exported = model.net.open_clip_state_dict()
    assert exported.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(exported[key], value, msg=key)


def test_views_and_scales():
    model = build().train()
    out = model(
        torch.randn(3, 3, 64, 64),
        torch.randint(1, 4000, (3, 32)),
        torch.randn(2, 3, 3, 64, 64),
        torch.randint(1, 4000, (2, 3, 32)),
    )
    assert out["image_views"].shape == out["text_views"].shape == (2, 3, 64)  # l2l_dim of the tiny arch
    torch.testing.assert_close(out["image_views"].norm(dim=-1), torch.ones(2, 3))
    assert out["l2l_logit_scale"].item() == pytest.approx(10.0, rel=1e-5)  # ln(1/0.1) init
    with torch.no_grad():
        model.net.logit_scale.fill_(9.0)
        model.net.l2l_logit_scale.fill_(-1.0)
    model.after_optimizer_step(1)
    assert model.net.logit_scale.item() == pytest.approx(math.log(100)) and model.net.l2l_logit_scale.item() == 0.0


def test_without_separate_proj_views_share_the_clip_projectors():
    model = build(separate_proj=False).eval()
    image = torch.randn(2, 3, 64, 64)
    out = model(image, torch.randint(1, 4000, (2, 32)), image.unsqueeze(0), torch.randint(1, 4000, (1, 2, 32)))
    torch.testing.assert_close(out["image_views"][0], out["image_features"])
    assert not any("l2l" in name for name, _ in model.named_parameters())


def build_arch(arch, **overrides):
    args = Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return ClipRocketModel(ClipRocketModelConfig(**vars(args)))


def batch(b=4, a=2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 3, 64, 64, generator=g),
        torch.randint(1, 4000, (b, 32), generator=g),
        torch.randn(a, b, 3, 64, 64, generator=g),
        torch.randint(1, 4000, (a, b, 32), generator=g),
    )


def test_view_heads_keep_per_view_batch_statistics():
    model = build_arch("clip_rocket_barlip_tiny").train()
    image, text, image_views, text_views = batch()
    out = model(image, text, image_views, text_views)
    net = model.net
    pooled = net.image_pooled(image_views[1])
    torch.testing.assert_close(
        out["image_views"][1], torch.nn.functional.normalize(net.l2l_image_projector(pooled), dim=-1)
    )
    torch.testing.assert_close(out["ssl_image_views"][1], net.ssl_heads.image_projector(pooled))
    # the BarLIP heads end in an affine BatchNorm: each view's features are standardised over its batch
    torch.testing.assert_close(out["ssl_image_views"][0].mean(0), torch.zeros(256), atol=1e-5, rtol=0)


def test_siamlip_heads_shapes_and_separate_child():
    shared = build_arch("clip_rocket_siamlip_tiny")
    child = build_arch("clip_rocket_siamlip_tiny", separate_proj_child=True)
    assert shared.net.ssl_view_heads is shared.net.ssl_heads
    n_shared = sum(p.numel() for p in shared.parameters())
    n_child = sum(p.numel() for p in child.parameters())
    assert n_child - n_shared == sum(p.numel() for p in child.net.ssl_heads.parameters())
    last = shared.net.ssl_heads.image_projector[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine  # reference: BN(128, affine=False)
    no_bn = build_arch("clip_rocket_siamlip_tiny", siamlip_no_last_bn=True)
    assert isinstance(no_bn.net.ssl_heads.image_projector[-1], torch.nn.Linear)
    out = shared.train()(*batch())
    assert out["pred_image"].shape == out["ssl_text"].shape == (4, 32)
    assert out["pred_text_views"].shape == (2, 4, 32)


def test_byolip_momentum_copy_targets_and_ema():
    model = build_arch("clip_rocket_byolip_tiny", momentum_tau=0.9).train()
    twin = model.net.momentum_net
    assert twin is not None and twin.momentum_net is None
    assert not any(p.requires_grad for p in twin.parameters())
    out = model(*batch())
    # at init the copy equals the online model: the targets equal the online projector outputs, without gradient
    torch.testing.assert_close(out["target_text"], out["ssl_text"].detach())
    assert not out["target_text"].requires_grad and out["ssl_text"].requires_grad
    online = dict(model.net.online_parameters())
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    with torch.no_grad():
        for p in online.values():
            p.add_(1.0)
    model.after_optimizer_step(1)
    for name, p in twin.named_parameters():
        expected = 0.9 * before[name] + 0.1 * online[name].detach()
        torch.testing.assert_close(p, expected, msg=name)
    with pytest.raises(ValueError, match="SiamLIP heads"):
        build_arch("clip_rocket_barlip_tiny", momentum=True)


def test_l2l_head_encoders_for_zero_shot():
    model = build().eval()
    image, text = batch()[:2]
    net = model.net
    torch.testing.assert_close(
        model.encode_image_l2l(image),
        torch.nn.functional.normalize(net.l2l_image_projector(net.image_pooled(image)), dim=-1),
    )
    assert model.encode_text_l2l(text).shape == (4, 64) and model.has_l2l_head
    plain = build(separate_proj=False)
    assert not plain.has_l2l_head
    with pytest.raises(ValueError, match="no l2l heads"):
        plain.encode_image_l2l(image)
    from unilm_vl.eval.common import FairseqContrastiveEncoder

    with pytest.raises(ValueError, match="no l2l head"):
        FairseqContrastiveEncoder(plain, task=None, head="l2l")
