"""Optimizer open_clip_adamw: open_clip's weight-decay exclusion on named parameters, one step equal to
torch.optim.AdamW with the same groups, and a fairseq-train run that keeps the groups through save and resume."""

from types import SimpleNamespace

import torch
from test_train_e2e import BIN, data, run, train_args  # noqa: F401  (data: the module's wds fixture)

from unilm_vl.modules.clip import ClipModule, ClipTowersConfig
from unilm_vl.optim.open_clip_adamw import (
    OpenClipAdamW,
    excluded_from_weight_decay,
    tag_parameter_names,
    weight_decay_groups,
)


def test_exclusion_rule_of_open_clip():
    w, v = torch.zeros(3, 3), torch.zeros(3)
    assert not excluded_from_weight_decay("visual.conv1.weight", torch.zeros(2, 3, 4, 4))
    assert not excluded_from_weight_decay("visual.positional_embedding", w)  # 2-D: decayed, as in open_clip
    assert not excluded_from_weight_decay("token_embedding.weight", w)
    for name, p in [
        ("visual.ln_post.weight", v),
        ("transformer.resblocks.0.ln_1.weight", v),
        ("visual.class_embedding", v),
        ("attn.in_proj_bias", v),
        ("mlp.c_fc.bias", v),
        ("logit_scale", torch.zeros(())),
        ("distill_logit_scale", torch.zeros(())),
        ("head.bn.weight", v),
        ("some.bias_matrix", w),
        ("x.ln_proj", w),
    ]:
        assert excluded_from_weight_decay(name, p), name


def cfg(**overrides):
    base = dict(adam_betas="(0.9, 0.98)", adam_eps=1e-6, weight_decay=0.5, wd_exclude="open_clip", lr=[1e-2])
    return SimpleNamespace(**{**base, **overrides})


def test_one_step_equals_torch_adamw_with_the_same_groups():
    torch.manual_seed(0)
    model = ClipModule(ClipTowersConfig())
    reference = ClipModule(ClipTowersConfig())
    reference.load_state_dict(model.state_dict())
    tag_parameter_names(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = weight_decay_groups(params)
    excluded = {getattr(p, "unilm_vl_name") for p in groups[1]["params"]}
    assert {
        "clip.logit_scale",
        "clip.visual.ln_post.weight",
        "clip.visual.class_embedding",
        "clip.ln_final.bias",
    } <= excluded
    assert "clip.visual.conv1.weight" not in excluded and "clip.visual.proj" not in excluded
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(params)

    ours = OpenClipAdamW(cfg(), params)
    ref_named = dict(reference.named_parameters())
    theirs = torch.optim.AdamW(
        [
            {"params": [ref_named[getattr(p, "unilm_vl_name")] for p in groups[0]["params"]]},
            {"params": [ref_named[getattr(p, "unilm_vl_name")] for p in groups[1]["params"]], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.5,
    )
    image, text = torch.randn(4, 3, 64, 64), torch.randint(1, 1000, (4, 32))
    for net, opt in ((model, ours), (reference, theirs)):
        out = net(image, text)
        (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(-1).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_named[name], rtol=0, atol=0, msg=name)
    # a fresh optimizer and zero gradients: only decay moves a parameter (the logit scale stays, weights shrink)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh = OpenClipAdamW(cfg(), params)
    for p in params:
        p.grad = torch.zeros_like(p)
    fresh.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["clip.logit_scale"], before["clip.logit_scale"])
    torch.testing.assert_close(after["clip.visual.conv1.weight"], before["clip.visual.conv1.weight"] * (1 - 1e-2 * 0.5))
    none = weight_decay_groups(params, exclude=False)
    assert len(none) == 1 and len(none[0]["params"]) == len(params)
    # one flattened 1-D vector (fairseq --fp16's flat fp32 copy) would escape decay entirely: not accepted
    assert not ours.supports_flat_params


def test_fairseq_train_keeps_the_groups_through_resume(data, tmp_path):  # noqa: F811
    common = [
        "--optimizer",
        "open_clip_adamw",
        "--weight-decay",
        "0.5",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--save-interval-updates",
        "2",
    ]
    out = run([f"{BIN}/fairseq-train", *train_args(data, tmp_path / "a", *common, "--max-update", "2")])
    assert "open_clip_adamw: weight decay on" in out and "no weight decay on" in out
    out = run([f"{BIN}/fairseq-train", *train_args(data, tmp_path / "a", *common, "--max-update", "3")])
    assert "Loaded checkpoint" in out and "num_updates=3" in out
    state = torch.load(tmp_path / "a" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    groups = state["last_optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert state["optimizer_history"][-1]["optimizer_name"] == "OpenClipAdamW"
