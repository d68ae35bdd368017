"""unilm_vl.convert kosmos2: the released key layout (strict, round trip), our fairseq checkpoints, and parity with
HF transformers' Kosmos2ForConditionalGeneration (logits and greedy tokens; needs the test-only transformers)."""

import copy

import pytest
import torch

from unilm_vl import convert as C
from unilm_vl.models.kosmos2 import Kosmos2Model, Kosmos2ModelConfig
from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

L = 8  # latent queries of the tiny config
BOS, EOS, IMAGE, IMAGE_END = 0, 2, 5, 6


def tiny_cfg(quick_gelu=True):
    cfg = kosmos2_tiny_config()  # unilm-vl-kosmos2-vision-tiny: 32 px, patch 8, 2 x 64 wide, 2 heads
    cfg.vision.force_quick_gelu = quick_gelu  # HF's Kosmos-2 vision default (and the released ViT-L/14)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = Kosmos2Module(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:  # so a swapped name cannot hide behind
                p.add_(0.1 * torch.randn_like(p))  # a default (0 / 1) init
            if name.startswith("decoder.layers.") and p.dim() == 2:  # sharper than the init: greedy decoding then
                p.mul_(8.0)  # varies instead of repeating the last token
        net.decoder.embed_tokens.weight[cfg.decoder.pad_idx].zero_()
    return net, cfg


def same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def prompt(text=(20, 21, 22)):
    """``<s> <image> [L slots] </image> text`` with the slot ids 10.. (HF's processor uses distinct ids too)."""
    ids = [BOS, IMAGE, *range(10, 10 + L), IMAGE_END, *text]
    mask = [False, False, *([True] * L), False, *([False] * len(text))]
    return torch.tensor([ids]), torch.tensor([mask])


# ---------------------------------------------------------------------------------------------------------------
# released layout
# ---------------------------------------------------------------------------------------------------------------
def test_expected_shapes_match_the_module(tiny):
    net, cfg = tiny
    assert C.expected_shapes(cfg) == {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_release_round_trip_is_exact(tiny):
    net, cfg = tiny
    release = C.to_release_state_dict(net.state_dict(), cfg)
    assert set(C.RELEASE_UNUSED_KEYS) <= set(release)
    assert "img_model.visual.transformer.resblocks.1.ts_attn.v_proj.bias" in release
    assert "img_connector.x_attn.out_proj.weight" in release
    assert "gpt_model.decoder.layers.1.ffn.ffn_layernorm.weight" in release
    assert not any(".attn.in_proj" in k for k in release)
    ours = C.from_release_state_dict(release, cfg)
    same_tensors(ours, net.state_dict())
    same_tensors(C.to_release_state_dict(ours, cfg), release)
    fresh = Kosmos2Module(cfg)
    fresh.load_state_dict(ours, strict=True)


def test_release_loading_is_strict(tiny):
    net, cfg = tiny
    release = C.to_release_state_dict(net.state_dict(), cfg)
    C.from_release_state_dict({k: v for k, v in release.items() if k not in C.RELEASE_UNUSED_KEYS}, cfg)

    extra = dict(
        release,
        **{
            "gpt_model.decoder.layers.0.self_attn.rotary.inv_freq": torch.zeros(4),
            "img_model.visual.proj": torch.zeros(64, 32),
        },
    )
    with pytest.raises(C.ConversionError, match="unexpected") as err:
        C.from_release_state_dict(extra, cfg)
    assert "rotary.inv_freq" in str(err.value) and "visual.proj" in str(err.value)

    missing = {k: v for k, v in release.items() if "layers.1.ffn.fc2" not in k and k != "img_connector.latent_query"}
    with pytest.raises(C.ConversionError, match="missing keys") as err:
        C.from_release_state_dict(missing, cfg)
    for key in ("decoder.layers.1.ffn.fc2.weight", "decoder.layers.1.ffn.fc2.bias", "connector.latent_query"):
        assert key in str(err.value)

    no_k = {k: v for k, v in release.items() if k != "img_model.visual.transformer.resblocks.0.ts_attn.k_proj.weight"}
    with pytest.raises(C.ConversionError, match="lack q, k or v"):
        C.from_release_state_dict(no_k, cfg)

    wrong = dict(release, **{"gpt_model.decoder.layer_norm.weight": torch.ones(65)})
    with pytest.raises(C.ConversionError, match="wrong shapes"):
        C.from_release_state_dict(wrong, cfg)

    untied = dict(
        release,
        **{"gpt_model.decoder.output_projection.weight": release["gpt_model.decoder.output_projection.weight"] + 1},
    )
    with pytest.raises(C.ConversionError, match="ties"):
        C.from_release_state_dict(untied, cfg)


def write_dict(path, lines):
    """A fairseq dict.txt of ``lines`` made-up pieces: 4 specials + ``lines`` symbols, before the grounding ones."""
    path.write_text("".join(f"piece{i} 1\n" for i in range(lines)))
    return str(path)


def test_release_cli_writes_a_loadable_checkpoint(tiny, tmp_path, monkeypatch):
    net, cfg = tiny
    torch.save({"model": C.to_release_state_dict(net.state_dict(), cfg)}, tmp_path / "kosmos-2.pt")
    monkeypatch.setattr(C, "kosmos2_xl_config", lambda: copy.deepcopy(cfg))  # the tiny stand-in for the 1.6B shape
    # vocabulary 100 = 4 specials + 80 dict.txt lines + <mask> + 11 tags + 2 x 2 patch tokens
    dict_path = write_dict(tmp_path / "dict.txt", 80)
    assert (
        C.main(
            [
                "kosmos2",
                "--from-release",
                str(tmp_path / "kosmos-2.pt"),
                "--out",
                str(tmp_path / "ours.pt"),
                "--spm-model",
                "sp.model",
                "--dict-path",
                dict_path,
                "--location-bin-size",
                "2",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "ours.pt", weights_only=True)  # our converted checkpoints need no other global
    assert state["cfg"]["model"]["_name"] == "kosmos2" and state["cfg"]["task"]["_name"] == "kosmos2"
    assert state["cfg"]["task"]["image_token_length"] == L and state["cfg"]["task"]["dict_path"] == dict_path
    assert state["cfg"]["task"]["location_bin_size"] == 2
    model_cfg = Kosmos2ModelConfig(**{k: v for k, v in state["cfg"]["model"].items() if k != "_name"})
    model = Kosmos2Model(model_cfg, vocab_size=cfg.decoder.vocab_size, pad_idx=1)  # what fairseq builds
    model.load_state_dict(state["model"], strict=True)
    same_tensors(model.net.state_dict(), net.state_dict())
    loaded, loaded_cfg = C.load_our_checkpoint(str(tmp_path / "ours.pt"))
    same_tensors(loaded, net.state_dict())
    assert loaded_cfg == cfg


def test_vocab_rows_message_names_both_sizes_the_file_and_the_fitting_grid():
    from unilm_vl.models.kosmos2 import VocabularyMismatchError, check_vocab_rows

    check_vocab_rows(100, 100, "d.txt", 2)  # equal: nothing to say
    # dictionary 88 = 72 (4 specials + 68 lines) + <mask> + 11 tags + 2 x 2 patch tokens; 100 = 72 + 12 + 4 x 4
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocab_rows(100, 88, "d.txt", 2, "x.pt")
    assert str(err.value) == (
        "x.pt has 100 token embeddings but the kosmos2 dictionary has 88 symbols (d.txt: 72, + <mask>, 11 tags and "
        "4 patch tokens of --location-bin-size 2); 100 is what --location-bin-size 4 gives with this dict.txt: pass "
        "the dict.txt and --location-bin-size it was made with"
    )
    with pytest.raises(VocabularyMismatchError) as err:  # 99 - 72 - 12 = 15 cells: no square grid fits
        check_vocab_rows(99, 88, "d.txt", 2, "x.pt")
    assert "gives with this dict.txt" not in str(err.value) and "has 99 token embeddings" in str(err.value)


def test_release_cli_refuses_a_vocabulary_that_is_not_the_dictionary(tiny, tmp_path, monkeypatch, capsys):
    net, cfg = tiny
    release = tmp_path / "kosmos-2.pt"
    torch.save({"model": C.to_release_state_dict(net.state_dict(), cfg)}, release)
    monkeypatch.setattr(C, "kosmos2_xl_config", lambda: copy.deepcopy(cfg))
    dict_path = write_dict(tmp_path / "dict.txt", 79)  # 83 + 12 + 4 = 99 symbols for a 100-row model
    assert (
        C.main(
            [
                "kosmos2",
                "--from-release",
                str(release),
                "--out",
                str(tmp_path / "ours.pt"),
                "--dict-path",
                dict_path,
                "--location-bin-size",
                "2",
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {release} has 100 token embeddings but the kosmos2 dictionary has 99 symbols "
        f"({dict_path}: 83, + <mask>, 11 tags and 4 patch tokens of --location-bin-size 2): pass the "
        "dict.txt and --location-bin-size it was made with"
    ]
    assert not (tmp_path / "ours.pt").exists()


def test_hf_config_rejects_what_hf_cannot_express():
    cfg = tiny_cfg()
    cfg.connector.attention_heads = 2
    with pytest.raises(C.ConversionError, match="heads"):
        C.hf_config_dict(cfg)
    cfg = tiny_cfg()
    cfg.decoder.subln = False
    with pytest.raises(C.ConversionError, match="sub-LN"):
        C.hf_config_dict(cfg)
    for field, value in (("position_embedding", "sincos2d"), ("locality_sigma", 0.5)):
        cfg = tiny_cfg()
        setattr(cfg.connector, field, value)
        with pytest.raises(C.ConversionError, match="neither position embeddings nor a locality prior"):
            C.hf_config_dict(cfg)
    assert C.hf_config_dict(tiny_cfg(quick_gelu=False))["vision_config"]["hidden_act"] == "gelu"


def test_fairseq_config_round_trip_keeps_the_connector_options():
    cfg = tiny_cfg()
    cfg.connector.position_embedding, cfg.connector.locality_sigma = "sincos2d", 0.5
    back = C.config_from_fairseq(C.fairseq_model_cfg(cfg), cfg.decoder.vocab_size)
    assert (back.connector.position_embedding, back.connector.locality_sigma) == ("sincos2d", 0.5)


# ---------------------------------------------------------------------------------------------------------------
# HF transformers parity (test-only dependency)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    pytest.importorskip(
        "transformers", reason="transformers (test-only: HF parity of the Kosmos-2 converter) is not installed"
    )
    net, cfg = tiny
    root = tmp_path_factory.mktemp("kosmos2_convert")
    C.save_our_checkpoint(str(root / "ours.pt"), net.state_dict(), cfg)
    C.main(["kosmos2", "--to-hf", "--checkpoint", str(root / "ours.pt"), "--out", str(root / "hf")])
    return root / "hf"


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    return model


def test_hf_logits_match(tiny, hf_model):
    net, cfg = tiny
    torch.manual_seed(1)
    image = torch.randn(1, 3, 32, 32)
    tokens, mask = prompt()
    with torch.no_grad():
        ours = net(tokens, image, mask)["lm_logits"]  # 1 x T x V
        theirs = hf_model(
            pixel_values=image,
            input_ids=tokens,
            image_embeds_position_mask=mask.long(),
            attention_mask=torch.ones_like(tokens),
        ).logits
    assert ours.shape == theirs.shape == (1, tokens.size(1), cfg.decoder.vocab_size)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.abs().max().item() > 0.5  # not a degenerate all-zero comparison


def greedy_ours(net, image, tokens, mask, steps):
    state, scores = {}, []
    with torch.no_grad():
        for _ in range(steps):
            logits = net(tokens, image, mask, incremental_state=state)["lm_logits"][:, -1]  # 1 x V
            scores.append(logits)
            nxt = logits.argmax(-1, keepdim=True)  # 1 x 1
            tokens = torch.cat([tokens, nxt], dim=1)
            mask = torch.cat([mask, torch.zeros_like(nxt, dtype=torch.bool)], dim=1)
            if nxt.item() == EOS:
                break
    return tokens, scores


@pytest.mark.parametrize("seed", [1, 2])  # seed 2 ends with </s> within the 8 steps
def test_hf_greedy_generation_matches(tiny, hf_model, seed):
    net, _ = tiny
    torch.manual_seed(seed)
    image = torch.randn(1, 3, 32, 32)
    tokens, mask = prompt()
    ours, our_scores = greedy_ours(net, image, tokens, mask, steps=8)
    with torch.no_grad():
        out = hf_model.generate(
            pixel_values=image,
            input_ids=tokens,
            image_embeds_position_mask=mask.long(),
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=8,
            do_sample=False,
            num_beams=1,
            eos_token_id=EOS,
            pad_token_id=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = ours[0, tokens.size(1) :].tolist()
    assert len(set(new)) >= 3, new  # a real sequence, not one token repeated
    assert ours.tolist() == out.sequences.tolist()
    assert len(our_scores) == len(out.logits)
    for step, (a, b) in enumerate(zip(our_scores, out.logits)):  # incremental steps: cache + positions agree
        assert (a - b).abs().max().item() <= 1e-4, step


def test_hf_round_trip_is_exact(tiny, hf_dir):
    net, cfg = tiny
    ours, back_cfg = C.load_hf(str(hf_dir))
    same_tensors(ours, net.state_dict())
    assert back_cfg.vision == cfg.vision and back_cfg.decoder == cfg.decoder
    assert back_cfg.connector == cfg.connector


def test_from_hf_cli_checks_the_vocabulary(hf_dir, tmp_path, capsys):
    """The HF model has 100 token embeddings: 68 dict.txt lines fit a 4 x 4 grid, not the 2 x 2 one asked for."""
    dict_path = write_dict(tmp_path / "dict.txt", 68)
    argv = ["kosmos2", "--from-hf", str(hf_dir), "--out", str(tmp_path / "back.pt"), "--dict-path", dict_path]
    assert C.main(argv + ["--location-bin-size", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {hf_dir} has 100 token embeddings but the kosmos2 dictionary has 88 symbols ({dict_path}: 72,"
    )
    assert "100 is what --location-bin-size 4 gives with this dict.txt" in errors[0]
    assert not (tmp_path / "back.pt").exists()
    assert C.main(argv + ["--location-bin-size", "4"]) == 0
    assert torch.load(tmp_path / "back.pt", weights_only=True)["cfg"]["task"]["location_bin_size"] == 4


def test_from_hf_cli(tiny, hf_dir, tmp_path):
    net, cfg = tiny
    C.main(["kosmos2", "--from-hf", str(hf_dir), "--out", str(tmp_path / "back.pt")])
    loaded, loaded_cfg = C.load_our_checkpoint(str(tmp_path / "back.pt"))
    same_tensors(loaded, net.state_dict())
    assert loaded_cfg == cfg
