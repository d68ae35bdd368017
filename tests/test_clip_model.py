"""Tiny-config forwards of the clip model, local pretrained weights, and clear errors."""
import pytest
import torch
from fairseq.models import ARCH_CONFIG_REGISTRY

from unilm_vl.models.clip import ClipConfig, ClipModel
from unilm_vl.modules.clip import ClipModule, ClipTowersConfig


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
