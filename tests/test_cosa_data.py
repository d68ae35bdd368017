"""COSA data: the released frame sampling (TXH-mercury/COSA ``data/data.py`` ``split``), annotation parsing, counted
skips of bad videos, collated shapes and masks, per-batch source mixing, and the WordPiece vocabulary builder."""

import json
import logging
import os
import random

import pytest
import torch
from PIL import Image

from unilm_vl.data.cosa import (
    ChooseText,
    ClipTransformFn,
    CollateCosa,
    CosaFramesDecoder,
    cosa_stages,
    list_video_frames,
    parse_entry,
    sample_frame_indices,
    split_segments,
    stack_clips,
)
from unilm_vl.data.cosa_vocab import SPECIAL_TOKENS, build_wordpiece_vocab, write_vocab
from unilm_vl.data.decode import BadSample
from unilm_vl.data.pipeline import StreamPlan, worker_batches
from unilm_vl.data.sources import parse_data_spec
from unilm_vl.data.tokenizers import WordPieceTokenizer

CAPTIONS = [
    "a small red circle moves to the right",
    "the blue square grows while the star shrinks",
    "a large green triangle moves up",
    "Two purple crosses, moving down!",
]


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "n_items, n_seg, segments, middle",
    [
        (10, 4, [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]], [1, 4, 6, 8]),
        (7, 3, [[0, 1, 2], [3, 4], [5, 6]], [1, 3, 5]),
        (16, 8, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]], [0, 2, 4, 6, 8, 10, 12, 14]),
        (3, 8, [[0], [1], [2], [2], [2], [2], [2], [2]], [0, 1, 2, 2, 2, 2, 2, 2]),
        (12, 8, [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9], [10], [11]], [0, 2, 4, 6, 8, 9, 10, 11]),
        (6, 1, [[0, 1, 2, 3, 4, 5]], [2]),
        (1, 4, [[0], [0], [0], [0]], [0, 0, 0, 0]),
        (8, 8, [[i] for i in range(8)], list(range(8))),
    ],
)
def test_segments_and_middle_frames(n_items, n_seg, segments, middle):
    assert split_segments(n_items, n_seg) == segments
    assert sample_frame_indices(n_items, n_seg, train=False) == middle
    for seed in range(20):
        picked = sample_frame_indices(n_items, n_seg, train=True, rng=random.Random(seed))
        assert all(p in seg for p, seg in zip(picked, segments))
        assert picked == sample_frame_indices(n_items, n_seg, train=True, rng=random.Random(seed))


def test_training_frames_cover_each_segment_uniformly():
    counts = [[0] * 3 for _ in range(2)]  # N = 10, n = 4: segments 0 and 1 have 3 frames each
    rng = random.Random(0)
    for _ in range(3000):
        picked = sample_frame_indices(10, 4, train=True, rng=rng)
        counts[0][picked[0]] += 1
        counts[1][picked[1] - 3] += 1
    for row in counts:
        assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in row)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="at least one frame"):
        split_segments(0, 4)
    with pytest.raises(ValueError, match="seeded"):
        sample_frame_indices(5, 2, train=True)


# ----------------------------------------------------------------------------------------------- annotations
def test_parse_entry_layouts():
    assert parse_entry({"video_id": 7, "desc": " a cat "}, "f[0]") == {"video_id": "7", "captions": ["a cat"], "qa": []}
    assert parse_entry({"video_id": "v", "caption": ["x", "y"]}, "f")["captions"] == ["x", "y"]
    qa = parse_entry({"video_id": "v", "question": "what?", "answer": "dog", "question_id": 3}, "f")
    assert qa["qa"] == [("what?", ["dog"], 3)] and qa["captions"] == []
    humans = parse_entry({"video_id": "v", "question": "what?", "answer": ["dog", "cat"]}, "f")
    assert humans["qa"] == [("what?", ["dog", "cat"], None)]
    lists = parse_entry(
        {"video_id": "v", "question": ["q1", "q2"], "answer": [["a", "b"], "c"], "question_id": [1, 2]}, "f"
    )
    assert lists["qa"] == [("q1", ["a", "b"], 1), ("q2", ["c"], 2)]


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"desc": "x"}, "video_id"),
        ({"video_id": "v"}, "desc"),
        ({"video_id": "v", "desc": ""}, "desc"),
        ({"video_id": "v", "desc": ["ok", 3]}, "desc"),
        ({"video_id": "v", "question": "q"}, "question"),
        ({"video_id": "v", "question": ["q1", "q2"], "answer": ["a"]}, "answer"),
        ({"video_id": "v", "question": "q", "answer": [["a"], ["b"]]}, "answer"),
    ],
)
def test_parse_entry_errors_name_the_field(entry, field):
    with pytest.raises(BadSample) as info:
        parse_entry(entry, "ann.json[4]")
    assert info.value.field == field and info.value.source == "ann.json[4]"


def test_choose_text_train_random_eval_first():
    sample = {"__seed__": 5, "captions": ["a", "b", "c", "d"]}
    picks = {ChooseText("caption", True)({**sample, "__seed__": s})["caption"] for s in range(40)}
    assert picks == {"a", "b", "c", "d"}
    out = ChooseText("caption", False)(dict(sample))
    assert out["caption"] == "a" and out["references"] == ["a", "b", "c", "d"]
    qa = ChooseText("qa", False)({"qa": [("q?", ["x", "y"], 9)]})
    assert (qa["question"], qa["answer"], qa["answers"], qa["question_id"]) == ("q?", "x", ["x", "y"], 9)
    with pytest.raises(BadSample, match="question"):
        ChooseText("qa", True)({"captions": ["a"], "qa": []})


# ----------------------------------------------------------------------------------------------- a tiny world
def write_clip(root, video_id, num_frames, red):
    """Frame j of the clip is a solid PNG of colour (red, 10 * j, 0): the pixel values name the frame."""
    folder = os.path.join(root, video_id)
    os.makedirs(folder, exist_ok=True)
    for j in range(num_frames):
        Image.new("RGB", (12, 10), (red, 10 * j, 0)).save(os.path.join(folder, f"frame_{j + 1:04d}.png"))


@pytest.fixture
def world(tmp_path):
    frames = tmp_path / "frames"
    lengths = {"v0": 10, "v1": 3, "v2": 7, "v3": 16}
    for i, (vid, n) in enumerate(lengths.items()):
        write_clip(str(frames), vid, n, 20 * (i + 1))
    os.makedirs(frames / "empty")
    entries = [{"video_id": vid, "desc": CAPTIONS[i]} for i, vid in enumerate(lengths)]
    entries.insert(2, {"video_id": "missing", "desc": "nothing here"})
    entries.insert(4, {"video_id": "empty", "desc": "no frames"})
    (tmp_path / "train.json").write_text(json.dumps(entries))
    vocab = tmp_path / "vocab.txt"
    write_vocab(build_wordpiece_vocab(CAPTIONS + ["nothing here", "no frames"]), str(vocab))
    return tmp_path, lengths


def identity_transform(train=False, size=8):
    return ClipTransformFn(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none", train)


def frame_numbers(clip):
    """Frame index j of each frame of a T x 3 x H x W clip written by :func:`write_clip`."""
    return [round(float(v) * 255 / 10) for v in clip[:, 1].mean(dim=(1, 2))]


def make_plan(root, num_frames, train, batch_size=4, log_every=1):
    sources = parse_data_spec(str(root / "train.json"))
    for spec in sources:
        spec.extra["decoder"] = CosaFramesDecoder()
    tok = WordPieceTokenizer(str(root / "vocab.txt"))
    stages = cosa_stages(tok, 12, num_frames, train, identity_transform(train))
    return StreamPlan(
        sources=sources,
        stages=stages,
        collate=CollateCosa(tok.pad_id),
        batch_size=batch_size,
        shuffle=False,
        train=False,
        log_every=log_every,
        name="cosa",
    ), tok


def test_missing_and_empty_videos_are_counted_logged_skips(world, caplog):
    root, lengths = world
    plan, _ = make_plan(root, 4, train=False, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="unilm_vl.data.decode"):
        batch, meta = next(worker_batches(plan, 1, 0, 0, 1))
    assert meta["bad"] == 2 and meta["good"] == 4
    assert meta["reasons"] == {"missing video directory": 1, "empty frame directory": 1}  # one key per kind
    assert batch["id"] == list(lengths)
    logged = caplog.text
    assert str(root / "frames" / "missing") in logged and str(root / "frames" / "empty") in logged
    assert "skipped 2 bad samples" in logged


def test_test_mode_clip_frames_are_the_middle_frames_and_short_clips_pad(world):
    root, _ = world
    plan, tok = make_plan(root, 8, train=False, batch_size=8)
    batch, _ = next(worker_batches(plan, 1, 0, 0, 1))
    frames = batch["net_input"]["frames"]
    assert frames.shape == (4, 8, 3, 8, 8)
    assert frame_numbers(frames[0]) == [0, 2, 4, 5, 6, 7, 8, 9]  # N = 10, n = 8: two 2-frame segments first
    assert frame_numbers(frames[1]) == [0, 1, 2, 2, 2, 2, 2, 2]  # 3 frames for 8 segments: pad with the last
    assert frame_numbers(frames[3]) == [0, 2, 4, 6, 8, 10, 12, 14]
    reds = frames[:, 0, 0, 0, 0] * 255
    assert torch.allclose(reds, torch.tensor([20.0, 40.0, 60.0, 80.0]), atol=0.5)


def test_training_frames_are_seeded_per_sample(world):
    root, _ = world
    plan, _ = make_plan(root, 4, train=True, batch_size=4)
    first, _ = next(worker_batches(plan, 1, 0, 0, 1))
    again, _ = next(worker_batches(plan, 1, 0, 0, 1))
    other, _ = next(worker_batches(plan, 2, 0, 0, 1))  # another epoch: other per-sample seeds
    assert torch.equal(first["net_input"]["frames"], again["net_input"]["frames"])
    segments = split_segments(16, 4)
    numbers = [frame_numbers(b["net_input"]["frames"][3]) for b in (first, other)]
    assert all(n in seg for picked in numbers for n, seg in zip(picked, segments))
    draws = set()
    for epoch in range(1, 9):
        batch, _ = next(worker_batches(plan, epoch, 0, 0, 1))
        draws.add(tuple(frame_numbers(batch["net_input"]["frames"][3])))
    assert len(draws) > 1


def test_collated_shapes_masks_and_text(world):
    root, _ = world
    plan, tok = make_plan(root, 2, train=False, batch_size=8)
    batch, _ = next(worker_batches(plan, 1, 0, 0, 1))
    ids, mask = batch["net_input"]["text_ids"], batch["net_input"]["text_mask"]
    assert ids.shape == mask.shape == (4, 12) and ids.dtype == mask.dtype == torch.long
    assert torch.equal(mask, (ids != tok.pad_id).long())
    lengths = mask.sum(1)
    assert (ids[:, 0] == tok.bos_id).all()
    assert all(int(ids[i, lengths[i] - 1]) == tok.eos_id for i in range(4))
    assert batch["ntokens"] == int(mask.sum()) and batch["nsentences"] == 4
    assert batch["raw_text"][0] == CAPTIONS[0] and batch["references"][0] == [CAPTIONS[0]]
    assert tok.decode(ids[0]) == CAPTIONS[0]
    # "Two purple crosses, moving down!" is 8 tokens + [CLS]/[SEP] = 10 <= 12
    assert tok.decode(ids[3]) == "two purple crosses , moving down !"


def test_qa_collate_and_stack_clips(tmp_path):
    vocab = build_wordpiece_vocab(["what moves", "circle"])
    tok_path = str(tmp_path / "vocab.txt")
    write_vocab(vocab, tok_path)
    tok = WordPieceTokenizer(tok_path)
    samples = []
    for i, length in enumerate((2, 3)):
        samples.append(
            {
                "__key__": f"v{i}",
                "frames": torch.full((length, 3, 4, 4), float(i)),
                "question": "what moves",
                "answer": "circle",
                "answers": ["circle", "circle"],
                "question_id": i,
                "text": tok.encode_batch(["what moves"], 6)[0],
                "answer_tokens": tok.encode_batch(["circle"], 10)[0],
            }
        )
    samples[0]["frames"][1] = 5.0
    batch = CollateCosa(tok.pad_id, qa=True)(samples)
    net = batch["net_input"]
    assert net["frames"].shape == (2, 3, 3, 4, 4)
    assert (net["frames"][0, 2] == 5.0).all()  # the 2-frame clip repeats its last frame
    assert net["answer_ids"].shape == net["answer_mask"].shape == (2, 10)
    assert net["answer_mask"][0].tolist() == [1, 1, 1] + [0] * 7
    assert torch.equal(net["question_ids"], net["text_ids"]) and torch.equal(net["question_mask"], net["text_mask"])
    assert batch["answers"] == [["circle", "circle"]] * 2 and batch["question_id"] == [0, 1]
    assert batch["ntokens"] == 2 * 4 + 2 * 3
    assert stack_clips([torch.zeros(1, 3, 2, 2), torch.ones(4, 3, 2, 2)]).shape == (2, 4, 3, 2, 2)


def test_crop_flip_transform_is_one_draw_per_clip():
    import numpy as np

    ys, xs = np.mgrid[0:30, 0:40]
    frames = []
    for j in range(3):  # same green / blue gradients, red differs per frame
        arr = np.stack([np.full_like(xs, 10 * j), xs * 6, ys * 8], axis=-1).astype("uint8")
        frames.append(Image.fromarray(arr, mode="RGB"))
    torch.manual_seed(0)
    clip = ClipTransformFn(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "crop_flip", True)(frames)
    assert clip.shape == (3, 3, 16, 16)
    # identical crops and flips: the frames differ only by their red channel offset
    assert (clip[1:, 1:] - clip[:1, 1:]).abs().max() < 1e-5
    assert torch.allclose(clip[:, 0].mean(dim=(1, 2)) * 255, torch.tensor([0.0, 10.0, 20.0]), atol=0.5)
    draws = set()
    for seed in range(8):  # the draw itself is random: crops / flips differ between seeds
        torch.manual_seed(seed)
        draws.add(round(float(ClipTransformFn(16, (0.0,) * 3, (1.0,) * 3, "crop_flip", True)(frames)[0, 1, 0, 0]), 4))
    assert len(draws) > 1
    test = ClipTransformFn(16, kind="crop_flip", train=False)(frames)
    assert test.shape == (3, 3, 16, 16)
    with pytest.raises(BadSample, match="differ in size"):
        ClipTransformFn(16)([frames[0], Image.new("RGB", (8, 8))], "clip")


# ----------------------------------------------------------------------------------------------- vocabulary
def test_wordpiece_vocab_round_trip(tmp_path):
    vocab = build_wordpiece_vocab(CAPTIONS)
    assert tuple(vocab[:5]) == SPECIAL_TOKENS
    assert len(vocab) == len(set(vocab))
    path = str(tmp_path / "vocab.txt")
    write_vocab(vocab, path)
    tok = WordPieceTokenizer(path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    caption = "a small red circle moves to the right"
    ids = tok.encode(caption)
    assert len(ids) == len(caption.split()) and tok.unk_id not in ids
    assert tok.decode(tok.encode_batch([caption], 20)[0]) == caption
    # an unseen word over seen characters splits into character pieces instead of [UNK]
    assert tok.tokenize("cross") == ["c", "##r", "##o", "##s", "##s"]
    assert tok.decode(tok.encode("cross")) == "cross"


def test_mixture_per_batch_is_homogeneous(world):
    from unilm_vl.tasks.cosa_pretrain import CosaPretrainConfig, CosaPretrainTask

    from conftest import write_wds

    root, lengths = world
    write_wds(str(root / "wds" / "part"), 24, 24)
    (root / "good.json").write_text(json.dumps([{"video_id": v, "desc": c} for v, c in zip(lengths, CAPTIONS)]))
    mix = [
        {"name": "images", "source": "wds/part-*.tar", "weight": 1.0},
        {"name": "videos", "source": "good.json", "kind": "frames", "frames_root": "frames", "weight": 1.0},
    ]
    (root / "mix.json").write_text(json.dumps(mix))
    vocab = build_wordpiece_vocab(CAPTIONS + [f"a {c} picture" for c in ("red", "green", "blue", "yellow")])
    write_vocab(vocab, str(root / "vocab.txt"))
    for per_batch in (True, False):
        cfg = CosaPretrainConfig(
            data=str(root),
            train_data="mix.json",
            vocab_file=str(root / "vocab.txt"),
            max_text_tokens=16,
            seed=3,
            shuffle_buffer=1,
            no_mix_per_batch=not per_batch,
        )
        task = CosaPretrainTask(cfg)
        task.image_size, task.image_mean, task.image_std = 8, (0.0,) * 3, (1.0,) * 3
        task.load_dataset("train")
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=2, num_workers=0)
        assert len(itr) == (24 + 4) // 2
        kinds = []
        for batch in itr.next_epoch_itr(shuffle=True):
            kinds.append(frozenset("video" if key.startswith("v") else "image" for key in batch["id"]))
            assert batch["net_input"]["frames"].shape == (2, 1, 3, 8, 8)  # pretraining: 1 frame per clip
        if per_batch:  # the released per-step dataset choice: every batch from one source, both sources used
            assert set(kinds) == {frozenset({"video"}), frozenset({"image"})}
        else:
            assert frozenset({"video", "image"}) in kinds


@pytest.mark.parametrize("video_id", ["../outside", "v0/../../outside", "/absolute"])
def test_video_id_leaving_the_frames_root_is_a_counted_skip(tmp_path, video_id):
    """COSA's decoder lists frames of ``<frames_root>/<video_id>``: a video_id that climbs out of the frames root
    (or is absolute) is refused as a bad sample, although the folder it names holds frames."""
    write_clip(str(tmp_path / "frames"), "v0", 4, 20)
    write_clip(str(tmp_path), "outside", 4, 200)
    if video_id == "/absolute":
        video_id = str(tmp_path / "outside")
    (tmp_path / "train.json").write_text(
        json.dumps([{"video_id": video_id, "desc": CAPTIONS[0]}, {"video_id": "v0", "desc": CAPTIONS[1]}])
    )
    write_vocab(build_wordpiece_vocab(CAPTIONS), str(tmp_path / "vocab.txt"))
    plan, _ = make_plan(tmp_path, 2, train=False, batch_size=2)
    batch, meta = next(worker_batches(plan, 1, 0, 0, 1))
    assert batch["id"] == ["v0"]
    assert meta["bad"] == 1 and meta["reasons"] == {"unsafe video_id": 1}
    with pytest.raises(BadSample, match="unsafe video_id"):
        list_video_frames(str(tmp_path / "frames"), video_id)
