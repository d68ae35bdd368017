"""COSMOS data (ExplainableML/cosmos): the text-crop sampler (``src/training/data.py`` ``sample_dict``), the image
multi-crop transform (``src/open_clip/transform.py`` ``DataAugmentationMulticrop``) and the view-major collater
(``src/training/train.py``)."""

import random
from collections import Counter

import pytest
import torch
from PIL import Image, ImageDraw

from unilm_vl.data.decode import BadSample
from unilm_vl.data.multicrop import (
    CollateMultiCrop,
    MultiCropImage,
    MultiCropTransform,
    RandomGaussianBlur,
    RandomSolarize,
    TextCrops,
    sample_from_list,
    split_caption,
    text_crops,
)
from unilm_vl.data.stages import TokenizeViews
from unilm_vl.data.tokenizers import TokenizerConfig, build_tokenizer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
LONG = "There is one shape in the picture. The red circle is large. The background is grey.\nIt is bright</s>done."


def test_split_caption():
    assert split_caption("A. B\nC</s>D.") == ["A", "B", "C", "D"]
    assert split_caption(" . \n  x  ") == ["x"]


@pytest.mark.parametrize("n,m", [(3, 8), (2, 5), (4, 6), (1, 3), (5, 7)])
def test_sample_when_the_list_is_short(n, m):
    items = [f"s{i}" for i in range(n)]
    out = sample_from_list(items, m, random.Random(0))
    assert len(out) == m
    counts = Counter(out)
    assert set(counts.values()) <= {m // n, m // n + 1}
    assert out[: (m // n) * n] == (m // n) * items  # whole copies of L in their original order come first
    assert len(set(out[(m // n) * n :])) == m % n  # then a remainder without repeats


def test_sample_when_the_list_is_long_has_no_repeats():
    items = list("abcdefghij")
    out = sample_from_list(items, 6, random.Random(3))
    assert len(out) == 6 and len(set(out)) == 6 and set(out) <= set(items)
    assert sorted(sample_from_list(items[:4], 4, random.Random(1))) == items[:4]  # |L| = m: a permutation
    assert sample_from_list(items, 0, random.Random(1)) == []
    with pytest.raises(ValueError):
        sample_from_list([], 2, random.Random(0))


def test_text_crops_global_and_local():
    sentences = ["a red circle", "it is large", "the background is grey", "there is one shape"]
    for seed in range(30):
        out = text_crops(sentences, 8, random.Random(seed))
        assert len(out) == 8
        for caption in out[:2]:  # global: 1-5 list elements joined with '. '
            parts = caption.split(". ")
            assert 1 <= len(parts) <= 5 and set(parts) <= set(sentences)
        assert all(caption in sentences for caption in out[2:])  # local: single elements
        assert sorted(out[2:6]) == sorted(sentences)  # |L| = 4 < 6: one whole copy, then 2 more


def sample(seed=11, meta=None):
    return {
        "__key__": "k",
        "__where__": "shard.tar[0]",
        "__seed__": seed,
        "caption": "a red circle",
        "meta": {"long_caption": LONG} if meta is None else meta,
    }


def test_text_crops_stage_is_seeded_by_the_sample_seed():
    stage = TextCrops("textcrop", 8, ("long_caption",))
    assert stage.sentences(sample()) == [
        "a red circle",
        "There is one shape in the picture",
        "The red circle is large",
        "The background is grey",
        "It is bright",
        "done",
    ]
    a, b = stage(sample(11))["captions"], stage(sample(11))["captions"]
    assert a == b and len(a) == 8
    assert any(stage(sample(s))["captions"] != a for s in range(12, 20))
    # sentence lists (DreamLIP-style recaptions) are used as they are
    listed = stage.sentences(sample(meta={"long_caption": ["one. two", "three"]}))
    assert listed == ["a red circle", "one. two", "three"]
    with pytest.raises(BadSample, match="long_caption"):
        stage(sample(meta={"other": "x"}))
    assert TextCrops("raw", 1)(sample())["captions"] == ["a red circle"]
    with pytest.raises(ValueError):
        TextCrops("textcrop", 1)


def picture():
    img = Image.new("RGB", (70, 60), (40, 90, 200))
    ImageDraw.Draw(img).ellipse((10, 10, 50, 45), fill=(230, 30, 30))
    return img


def test_blur_and_solarize_probabilities():
    img = picture()
    random.seed(0)
    assert RandomGaussianBlur(0.0)(img) is img and RandomSolarize(0.0)(img) is img
    blurred = RandomGaussianBlur(1.0)(img)
    assert blurred is not img and blurred.tobytes() != img.tobytes()
    solarized = RandomSolarize(1.0)(img)
    assert solarized.getpixel((0, 0)) == (40, 90, 255 - 200)  # values >= 128 inverted


def test_multicrop_shapes_and_replay():
    transform = MultiCropTransform(64, 32, MEAN, STD, crop_scale=0.4, num_local=6)
    torch.manual_seed(5)
    random.seed(5)
    globals_, locals_ = transform(picture())
    assert [tuple(t.shape) for t in globals_] == [(3, 64, 64)] * 2
    assert [tuple(t.shape) for t in locals_] == [(3, 32, 32)] * 6
    torch.manual_seed(5)
    random.seed(5)
    again = transform(picture())
    for x, y in zip(globals_ + locals_, again[0] + again[1]):
        torch.testing.assert_close(x, y)
    assert not torch.equal(globals_[0], globals_[1])
    with pytest.raises(ValueError, match="global-crops-number"):
        MultiCropTransform(64, 32, MEAN, STD, num_global=3)


def test_collater_is_view_major():
    tokenizer = build_tokenizer(TokenizerConfig(text_tokenizer="open_clip", context_length=16))
    image_stage = MultiCropImage(MultiCropTransform(64, 32, MEAN, STD, crop_scale=0.4, num_local=2))
    text_stage = TextCrops("textcrop", 4)
    tok = TokenizeViews(tokenizer, 16, field="captions", out="text_views")
    samples = []
    for i in range(3):
        s = sample(seed=i)
        s["__key__"] = f"k{i}"
        s["image"] = picture()
        samples.append(tok(text_stage(image_stage(s))))
    batch = CollateMultiCrop(pad_id=tokenizer.pad_id)(samples)
    net = batch["net_input"]
    assert net["image"].shape == (2, 3, 3, 64, 64) and net["image_local"].shape == (2, 3, 3, 32, 32)
    assert net["text"].shape == (4, 3, 16) and batch["nsentences"] == 3 and batch["id"] == ["k0", "k1", "k2"]
    for b, s in enumerate(samples):
        for v in range(2):
            assert torch.equal(net["image"][v, b], s["global_crops"][v])
            assert torch.equal(net["image_local"][v, b], s["local_crops"][v])
        for u in range(4):
            assert torch.equal(net["text"][u, b], s["text_views"][u])
    assert batch["ntokens"] == int((net["text"] != tokenizer.pad_id).sum())
