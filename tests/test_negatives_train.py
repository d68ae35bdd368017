"""The negclip / fsc_clip criteria on the tiny clip model: wiring against the pure functions, flag errors, and
``fairseq-train`` runs with hard negatives (NegCLIP full fine-tuning; FSC-CLIP with LoRA, save/resume exactly),
export of the merged weights to open_clip and WiSE-FT checkpoints that the eval loader reads."""

import re
from types import SimpleNamespace

import open_clip
import pytest
import torch
from test_train_e2e import model_state, run, train_args

from unilm_vl.criterions.clip import ClipCriterion, ClipCriterionConfig
from unilm_vl.criterions.fsc_clip import FscClipCriterion, FscClipCriterionConfig
from unilm_vl.criterions.negclip import NegclipCriterion, NegclipCriterionConfig
from unilm_vl.data.formats import WdsShardWriter
from unilm_vl.losses import negatives as fn
from unilm_vl.models.clip import ClipConfig, ClipModel

from conftest import BIN, COLOURS, jpeg_bytes
from trainer_harness import build_trainer, parameters, train_updates

TASK = SimpleNamespace(tokenizer=SimpleNamespace(pad_id=0))
SHAPES = ["circle", "square", "triangle"]


def model(**kwargs):
    torch.manual_seed(0)
    return ClipModel(ClipConfig(**kwargs)).train()


def batch(with_negatives=True):
    """B = 3 samples, T = 2 negative types (type-major), sample 1 has no negative, sample 2 only of type 1."""
    g = torch.Generator().manual_seed(0)
    text = torch.zeros(3, 32, dtype=torch.long)
    text[:, 0], text[:, 1:6], text[:, 6] = 49406, torch.randint(1, 400, (3, 5), generator=g), 49407
    net_input = {"image": torch.randn(3, 3, 64, 64, generator=g), "text": text}
    if with_negatives:
        neg_mask = torch.tensor([1, 0, 0, 1, 0, 1])
        neg_text = torch.zeros(6, 32, dtype=torch.long)
        neg_text[neg_mask > 0] = text[[0, 0, 2]].roll(1, dims=1).clamp_min(0)
        neg_text[neg_mask > 0, 0] = 49406
        net_input.update(neg_text=neg_text, neg_mask=neg_mask)
    return {"id": [0, 1, 2], "nsentences": 3, "ntokens": 96, "net_input": net_input}


def fsc_criterion(**kwargs):
    cfg = dict(apply_global_neg_loss=True, apply_local_neg_loss=True, return_dense_tokens=True)
    cfg.update(kwargs)
    return FscClipCriterion(FscClipCriterionConfig(**cfg), TASK)


def test_negclip_without_negatives_equals_the_clip_criterion():
    m, sample = model(), batch(with_negatives=False)
    clip, _, _ = ClipCriterion(ClipCriterionConfig(), TASK)(m, sample)
    neg, _, log = NegclipCriterion(NegclipCriterionConfig(), TASK)(m, sample)
    assert neg.item() == pytest.approx(clip.item(), abs=1e-6)
    assert log["clip_loss"] == pytest.approx(clip.item(), abs=1e-6)


def test_negclip_encodes_only_valid_negatives_and_zero_fills_the_rest():
    m, sample = model(), batch()
    loss, _, _ = NegclipCriterion(NegclipCriterionConfig(), TASK)(m, sample)
    net = sample["net_input"]
    with torch.no_grad():
        img, txt = m.encode_image(net["image"]), m.encode_text(net["text"])
        neg = m.encode_text(net["neg_text"]) * net["neg_mask"][:, None]  # every row encoded, then zeroed
        s = m.towers.clip.logit_scale.exp()
    expected = fn.negclip_loss(img, txt, s, neg, net["neg_mask"])["clip_loss"]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_fsc_clip_terms_are_the_weighted_pure_functions():
    m, sample = model(), batch()
    crit = fsc_criterion()
    loss, sample_size, log = crit(m, sample)
    net = sample["net_input"]
    with torch.no_grad():
        img, img_tokens = m.towers.encode_image_dense(net["image"])
        txt, txt_tokens = m.towers.encode_text_dense(net["text"])
        _, neg_tokens = m.towers.encode_text_dense(net["neg_text"])
        neg = m.encode_text(net["neg_text"]) * net["neg_mask"][:, None]
        s = m.towers.clip.logit_scale.exp()
    mask, neg_mask = net["neg_mask"], fn.dense_token_mask(net["neg_text"], 0)
    g = fn.global_hn_loss(img, txt, neg, mask, s, 2.0, 0.02)
    loc = fn.local_hn_loss(
        img_tokens, txt_tokens, fn.dense_token_mask(net["text"], 0), neg_tokens, neg_mask, mask, s, 2.0, 0.02
    )
    assert log["clip_neg_loss"] == pytest.approx(0.5 * g.item(), abs=1e-5)
    assert log["local_neg_loss"] == pytest.approx(0.2 * loc.item(), abs=1e-5)
    assert loss.item() == pytest.approx(log["clip_loss"] + log["clip_neg_loss"] + log["local_neg_loss"], abs=1e-5)
    assert sample_size == 1 and log["local_neg_loss"] > 0
    loss.backward()
    assert m.towers.clip.visual.conv1.weight.grad.abs().max() > 0


def test_fsc_clip_without_negatives_logs_zero_hn_terms():
    loss, _, log = fsc_criterion()(model(), batch(with_negatives=False))
    assert log["clip_neg_loss"] == 0 and log["local_neg_loss"] == 0
    assert loss.item() == pytest.approx(log["clip_loss"], abs=1e-6)


def test_flag_errors():
    with pytest.raises(ValueError, match="--return-dense-tokens"):
        fsc_criterion(return_dense_tokens=False)
    with pytest.raises(ValueError, match="--gather-with-grad means --gather-gradient own, which contradicts"):
        fsc_criterion(gather_with_grad=False, gather_gradient="query")
    with pytest.raises(ValueError, match="--gather-with-grad means --gather-gradient query, which contradicts"):
        NegclipCriterion(NegclipCriterionConfig(local_loss=True, gather_with_grad=False, gather_gradient="own"), TASK)
    with pytest.raises(ValueError, match="minmax"):
        fsc_criterion(sim_normalizer="softmax", sim_sparsify=True)


def test_lora_model_trains_only_lora_tensors():
    m = model(lora_rank=4)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss, _, _ = fsc_criterion()(m, batch())
    loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------------------ fairseq-train
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Captions with two coloured shapes (so that every negative type exists for most samples) and pretrained
    weights: a random tiny open_clip state dict standing in for the clip recipe's exported checkpoint."""
    root = tmp_path_factory.mktemp("negatives")
    colours = list(COLOURS)
    with WdsShardWriter(str(root / "train" / "part"), samples_per_shard=12) as writer:
        for i in range(24):
            c1, c2 = colours[i % 4], colours[(i + 1 + i // 4) % 4]
            s1, s2 = SHAPES[i % 3], SHAPES[(i + 1) % 3]
            writer.write(
                f"{i:06d}", jpeg_bytes(COLOURS[c1]), "jpg", f"a {c1} {s1} above a {c2} {s2}", {"key": f"{i:06d}"}
            )
    torch.manual_seed(0)
    pretrained = root / "pretrained.pt"
    torch.save(open_clip.create_model("unilm-vl-clip-tiny", pretrained=None).state_dict(), pretrained)
    return root, pretrained


def neg_args(data, save_dir, pretrained, *extra):
    args = train_args(
        data,
        save_dir,
        "--pretrained",
        str(pretrained),
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--batch-size",
        "6",
        "--num-workers",
        "1",
        *extra,
    )
    i = args.index("--criterion")
    del args[i : i + 2]
    return args


def logged(out, key):
    values = re.findall(rf"\b{key}=([-0-9.e]+)", out)
    assert values, f"{key} not logged"
    return [float(v) for v in values]


def test_train_negclip_two_updates(world, tmp_path):
    """fairseq's trainer in the test process (tests/trainer_harness.py); the fairseq-train CLI of this family runs in
    test_train_fsc_clip_lora_resume_export_and_wise_ft."""
    data, pretrained = world
    args = neg_args(
        data,
        tmp_path / "ckpt",
        pretrained,
        "--criterion",
        "negclip",
        "--hard-negatives",
        "negclip",
        "--max-update",
        "2",
        "--num-workers",
        "0",
    )
    trainer, itr = build_trainer(args[2:])  # build_trainer adds the --user-dir pair
    outputs = train_updates(trainer, itr, 2)
    assert trainer.get_num_updates() == 2 and all(o["clip_loss"] > 0 for o in outputs)
    start = torch.load(pretrained)
    assert not torch.equal(parameters(trainer)["towers.clip.visual.conv1.weight"], start["visual.conv1.weight"])


FSC = [
    "--criterion",
    "fsc_clip",
    "--hard-negatives",
    "fsc-clip",
    "--apply-global-neg-loss",
    "--apply-local-neg-loss",
    "--return-dense-tokens",
    "--lora-rank",
    "4",
    "--save-interval-updates",
    "1",
]


@pytest.mark.slow
def test_train_fsc_clip_lora_resume_export_and_wise_ft(world, tmp_path):
    data, pretrained = world
    a = run([f"{BIN}/fairseq-train", *neg_args(data, tmp_path / "a", pretrained, *FSC, "--max-update", "2")])
    for key in ("clip_loss", "clip_neg_loss", "local_neg_loss"):
        assert all(v > 0 for v in logged(a, key)), key
    run([f"{BIN}/fairseq-train", *neg_args(data, tmp_path / "b", pretrained, *FSC, "--max-update", "1")])
    b = run([f"{BIN}/fairseq-train", *neg_args(data, tmp_path / "b", pretrained, *FSC, "--max-update", "2")])
    assert "Loaded checkpoint" in b
    state_a = model_state(tmp_path / "a" / "checkpoint_last.pt")
    state_b = model_state(tmp_path / "b" / "checkpoint_last.pt")
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=0, rtol=0, msg=key)
    start = torch.load(pretrained)
    for key, value in start.items():  # LoRA: the base weights (and logit_scale) never move
        torch.testing.assert_close(state_a["towers.clip." + key], value, atol=0, rtol=0, msg=key)

    from unilm_vl import export_open_clip, wise_ft
    from unilm_vl.checkpoint import load_model

    ckpt = str(tmp_path / "a" / "checkpoint_last.pt")
    exported = str(tmp_path / "merged.pt")
    export_open_clip.main(["--checkpoint", ckpt, "--out", exported])
    plain = open_clip.create_model("unilm-vl-clip-tiny", pretrained=None).eval()
    plain.load_state_dict(torch.load(exported))  # strict: a plain open_clip state dict
    fine, _, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 3, 64, 64, generator=g), torch.randint(1, 400, (2, 32), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            plain.encode_image(image, normalize=True), fine.encode_image(image), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            plain.encode_text(text, normalize=True), fine.encode_text(text), atol=1e-5, rtol=1e-4
        )
    base = open_clip.create_model("unilm-vl-clip-tiny", pretrained=None).eval()
    base.load_state_dict(start)
    for alpha, ref in [("0", base), ("1", plain)]:  # alpha 0: every LoRA delta 0, the pretrained towers
        out = str(tmp_path / f"wise_{alpha}.pt")
        wise_ft.main(["--finetuned", ckpt, "--alpha", alpha, "--out", out])
        assert torch.load(out, weights_only=False)["cfg"]["model"]["pretrained"] is None
        wise, _, _ = load_model(out)
        with torch.no_grad():
            torch.testing.assert_close(
                wise.encode_image(image), ref.encode_image(image, normalize=True), atol=1e-5, rtol=1e-4
            )
