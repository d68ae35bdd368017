"""Caption augmentation and multi-view stages of the improved CLIP recipe (no downloads, seeded)."""

import collections
import random

import pytest
import torch
from PIL import Image

from unilm_vl.data import text_augment as ta
from unilm_vl.data.stages import CollateMultiView, MultiViewImage, TokenizeViews
from unilm_vl.data.tokenizers import OpenClipTokenizer
from unilm_vl.data.transforms import rocket_global_transform, rocket_view_transform

WORDS = "a small red circle to the left of a large blue square".split()


def test_clean_and_stopwords():
    assert ta.clean_caption("A &amp;amp; B\n\tC") == "a & b c"
    assert ta.remove_stopwords(WORDS, random.Random(0), prob=1.0) == [
        "small",
        "red",
        "circle",
        "left",
        "large",
        "blue",
        "square",
    ]
    assert ta.remove_stopwords(WORDS, random.Random(0), prob=0.0) == WORDS
    assert ta.remove_stopwords(["the", "a"], random.Random(0), prob=1.0) == ["the", "a"]  # never empties a caption


def test_synonym_replacement_replaces_every_occurrence(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("# word<TAB>synonyms\nred\tcrimson,scarlet\nthe\tyon\n")
    lexicon = ta.load_lexicon(str(lex))
    assert lexicon == {"red": ["crimson", "scarlet"], "the": ["yon"]}
    out = ta.synonym_replacement("red box and red ball the".split(), random.Random(3), lexicon)
    assert out[1:4] == ["box", "and"] + [out[0]] and out[0] in ("crimson", "scarlet") and out[-1] == "the"
    bad = tmp_path / "bad.tsv"
    bad.write_text("red crimson\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        ta.load_lexicon(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        ta.load_lexicon(str(tmp_path / "nope.tsv"))


def test_swap_and_deletion():
    swapped = ta.random_swap(WORDS, random.Random(1))
    assert collections.Counter(swapped) == collections.Counter(WORDS)
    assert sum(a != b for a, b in zip(swapped, WORDS)) == 2
    rng = random.Random(2)
    kept = [len(ta.random_deletion(WORDS * 10, rng, p=0.1)) for _ in range(200)]
    assert sum(kept) / len(kept) == pytest.approx(0.9 * len(WORDS) * 10, rel=0.03)
    assert len(ta.random_deletion(["x", "y"], random.Random(0), p=1.0)) == 1


def test_text_views_reproducible_and_shaped():
    stage = ta.TextViews(ta.TextAugmentConfig(num_augs=3, remove_stopwords_prob=1.0))
    random.seed(5)
    a = stage({"caption": "A small red circle to the left of a large blue square"})["captions"]
    random.seed(5)
    b = stage({"caption": "A small red circle to the left of a large blue square"})["captions"]
    assert a == b and len(a) == 4
    assert a[0] == "small red circle left large blue square"  # weak view: stop-words dropped only


def test_multiview_stage_and_collate():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    views = MultiViewImage(rocket_global_transform(32, mean, std), rocket_view_transform(32, mean, std), 2)
    tok = TokenizeViews(OpenClipTokenizer(), 16)
    text = ta.TextViews(ta.TextAugmentConfig(num_augs=2))
    samples = []
    for i in range(3):
        s = {"__key__": str(i), "image": Image.new("RGB", (40, 30), (i * 60, 10, 10)), "caption": f"a red circle {i}"}
        samples.append(tok(text(views(s))))
    batch = CollateMultiView()(samples)
    net = batch["net_input"]
    assert net["image"].shape == (3, 3, 32, 32) and net["image_views"].shape == (2, 3, 3, 32, 32)
    assert net["text"].shape == (3, 16) and net["text_views"].shape == (2, 3, 16)
    torch.testing.assert_close(net["text_views"][1, 2], samples[2]["text_views"][2])
    torch.testing.assert_close(net["image_views"][0, 1], samples[1]["image_views"][0])
