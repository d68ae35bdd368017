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
    out = model(torch.randn(3, 3, 64, 64), torch.randint(1, 4000, (3, 32)),
                torch.randn(2, 3, 3, 64, 64), torch.randint(1, 4000, (2, 3, 32)))
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
