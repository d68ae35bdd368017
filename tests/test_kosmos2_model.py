"""The Kosmos-2 network (unilm_vl/modules/kosmos2.py) at tiny size on CPU, against the release's model (Peng et al.
2023; microsoft/unilm kosmos-2/unilm/models/vl/clip.py: every ln_post token L2-normalised; connector.py: latent
queries over tokens + queries, its parameter count; torchscale architecture/decoder.py: sub-LN layers, sqrt(D)
embedding scale; the frozen vision tower)."""

import ast
import inspect
import math

import pytest
import torch
from torchscale.architecture.config import DecoderConfig
from torchscale.component.multihead_attention import MultiheadAttention

from unilm_vl.modules import kosmos2 as k2
from unilm_vl.modules.kosmos2 import (
    Kosmos2Config,
    Kosmos2Connector,
    Kosmos2Module,
    SdpaMultiheadAttention,
    kosmos2_tiny_config,
    kosmos2_xl_config,
    sinusoid_table,
)

BOS, PAD, EOS, BOI, EOI = 0, 1, 2, 5, 4  # fairseq-style ids in the tiny vocabulary


def sample(n_text, seed, num_queries):
    """``<s> <image> [L placeholders] </image> text...``: tokens (T,) and image mask (T,), the release's layout."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 100, (n_text,), generator=gen)
    tokens = torch.cat([torch.tensor([BOS, BOI]), torch.arange(6, 6 + num_queries), torch.tensor([EOI]), text])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[2 : 2 + num_queries] = True
    return tokens, mask


def pad_batch(samples, side):
    """Stack (tokens, mask) pairs, padding with PAD on the given side."""
    width = max(t.numel() for t, _ in samples)
    tokens = torch.full((len(samples), width), PAD, dtype=torch.long)
    masks = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, (t, m) in enumerate(samples):
        cols = slice(width - t.numel(), width) if side == "left" else slice(0, t.numel())
        tokens[i, cols], masks[i, cols] = t, m
    return tokens, masks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Kosmos2Module(kosmos2_tiny_config()).eval()


def images(n, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes(model):
    cfg = model.cfg
    tokens, mask = pad_batch([sample(5, 0, model.num_image_tokens), sample(3, 1, model.num_image_tokens)], "right")
    out = model(tokens, images(2), mask)
    assert out["lm_logits"].shape == (2, tokens.size(1), cfg.decoder.vocab_size)
    assert torch.isfinite(out["lm_logits"]).all()
    text = torch.randint(10, 100, (2, 6))  # text-only batch: no image, no mask
    assert model(text)["lm_logits"].shape == (2, 6, cfg.decoder.vocab_size)


def test_vision_tower_returns_all_tokens_after_ln_post_l2_normalised(model):
    """Every tower token (CLS + patches, after ln_post) has L2 norm 1; (32/8)^2 + 1 = 17 tokens."""
    tower = model.vision
    x = images(3, seed=1)
    feats = tower(x)
    assert feats.shape == (3, tower.num_tokens, tower.width) == (3, 17, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, 17))
    visual = tower.visual  # the same maths spelled out with open_clip's parts
    manual = visual.ln_post(visual.transformer(visual._embeds(x)))
    torch.testing.assert_close(feats, torch.nn.functional.normalize(manual, dim=-1))


def test_connector_shape_and_number_of_keys(model):
    """Connector output B x L x D; the latent queries see N image tokens + L queries as keys."""
    seen = []
    hook = model.connector.x_attn.k_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        out = model.encode_image(images(2))
    finally:
        hook.remove()
    assert out.shape == (2, model.num_image_tokens, model.cfg.decoder.embed_dim) == (2, 8, 64)
    assert seen == [torch.Size([2, model.vision.num_tokens + model.num_image_tokens, 64])]


def test_xl_connector_parameter_count_and_keys():
    """19,015,680 connector parameters at xl size; 257 + 64 = 321 keys for ViT-L/14 tokens."""
    cfg = kosmos2_xl_config()
    connector = Kosmos2Connector(cfg.connector, 1024, cfg.decoder.embed_dim)
    assert sum(p.numel() for p in connector.parameters()) == 19_015_680
    seen = []
    connector.x_attn.k_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = connector(torch.randn(1, 257, 1024))
    assert out.shape == (1, 64, 2048) and seen == [321]


def test_xl_shape():
    cfg = kosmos2_xl_config()
    d = cfg.decoder
    vision = (cfg.vision.model_name, cfg.vision.force_quick_gelu)
    assert vision == ("ViT-L-14", True) and cfg.connector.latent_query_num == 64
    assert (d.layers, d.embed_dim, d.attention_heads, d.ffn_embed_dim, d.vocab_size) == (24, 2048, 32, 8192, 65037)
    assert (d.activation_fn, d.subln, d.pad_idx, cfg.freeze_vision) == ("gelu", True, 1, True)


def layer0_input(model, tokens, mask, image, scale=None):
    """The tensor entering decoder layer 0, optionally with the connector output multiplied by ``scale``."""
    captured = {}
    hooks = [
        model.decoder.layers[0].register_forward_pre_hook(lambda mod, args: captured.update(x=args[0])),
        model.connector.register_forward_hook(lambda mod, args, out: captured.update(f=out)),
    ]
    if scale is not None:
        hooks.append(model.connector.register_forward_hook(lambda mod, args, out: out * scale))
    try:
        model(tokens, image, mask)
    finally:
        for h in hooks:
            h.remove()
    return captured["x"], captured["f"]


def test_embedding_scale_applies_after_splicing(model):
    """x0 = (E[tokens] with image rows replaced) * sqrt(D) + pos; scaling the image rows by s changes x0
    there by sqrt(D) * s per unit, and the text rows not at all."""
    tokens, mask = pad_batch([sample(4, 2, model.num_image_tokens)], "right")
    image, d = images(1, seed=2), model.cfg.decoder.embed_dim
    x1, f = layer0_input(model, tokens, mask, image)
    x3, _ = layer0_input(model, tokens, mask, image, scale=3.0)
    torch.testing.assert_close(x3[mask] - x1[mask], math.sqrt(d) * 2.0 * f.reshape(-1, d))
    torch.testing.assert_close(x3[~mask], x1[~mask])
    table = sinusoid_table(64, d, PAD)
    pos = torch.arange(tokens.size(1)) + PAD + 1  # no padding: positions 2, 3, ...
    expected = model.decoder.embed_tokens.weight[tokens[0]] * math.sqrt(d) + table[pos]
    expected[mask[0]] = f[0] * math.sqrt(d) + table[pos[mask[0]]]
    torch.testing.assert_close(x1[0], expected)


def test_pad_row_zero_and_tied_output_projection(model):
    decoder = model.decoder
    assert decoder.output_projection.weight is decoder.embed_tokens.weight
    assert decoder.output_projection.bias is None
    assert torch.count_nonzero(decoder.embed_tokens.weight[PAD]) == 0
    assert decoder.embed_scale == pytest.approx(math.sqrt(model.cfg.decoder.embed_dim))


def test_decoder_layer_norms_and_no_relative_positions(model):
    """Four LayerNorms per sub-LN layer + one final LayerNorm; no xPos/rotary/relative bias."""
    d, ffn = model.cfg.decoder.embed_dim, model.cfg.decoder.ffn_embed_dim
    expected = {
        "self_attn_layer_norm": d,
        "self_attn.inner_attn_ln": d,
        "ffn.ffn_layernorm": ffn,
        "final_layer_norm": d,
    }
    assert len(model.decoder.layers) == model.cfg.decoder.layers
    for layer in model.decoder.layers:
        norms = {
            name: mod.normalized_shape[0] for name, mod in layer.named_modules() if "LayerNorm" in type(mod).__name__
        }
        assert norms == expected
        assert layer.self_attn.xpos is None
    assert model.decoder.layer_norm.normalized_shape == (d,)
    assert model.decoder.self_attn_relative_position is None and model.decoder.layernorm_embedding is None


def test_first_real_token_uses_sinusoid_row_2(model):
    d = model.cfg.decoder.embed_dim
    half = d // 2
    w = torch.exp(-torch.arange(half, dtype=torch.float64) * math.log(10000) / (half - 1))
    row = lambda p: torch.cat([torch.sin(p * w), torch.cos(p * w)]).float()  # noqa: E731 (fairseq's sinusoids)
    tokens = torch.tensor([[PAD, PAD, BOS, 17, 18], [BOS, 17, 18, PAD, PAD]])
    pos = model.decoder.embed_positions(tokens)
    torch.testing.assert_close(pos[0, 2:], torch.stack([row(2), row(3), row(4)]))
    torch.testing.assert_close(pos[1, :3], pos[0, 2:])
    assert torch.count_nonzero(pos[0, :2]) == 0 and torch.count_nonzero(pos[1, 3:]) == 0
    assert torch.count_nonzero(model.decoder.embed_positions.table[PAD]) == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_single_samples(model, side):
    """Padding (either side) leaves the real tokens' logits as in the unpadded single-sample forward."""
    samples = [sample(6, 3, model.num_image_tokens), sample(2, 4, model.num_image_tokens)]
    image = images(2, seed=3)
    tokens, masks = pad_batch(samples, side)
    with torch.no_grad():
        batched = model(tokens, image, masks)["lm_logits"]
        for i, (t, m) in enumerate(samples):
            single = model(t[None], image[i : i + 1], m[None])["lm_logits"][0]
            real = tokens[i].ne(PAD)
            torch.testing.assert_close(batched[i][real], single, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_reproduces_full_forward(model):
    """First call: the image prompt (left-padded batch); then one token per call with the KV cache."""
    samples = [sample(6, 5, model.num_image_tokens), sample(4, 6, model.num_image_tokens)]
    tokens, masks = pad_batch(samples, "left")
    image = images(2, seed=5)
    prompt = tokens.size(1) - 4
    with torch.no_grad():
        full = model(tokens, image, masks)["lm_logits"]
        state = {}
        steps = [model(tokens[:, :prompt], image, masks[:, :prompt], incremental_state=state)["lm_logits"]]
        for t in range(prompt + 1, tokens.size(1) + 1):
            steps.append(model(tokens[:, :t], None, masks[:, :t], incremental_state=state)["lm_logits"])
    assert steps[0].shape[1] == prompt and all(s.shape[1] == 1 for s in steps[1:])
    real = tokens.ne(PAD)
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert state[0]["prev_key"].shape[2] == tokens.size(1)


def test_reorder_incremental_state(model):
    tokens, masks = pad_batch([sample(3, 7, model.num_image_tokens), sample(3, 8, model.num_image_tokens)], "left")
    image = images(2, seed=7)
    with torch.no_grad():
        state = {}
        model(tokens[:, :-1], image, masks[:, :-1], incremental_state=state)
        model.reorder_incremental_state(state, torch.tensor([1, 0]))
        step = model(tokens.flip(0), None, None, incremental_state=state)["lm_logits"]
        full = model(tokens.flip(0), image.flip(0), masks.flip(0))["lm_logits"]
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_several_images_fill_placeholders_in_order(model):
    L = model.num_image_tokens
    t1, m1 = sample(2, 9, L)
    tokens = torch.cat([t1, t1])[None]
    mask = torch.cat([m1, m1])[None]
    image = images(2, seed=9)
    with torch.no_grad():
        embeds = model.embed_inputs(tokens, image[None], mask)  # 1 x T x D, image dim 1 x 2 x 3 x H x W
        expected = model.encode_image(image).reshape(-1, model.cfg.decoder.embed_dim)
    torch.testing.assert_close(embeds[mask], expected)


def attention_pair(subln=True, dropout=0.0, heads=4, dim=32):
    args = DecoderConfig(decoder_embed_dim=dim, multiway=False, xpos_rel_pos=False)
    torch.manual_seed(11)
    original = MultiheadAttention(args, dim, heads, dropout=dropout, self_attention=True, subln=subln)
    shim = SdpaMultiheadAttention(args, dim, heads, dropout=dropout, self_attention=True, subln=subln)
    shim.load_state_dict(original.state_dict())
    return original.eval(), shim.eval()


def test_sdpa_shim_matches_torchscale_attention():
    """Same outputs as torchscale's bmm/softmax attention (dropout 0): causal, with left/right key padding,
    and for cross-attention (the connector's use). Fully masked rows give zeros instead of NaN."""
    original, shim = attention_pair()
    x = torch.randn(3, 7, 32)
    causal = torch.triu(torch.full((7, 7), float("-inf")), 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, :3] = True  # left padding
    pad[1, 5:] = True  # right padding
    with torch.no_grad():
        ref, _ = original(x, x, x, attn_mask=causal, key_padding_mask=pad)
        out, _ = shim(x, x, x, attn_mask=causal, key_padding_mask=pad)
        torch.testing.assert_close(out[~pad], ref[~pad])
        assert torch.isnan(ref[0, :3]).all() and torch.isfinite(out).all()
        ref, _ = original(x, x, x, attn_mask=causal)
        out, _ = shim(x, x, x, attn_mask=causal)  # the is_causal fast path
        torch.testing.assert_close(out, ref)
        xo, xs = attention_pair(subln=False)
        xo.self_attention, xo.encoder_decoder_attention = False, True
        mem = torch.randn(3, 11, 32)
        torch.testing.assert_close(xs(x, mem, mem)[0], xo(x, mem, mem)[0])


def test_sdpa_shim_applies_attention_dropout_in_training_only():
    _, shim = attention_pair(dropout=0.5)
    x = torch.randn(2, 6, 32)
    causal = torch.triu(torch.full((6, 6), float("-inf")), 1)
    with torch.no_grad():
        eval_out = shim(x, x, x, attn_mask=causal)[0]
        shim.train()
        a, b = shim(x, x, x, attn_mask=causal)[0], shim(x, x, x, attn_mask=causal)[0]
    assert not torch.allclose(a, b) and not torch.allclose(a, eval_out)


def grads_after_backward(freeze):
    torch.manual_seed(0)
    model = Kosmos2Module(Kosmos2Config(freeze_vision=freeze)).train()
    tokens, mask = pad_batch([sample(3, 10, model.num_image_tokens)], "right")
    model(tokens, images(1, seed=10), mask)["lm_logits"].float().pow(2).mean().backward()
    return model


def test_vision_frozen_by_default():
    model = grads_after_backward(freeze=True)
    assert not model.vision.training and model.decoder.training
    assert all(not p.requires_grad and p.grad is None for p in model.vision.parameters())
    assert model.connector.latent_query.grad is not None and model.connector.dense.weight.grad.abs().sum() > 0
    assert model.decoder.layers[0].self_attn.q_proj.weight.grad is not None


def test_vision_unfrozen_trains():
    model = grads_after_backward(freeze=False)
    assert model.vision.training
    params = dict(model.vision.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert params["visual.conv1.weight"].grad.abs().sum() > 0
    assert params["visual.transformer.resblocks.0.attn.in_proj_weight"].grad.abs().sum() > 0
    model.set_vision_frozen(True)
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())


def test_clear_errors(model):
    L = model.num_image_tokens
    tokens, mask = pad_batch([sample(3, 12, L)], "right")
    image = images(1)
    short = mask.clone()
    short[0, 2] = False
    with pytest.raises(ValueError, match=f"exactly {L} placeholder rows"):
        model(tokens, image, short)
    with pytest.raises(ValueError, match="no image was given"):
        model(tokens, None, mask)
    with pytest.raises(ValueError, match="marks no placeholder rows"):
        model(tokens, image, None)
    with pytest.raises(ValueError, match="bool tensor shaped like src_tokens"):
        model(tokens, image, mask.long())
    with pytest.raises(ValueError, match="B_img x 3 x H x W"):
        model(tokens, images(2), mask)
    with torch.no_grad():
        state = {}
        model(tokens[:, :-1], image, mask[:, :-1], incremental_state=state)
        bad = mask.clone()
        bad[0, -1] = True
        with pytest.raises(ValueError, match="incremental steps"):
            model(tokens, None, bad, incremental_state=state)


def test_every_config_field_has_a_docstring():
    for cls in (k2.Kosmos2VisionConfig, k2.Kosmos2ConnectorConfig, k2.Kosmos2DecoderConfig, k2.Kosmos2Config):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign):
                documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                assert documented and str(nxt.value.value).strip(), f"{cls.__name__}.{stmt.target.id} has no docstring"


def test_mixed_batch_of_image_and_text_only_rows(model):
    """Text-only rows take no image: a batch [text-only, image] equals each row run on its own."""
    L = model.num_image_tokens
    text_only = (torch.tensor([BOS, 11, 12, 13, 14]), torch.zeros(5, dtype=torch.bool))
    with_image = sample(4, 3, L)
    tokens, mask = pad_batch([text_only, with_image], "right")
    image = images(1, seed=5)
    with torch.no_grad():
        both = model(tokens, image, mask)["lm_logits"]
        alone_text = model(text_only[0][None])["lm_logits"]
        alone_image = model(with_image[0][None], image, with_image[1][None])["lm_logits"]
    torch.testing.assert_close(both[0, :5], alone_text[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1], alone_image[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Connector options beyond the release: 2-D positions (Qwen-VL style) and the locality prior
# ---------------------------------------------------------------------------------------------------------------
def test_locality_bias_values():
    """16 queries on a 4 x 4 grid over 8 x 8 patches: patch (0, 0)'s centre sits at (-0.25, -0.25) query-cell units
    from query (0, 0), so -d^2 / (2 sigma^2) = -0.125 / 0.5 = -0.25 at sigma 0.5; patch (0, 3) at (-0.25, 1.25):
    -(0.0625 + 1.5625) / 0.5 = -3.25. CLS and the 16 query keys get 0."""
    bias = k2.locality_bias(65, 16, 0.5, "cpu", torch.float32)
    assert bias.shape == (16, 65 + 16)
    assert bias[0, 1].item() == pytest.approx(-0.25) and bias[0, 4].item() == pytest.approx(-3.25)
    assert bias[:, 0].abs().max() == 0 and bias[:, 65:].abs().max() == 0
    # every query's least-penalised patches are the 4 it covers: query (r, c) covers patch rows 2r..2r+1
    for j in range(16):
        r, c = divmod(j, 4)
        covered = {1 + (2 * r + dr) * 8 + 2 * c + dc for dr in (0, 1) for dc in (0, 1)}
        top4 = set((bias[j, 1:65].topk(4).indices + 1).tolist())
        assert top4 == covered


def test_sincos_2d_values_and_query_patch_matching():
    pos = k2.sincos_2d(torch.tensor([2.0]), torch.tensor([3.0]), 8)  # omega = [1, 0.01]
    expect = [
        math.sin(2),
        math.sin(0.02),
        math.cos(2),
        math.cos(0.02),
        math.sin(3),
        math.sin(0.03),
        math.cos(3),
        math.cos(0.03),
    ]
    assert pos[0].tolist() == pytest.approx(expect, abs=1e-6)
    assert float(pos[0] @ pos[0]) == pytest.approx(4.0)  # dim / 2: one sin^2 + cos^2 per frequency and axis
    pos_k, pos_q = k2.connector_positions(65, 16, 128, "cpu", torch.float32)
    assert pos_k.shape == (65, 128) and pos_q.shape == (16, 128) and pos_k[0].abs().max() == 0  # CLS: no position
    best = (pos_q @ pos_k[1:].T).argmax(1)  # each query's most similar patch lies in the cell it covers
    for j, i in enumerate(best.tolist()):
        assert (i // 8) // 2 == j // 4 and (i % 8) // 2 == j % 4
    with pytest.raises(ValueError, match="square"):
        k2.connector_positions(65, 12, 128, "cpu", torch.float32)


@pytest.mark.parametrize("position_embedding,sigma", [("none", 0.5), ("sincos2d", 0.0), ("sincos2d", 0.5)])
def test_connector_options_match_explicit_attention(position_embedding, sigma):
    """The connector's output equals softmax((Wq q')(Wk k')^T / sqrt(d) + bias) (Wv v) then out_proj, with
    q' = queries (+ their positions), k' = [dense(f); queries] (+ positions), v = [dense(f); queries]."""
    torch.manual_seed(0)
    cfg = k2.Kosmos2ConnectorConfig(
        latent_query_num=16, attention_heads=4, position_embedding=position_embedding, locality_sigma=sigma
    )
    conn = Kosmos2Connector(cfg, 32, 64).eval()
    feats = torch.randn(2, 65, 32)
    x = conn.dense(feats)
    q = conn.latent_query.expand(2, -1, -1)
    mem = torch.cat([x, q], 1)
    qin, kin = q, mem
    if position_embedding == "sincos2d":
        pk, pq = k2.connector_positions(65, 16, 64, "cpu", torch.float32)
        qin, kin = q + pq, mem + torch.cat([pk, pq])
    a = conn.x_attn

    def heads(t):
        return t.view(2, -1, 4, 16).transpose(1, 2)

    logits = heads(a.q_proj(qin)) @ heads(a.k_proj(kin)).transpose(-1, -2) / 4.0
    if sigma > 0:
        logits = logits + k2.locality_bias(65, 16, sigma, "cpu", torch.float32)
    out = (logits.softmax(-1) @ heads(a.v_proj(mem))).transpose(1, 2).reshape(2, 16, 64)
    torch.testing.assert_close(conn(feats), a.out_proj(out), atol=1e-5, rtol=1e-5)


def test_connector_rejects_unknown_position_embedding():
    with pytest.raises(ValueError, match="'none' or 'sincos2d'"):
        Kosmos2Connector(k2.Kosmos2ConnectorConfig(position_embedding="rope"), 32, 64)
