"""COSA model pieces (TXH-mercury/COSA ``model/modeling.py``, ``model/pretrain.py``): frame-embedding resize, the four
attention modes of the one cross-attention BERT, concatenated samples, the evaluation API and weight loading."""

import pytest
import torch

from unilm_vl.modules import cosa as mc

from cosa_testlib import CLS, MASK, PAD, SEP, VOCAB, random_batch, text_batch, tiny_model, tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


# ------------------------------------------------------------------------------------------ frame embedding
@pytest.mark.parametrize(
    "rows,frames,expected",
    [
        (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),
        (8, 16, [i // 2 for i in range(16)]),
        (4, 1, [0]),
        (8, 4, [0, 2, 4, 6]),
        (4, 6, [0, 0, 1, 2, 2, 3]),
        (4, 4, [0, 1, 2, 3]),
    ],
)
def test_frame_embedding_nearest_resize(rows, frames, expected):
    assert mc.nearest_frame_indices(rows, frames).tolist() == expected
    emb = torch.randn(1, rows, 5)
    resized = mc.resize_frame_embedding(emb, frames)  # the interpolation the model uses picks the same rows
    torch.testing.assert_close(resized, emb[:, expected], atol=0, rtol=0)


def test_video_tokens_carry_their_frame_embedding(model):
    """Fused video tokens are flattened frame-major: token t of a K-frame sample carries E_frame[t // x]."""
    net = model.net
    tokens = torch.randn(2, 8, 65, net.vision.width)  # B x n x x x C, n = 8 frames from a 4-row embedding
    with torch.no_grad():
        saved = [p.clone() for p in net.hidden_trans_video_multimodal.parameters()]
        for p in net.hidden_trans_video_multimodal.parameters():
            p.zero_()  # LN(0) with zero affine: the bridge output is 0, only the frame embedding remains
        video = net.video_input(tokens)  # B x 8*65 x D
        for p, s in zip(net.hidden_trans_video_multimodal.parameters(), saved):
            p.copy_(s)
    assert video.shape == (2, 8 * 65, net.multimodal_encoder.hidden_size)
    rows = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).repeat_interleave(65)
    torch.testing.assert_close(video[1], net.video_frame_embedding[0, rows], atol=0, rtol=0)


# -------------------------------------------------------------------------------------------- attention masks
def test_mask_tables_of_the_reference():
    assert mc.causal_mask(torch.tensor([[1, 1, 1, 0]]))[0].tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 0],
    ]
    assert mc.prefix_causal_mask(torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1]]))[0].tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ]
    grown = [mc.causal_mask(torch.ones(1, n, dtype=torch.long))[0].tolist() for n in (1, 2, 3)]
    assert grown == [[[1]], [[1, 0], [1, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]]


def test_qa_inference_masks_reproduce_the_training_mask():
    """Greedy QA builds [question ; answer-so-far ; MASK] with all-real answer tokens each step: its mask equals the
    top-left block of the training mask over the full answer."""
    q = torch.tensor([[1, 1, 1, 0, 0]])
    full = mc.prefix_causal_mask(q, torch.ones(1, 4, dtype=torch.long))[0]
    for t in range(1, 5):
        step = mc.prefix_causal_mask(q, torch.ones(1, t, dtype=torch.long))[0]
        assert torch.equal(step, full[: 5 + t, : 5 + t])


def _fused(model, ids, attention, video):
    with torch.no_grad():
        return model.net.fuse(ids, attention, video)


def test_attention_modes_behave(model):
    g = torch.Generator().manual_seed(3)
    ids, mask = text_batch([[5, 6, 7, 8, 9]], 7)  # [CLS] 5 6 7 8 9 [SEP]
    video = torch.randn(1, 10, model.net.multimodal_encoder.hidden_size, generator=g)
    changed = ids.clone()
    changed[0, 4] = 12  # position 4 changes
    # causal: positions < 4 do not see position 4, later positions do
    a, b = _fused(model, ids, mc.causal_mask(mask), video), _fused(model, changed, mc.causal_mask(mask), video)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    # bidirectional: every position sees it
    a, b = _fused(model, ids, mask, video), _fused(model, changed, mask, video)
    assert ((a - b).abs().amax(dim=-1) > 1e-3).all()
    # prefix-causal: question = first 4 tokens, answer = last 3
    q_ids, q_mask, a_mask = ids[:, :4], mask[:, :4], mask[:, 4:]
    att = mc.prefix_causal_mask(q_mask, a_mask)
    base = _fused(model, ids, att, video)
    answer_changed = ids.clone()
    answer_changed[0, 5] = 12  # second answer token
    out = _fused(model, answer_changed, att, video)
    torch.testing.assert_close(base[:, :5], out[:, :5], atol=1e-6, rtol=0)  # question + first answer token
    assert (base[:, 5:] - out[:, 5:]).abs().max() > 1e-3
    question_changed = ids.clone()
    question_changed[0, 3] = 12  # last question token: seen by the whole question, even position 0
    out = _fused(model, question_changed, att, video)
    assert ((base - out).abs().amax(dim=-1) > 1e-3).all()
    assert q_ids.shape == (1, 4)


def test_pads_are_invisible_and_text_mode_skips_cross_attention(model):
    ids, mask = text_batch([[5, 6, 7]], 8)
    other = ids.clone()
    other[0, 6] = 9  # a pad position holds another id: real positions must not notice
    video = torch.randn(1, 6, model.net.multimodal_encoder.hidden_size)
    a, b = _fused(model, ids, mask, video), _fused(model, other, mask, video)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    with torch.no_grad():
        text_only = model.net.multimodal_encoder(ids, mask)
        layer = model.net.multimodal_encoder.bert.encoder.layer[0]
        saved = layer.crossattention.self.value.weight.clone()
        layer.crossattention.self.value.weight.add_(torch.randn_like(saved))
        again = model.net.multimodal_encoder(ids, mask)
        fused_after = model.net.fuse(ids, mask, video)
        layer.crossattention.self.value.weight.copy_(saved)
    torch.testing.assert_close(text_only, again, atol=0, rtol=0)  # no cross-attention in text-only mode
    assert (fused_after - a).abs().max() > 1e-3  # fusion uses it


# -------------------------------------------------------------------------------------------- concatenation
def test_paragraph_length_rule():
    assert [mc.paragraph_length(40, k) for k in (1, 2, 3, 4)] == [40, 40, 80, 80]


def test_partner_draw_is_reproducible_without_replacement():
    a = mc.draw_partners(5, 12, 4, torch.Generator().manual_seed(1))
    b = mc.draw_partners(5, 12, 4, torch.Generator().manual_seed(1))
    c = mc.draw_partners(5, 12, 4, torch.Generator().manual_seed(2))
    assert a.shape == (5, 3) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(set(row)) == 3 for row in a.tolist()) and int(a.max()) < 12
    assert mc.draw_partners(3, 2, 4, torch.Generator().manual_seed(0)).shape == (3, 3)  # N < K-1: with replacement
    assert mc.draw_partners(3, 8, 1).shape == (3, 0)


def test_concatenated_sample_shapes_order_and_caption_join(tmp_path):
    tok = tokenizer(tmp_path)
    captions = [
        "a red circle",
        "the blue squares",
        "a small green picture",
        "yellow circles moves left .",
        "a big red square , right",
    ]
    ids, mask = tok.encode_batch(captions, context_length=8), None
    mask = ids.ne(tok.pad_id).long()
    frames = torch.arange(5, dtype=torch.float)[:, None, None, None, None].expand(5, 1, 3, 4, 4)  # frame value = id
    partners = torch.tensor([[3, 1, 4], [0, 0, 2], [2, 4, 1]])  # own index allowed, as released
    out_frames, out_ids, out_mask = mc.concatenate_samples(
        frames[:3], ids[:3], mask[:3], frames, ids, mask, partners, mc.paragraph_length(8, 4), CLS, SEP, PAD
    )
    assert out_frames.shape == (3, 4, 3, 4, 4) and out_ids.shape == (3, 16) and out_mask.shape == (3, 16)
    for i in range(3):
        order = [i] + partners[i].tolist()
        assert out_frames[i, :, 0, 0, 0].tolist() == [float(j) for j in order]  # own frame first, then partners
        joined = " ".join(captions[j] for j in order)
        expected = [CLS] + tok.encode(joined)[:14] + [SEP]  # == the tokenisation of the joined string, truncated
        assert out_ids[i, : len(expected)].tolist() == expected
        assert out_ids[i, len(expected) :].eq(PAD).all() and out_mask[i].sum() == len(expected)
    assert out_ids[2, -1] == SEP  # truncated paragraphs keep [SEP]


def test_model_concatenates_with_k_partners(model):
    batch = random_batch(4, frames=1)["net_input"]
    ctx = model.pass_context(0, 1, 4, "cpu")
    frames, ids, mask, partners = model.concatenate(batch["frames"], batch["text_ids"], batch["text_mask"], ctx)
    assert frames.shape == (4, 4, 3, 64, 64) and ids.shape == (4, 16) and partners.shape == (4, 3)
    torch.testing.assert_close(frames[:, 1], batch["frames"][partners[:, 0], 0], atol=0, rtol=0)
    with torch.no_grad():
        video = model.encode_video(frames)
    assert video["video_tokens"].shape == (4, 4 * 65, 128)  # K * x fused tokens, x = 1 + 8 x 8 at 64 px


# ------------------------------------------------------------------------------------------ evaluation API
def test_evaluation_api(model):
    batch = random_batch(3, frames=2)["net_input"]
    with torch.no_grad():
        video = model.encode_video(batch["frames"])
        text = model.encode_text(batch["text_ids"], batch["text_mask"])
        itm = model.itm_logits(video["video_tokens"], batch["text_ids"], batch["text_mask"])
        logits = model.net.itm_logits(batch["text_ids"], batch["text_mask"], video["video_tokens"])
    assert model.image_size == 64 and len(model.image_mean) == 3 and len(model.image_std) == 3
    assert video["video_tokens"].shape == (3, 2 * 65, 128) and video["video_features"].shape == (3, 64)
    torch.testing.assert_close(video["video_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text["text_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.sigmoid(itm), logits.softmax(-1)[:, 1])


def test_generation_reads_the_appended_mask_position(model):
    from unilm_vl.models.cosa import _MaskedCausalStep

    video = torch.randn(2, 6, 128)
    prefix = torch.tensor([[CLS, 7], [CLS, 9]])
    step = _MaskedCausalStep(model)
    with torch.no_grad():
        got = step(prefix, video, None, incremental_state={})["lm_logits"][:, -1]
        ids = torch.cat([prefix, torch.full((2, 1), MASK)], dim=1)
        hidden = model.net.fuse(ids, mc.causal_mask(torch.ones_like(ids)), video)
        at_mask, at_last_real = model.net.lm_logits(hidden[:, -1]), model.net.lm_logits(hidden[:, -2])
    torch.testing.assert_close(got, at_mask)
    assert (got - at_last_real).abs().max() > 1e-3


def test_generate_caption_and_answer(model):
    batch = random_batch(2, frames=2)["net_input"]
    caps = model.generate_caption(batch["frames"], beam_size=3, max_len=6)
    greedy = model.generate_caption(batch["frames"], beam_size=1, max_len=6)
    answers = model.generate_answer(batch["frames"], batch["text_ids"], batch["text_mask"], max_len=5)
    for out, limit in ((caps, 6), (greedy, 6), (answers, 5)):
        assert len(out) == 2
        for row in out:
            assert len(row) <= limit and not {PAD, CLS, SEP, MASK} & set(row)
            assert all(0 <= t < len(VOCAB) for t in row)
    # greedy caption = step-by-step argmax at the appended [MASK]
    with torch.no_grad():
        video = model.encode_video(batch["frames"][:1])["video_tokens"]
        seq = [CLS]
        for _ in range(6):
            ids = torch.tensor([seq + [MASK]])
            logits = model.net.lm_logits(model.net.fuse(ids, mc.causal_mask(torch.ones_like(ids)), video)[:, -1])
            logits[:, PAD] = float("-inf")
            token = int(logits.argmax())
            if token == SEP:
                break
            seq.append(token)
    assert greedy[0] == [t for t in seq[1:] if t not in (CLS, MASK)]


# ---------------------------------------------------------------------------------------------------- weights
def test_missing_weight_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained-bert"):
        tiny_model(pretrained_bert=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="pretrained-vision"):
        tiny_model(pretrained_vision=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="pretrained-cosa"):
        tiny_model(pretrained_cosa=str(tmp_path / "nope.pt"))


def test_hf_bert_weights_load_by_key(tmp_path):
    """A plain HF BertForMaskedLM directory (no cross-attention) loads into the cross-attention BERT by key."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertForMaskedLM

    torch.manual_seed(5)
    hf = BertForMaskedLM(
        BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    )
    hf.save_pretrained(tmp_path / "bert")
    model = tiny_model(pretrained_bert=str(tmp_path / "bert"))
    bert = model.net.multimodal_encoder
    assert bert.hidden_size == 32 and model.net.itm_head.linear1.in_features == 32  # the directory's shape wins
    ours = bert.state_dict()
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
    assert any("crossattention" in k for k in ours) and not any("crossattention" in k for k in hf.state_dict())
    assert bert.cls.predictions.decoder.weight.data_ptr() == bert.bert.embeddings.word_embeddings.weight.data_ptr()


def test_release_checkpoint_keys_load_with_frame_embedding_resize(tmp_path):
    """A state dict in the release's layout (module. prefix, clip_model.visual.*, fp16, 4 frame rows) loads into a
    model with 8 frame rows: every tensor by key, the frame embedding nearest-resized."""
    source = tiny_model(seed=1)
    release = {}
    for key, value in source.net.state_dict().items():
        key = "clip_model.visual." + key[len("vision.visual.") :] if key.startswith("vision.visual.") else key
        release["module." + key] = value.half() if value.is_floating_point() else value
    release["module.clip_model.token_embedding.weight"] = torch.zeros(3, 2)  # unused CLIP text tower: dropped
    release["module.clip_model.visual.proj"] = torch.zeros(128, 64)  # unused projection: dropped
    torch.save(release, tmp_path / "model_step_10.pt")
    target = tiny_model(seed=2, num_frame_embeddings=8, pretrained_cosa=str(tmp_path / "model_step_10.pt"))
    got = target.net.state_dict()
    for key, value in source.net.state_dict().items():
        if key == "video_frame_embedding":
            expected = value.half().float()[:, [0, 0, 1, 1, 2, 2, 3, 3]]
        else:
            expected = value.half().float() if value.is_floating_point() else value
        torch.testing.assert_close(got[key], expected, atol=0, rtol=0, msg=key)


def test_fairseq_checkpoint_frame_embedding_is_resized_on_load():
    source, target = tiny_model(seed=1), tiny_model(seed=2, num_frame_embeddings=8)
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(
        target.net.video_frame_embedding, source.net.video_frame_embedding[:, [0, 0, 1, 1, 2, 2, 3, 3]], atol=0, rtol=0
    )


def test_timm_swin_tower_option():
    cfg = mc.CosaVisionConfig(
        kind="timm",
        model_name="swin_tiny_patch4_window7_224",
        image_size=32,
        timm_kwargs={"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4},
    )
    tower = mc.build_vision_tower(cfg)
    tokens = tower(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 16, 32) and tower.width == 32  # 32/4/2 = 4 x 4 final-stage tokens of width 32
    torch.testing.assert_close(tower.pool(tokens), tokens.mean(dim=1))
    with pytest.raises(ValueError, match="vision tower kind"):
        mc.build_vision_tower(mc.CosaVisionConfig(kind="nope"))


def test_frozen_vision_feature_path_equals_the_pixel_path():
    """Frames are encoded independently, so concatenating the vision tokens of the origin pass (the release's
    frozen-vision feature path) gives the same outputs as re-encoding the concatenated pixels; the tower gets no
    gradient."""
    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig

    criterion = CosaCriterion(CosaCriterionConfig(cosa_tasks="ret_cret_ccap_cmlm"), None)
    sample = random_batch(4, seed=3)["net_input"]
    partners = torch.tensor([[1, 2, 3], [0, 0, 2], [3, 1, 1], [2, 0, 1]])
    results = []
    for frozen in (False, True):
        model = tiny_model(seed=0, bert_dropout=0.0, frozen_vision=frozen).eval()
        torch.manual_seed(5)  # same masks and negatives
        losses = criterion.compute_losses(model(**sample, tasks="ret_cret_ccap_cmlm", partners=partners))
        results.append({k: v.item() for k, v in losses.items()})
    assert results[0].keys() == results[1].keys() and len(results[0]) == 6
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], abs=1e-5), key
    model.train()
    sum(criterion.compute_losses(model(**sample, tasks="ret_cret_ccap_cmlm", partners=partners)).values()).backward()
    assert all(p.grad is None for p in model.net.vision.parameters())
    assert model.net.hidden_trans_video_multimodal[0].weight.grad is not None


def test_every_parameter_gets_a_gradient_in_pretraining():
    """With ret_cret_ccap_cmlm no parameter is left out, so PyTorch DDP runs without --find-unused-parameters
    (the ViT's unused ``proj`` is removed)."""
    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig

    model = tiny_model(seed=0).train()
    criterion = CosaCriterion(CosaCriterionConfig(cosa_tasks="ret_cret_ccap_cmlm"), None)
    loss, _, _ = criterion(model, random_batch(6, seed=8))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """--checkpoint-activations recomputes every ViT block and BERT layer in the backward pass: with dropout on
    (train mode), the RNG state is replayed, so loss and every gradient equal the stored-activation run; the blocks
    really are recomputed (each checkpointed BERT layer runs twice per step)."""
    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig

    criterion = CosaCriterion(CosaCriterionConfig(cosa_tasks="ret_cret_ccap_cmlm"), None)
    sample = random_batch(4, seed=3)
    partners = torch.tensor([[1, 2, 3], [0, 0, 2], [3, 1, 1], [2, 0, 1]])
    runs = []
    for checkpointing in (False, True):
        model = tiny_model(seed=0, bert_dropout=0.1, checkpoint_activations=checkpointing).train()
        calls = []
        handles = [
            m.register_forward_hook(lambda *a: calls.append(1))
            for m in (
                model.net.multimodal_encoder.bert.encoder.layer[0].attention,
                model.net.vision.visual.transformer.resblocks[0].attn,
            )
        ]
        torch.manual_seed(5)
        losses = criterion.compute_losses(model(**sample["net_input"], tasks="ret_cret_ccap_cmlm", partners=partners))
        sum(losses.values()).backward()
        for handle in handles:
            handle.remove()
        runs.append(
            (
                {k: v.item() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                len(calls),
            )
        )
    (plain_loss, plain_grad, plain_calls), (ckpt_loss, ckpt_grad, ckpt_calls) = runs
    for key in plain_loss:
        assert ckpt_loss[key] == pytest.approx(plain_loss[key], abs=1e-6), key
    assert plain_grad.keys() == ckpt_grad.keys() and len(plain_grad) > 50
    for name in plain_grad:
        torch.testing.assert_close(ckpt_grad[name], plain_grad[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ckpt_calls == 2 * plain_calls  # each forward of the layer is run again in the backward
