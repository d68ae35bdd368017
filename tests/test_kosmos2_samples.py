"""Kosmos-2 GRIT samples and batch layout against the release's loader (microsoft/unilm
kosmos-2/unilm/data/vl/laion2b_obj_loader.py and obj_utils.py)."""

import os

import pytest
import torch
from PIL import Image

from unilm_vl.data.decode import BadSample
from unilm_vl.data.kosmos2_samples import (
    CollateKosmos2,
    GritEntry,
    GritGroundedCaption,
    center_crop_box,
    char_span_to_token_span,
    grounded_pieces,
    parse_grit_entries,
    select_grounded_spans,
)

from conftest import GRIT_README_IDS, SHARED

REFERENCE = os.path.join(SHARED, "reference", "kosmos2")
CAPTION = "a wire hanger with a paper cover that reads we heart our customers"
BOX_COVER = (0.019644069503434333, 0.31054004033406574, 0.9622142865754519, 0.9603442351023356)
BOX_HANGER = (0.019422357885505368, 0.027634161214033764, 0.9593302408854166, 0.969467560450236)
# The GRIT README record (1024 x 693): noun chunks and referring expressions of the same two boxes.
README_ANNOTATION = {
    "phrase": [[19, 32, *BOX_COVER, 0.79298526], [0, 13, *BOX_HANGER, 0.67520964]],
    "expression_v1": [[19, 66, *BOX_COVER, 0.79298526], [0, 66, *BOX_HANGER, 0.67520964]],
}


@pytest.fixture(scope="module")
def tokenizer():
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        if not os.path.isfile(os.path.join(REFERENCE, name)):
            pytest.skip(
                f"Kosmos-2 reference file not present: {os.path.join(REFERENCE, name)} "
                "(the shared reference checkout is absent)"
            )
    from unilm_vl.data.grounding import build_kosmos2_tokenizer

    return build_kosmos2_tokenizer(
        os.path.join(REFERENCE, "sentencepiece.bpe.model"), os.path.join(REFERENCE, "dict.txt")
    )


def readme_sample(annotation=README_ANNOTATION, caption=CAPTION):
    return {
        "__key__": "155439",
        "__seed__": 7,
        "__where__": "readme.tsv:1",
        "caption": caption,
        "image": Image.new("RGB", (1024, 693)),
        "meta": {"annotation": str(annotation)},
    }


def test_center_crop_box_reference_case():
    box = center_crop_box(BOX_COVER, (1024, 693))  # resized 330 x 224, left offset 53
    assert box == pytest.approx((0.0, 0.31054004, 1.0, 0.96034424), abs=1e-6)
    # a box mostly in the cropped-away left margin keeps < 20% of its area: dropped
    assert center_crop_box((0.0, 0.0, 0.2, 1.0), (1024, 693)) is None
    assert center_crop_box((0.0, 0.0, 0.02, 1.0), (1024, 693)) is None  # fully outside: empty
    # a square image is only resized: the box is unchanged
    assert center_crop_box((0.1, 0.2, 0.3, 0.4), (500, 500)) == pytest.approx((0.1, 0.2, 0.3, 0.4))
    # portrait: the crop is vertical; offset (int(224 * 400 / 200) - 224) / 2 = 112 px
    assert center_crop_box((0.0, 0.25, 1.0, 0.75), (200, 400)) == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_expression_mode_keeps_outermost_spans_and_merges_identical_ones():
    entries = [
        GritEntry(19, 66, (0.1, 0.1, 0.5, 0.5), 0.9),
        GritEntry(0, 66, (0.0, 0.0, 1.0, 1.0), 0.8),
        GritEntry(0, 66, (0.2, 0.2, 0.4, 0.4), 0.7),
        GritEntry(30, 40, (0.1, 0.1, 0.2, 0.2), 0.5),
    ]
    spans = select_grounded_spans(entries, (224, 224), mode="expression")
    assert [(s.start, s.end) for s in spans] == [(0, 66)]
    assert spans[0].boxes == [(0.0, 0.0, 1.0, 1.0), (0.2, 0.2, 0.4, 0.4)]  # annotation order
    phrase = select_grounded_spans(entries, (224, 224), mode="phrase")  # no root filter; score filter only
    assert [(s.start, s.end) for s in phrase] == [(0, 66), (19, 66)]


def test_parse_grit_entries_rejects_bad_boxes_and_spans():
    assert parse_grit_entries([[0, 1, 0, 0, 1, 1, 0.9]], "a")[0] == GritEntry(0, 1, (0.0, 0.0, 1.0, 1.0), 0.9)
    with pytest.raises(ValueError, match="outside"):
        parse_grit_entries([[0, 1, -0.1, 0, 1, 1, 0.9]], "a")
    with pytest.raises(ValueError, match="not inside the caption"):
        parse_grit_entries([[0, 5, 0, 0, 1, 1, 0.9]], "a")
    with pytest.raises(ValueError, match="start, end"):
        parse_grit_entries([[0, 1, 0, 0, 1]], "a")


def test_grounded_pieces_markup_order():
    pieces = ["\u2581a", "\u2581dog", "\u2581and", "\u2581cat"]
    out = grounded_pieces(pieces, [(0, 2, [(1, 2), (3, 4)]), (3, 4, [(5, 6)])])
    assert out == [
        "<grounding>",
        "<phrase>",
        "\u2581a",
        "\u2581dog",
        "</phrase>",
        "<object>",
        "<patch_index_0001>",
        "<patch_index_0002>",
        "</delimiter_of_multi_objects/>",
        "<patch_index_0003>",
        "<patch_index_0004>",
        "</object>",
        "\u2581and",
        "<phrase>",
        "\u2581cat",
        "</phrase>",
        "<object>",
        "<patch_index_0005>",
        "<patch_index_0006>",
        "</object>",
    ]
    with pytest.raises(ValueError, match="no box"):
        grounded_pieces(pieces, [(0, 1, [])])


def test_readme_record_serialises_to_the_reference_ids(tokenizer):
    stage = GritGroundedCaption(tokenizer, mode="phrase", use_object_bbox_prob=1.0)
    sample = stage(readme_sample())
    assert sample["grounded"] and sample["tokens"] == GRIT_README_IDS
    text = tokenizer.dictionary.string(torch.tensor(sample["tokens"]), bpe_symbol="sentencepiece")
    assert text.startswith(
        "<grounding><phrase> a wire hanger</phrase><object><patch_index_0000><patch_index_1023>"
        "</object> with<phrase> a paper cover</phrase><object><patch_index_0288>"
    )


def test_readme_record_expression_mode_and_plain_caption(tokenizer):
    grounded = GritGroundedCaption(tokenizer, mode="expression", use_object_bbox_prob=1.0)(readme_sample())
    ids = grounded["tokens"]
    assert ids[:2] == [64012, 64007] and ids[-6:] == [64008, 64009, 64013, 65036, 64010, 2]  # one phrase, root box
    plain = GritGroundedCaption(tokenizer, use_object_bbox_prob=0.0)(readme_sample())
    assert not plain["grounded"] and plain["tokens"] == tokenizer.encode(CAPTION) + [2]


def test_grounded_choice_is_seeded_by_the_sample(tokenizer):
    stage = GritGroundedCaption(tokenizer, mode="phrase", use_object_bbox_prob=0.5)
    draws = [stage(dict(readme_sample(), __seed__=s))["grounded"] for s in range(40)]
    again = [stage(dict(readme_sample(), __seed__=s))["grounded"] for s in range(40)]
    assert draws == again and 5 < sum(draws) < 35


def test_bad_annotation_is_a_counted_skip(tokenizer):
    stage = GritGroundedCaption(tokenizer, mode="phrase", use_object_bbox_prob=1.0)
    bad_box = {"phrase": [[0, 13, 0.1, 0.1, 1.4, 0.9, 0.9]]}
    with pytest.raises(BadSample, match=r"outside \[0, 1\].*readme.tsv:1"):
        stage(readme_sample(bad_box))
    with pytest.raises(BadSample, match="not JSON or a Python literal"):
        stage(dict(readme_sample(), meta={"annotation": "{not a literal"}))


def test_span_starting_inside_a_piece_and_misaligned_span(tokenizer):
    pieces = tokenizer.encode_pieces
    assert char_span_to_token_span(pieces, CAPTION, 0, 13) == (0, 3)  # "a wire hanger"
    assert char_span_to_token_span(pieces, CAPTION, 19, 32) == (4, 7)  # " a paper cover" after "with"
    assert char_span_to_token_span(pieces, CAPTION, 7, 13) == (2, 3)  # "hanger": the space is not a piece
    # "per" of "a paper" starts inside the piece "\u2581paper": pieces("a pa") is not a prefix but its first
    # piece is, so the span starts one piece earlier (the release's b[:-1] rule)
    assert pieces("a pa") == ["\u2581a", "\u2581pa"] and pieces("a paper") == ["\u2581a", "\u2581paper"]
    assert char_span_to_token_span(pieces, "a paper", 4, 7) == (1, 2)
    with pytest.raises(ValueError, match="does not align"):  # "tomers": pieces of "cus" are not a prefix
        char_span_to_token_span(pieces, "customers", 3, 9)


def test_collate_masks_match_the_reference_layout():
    collate = CollateKosmos2(bos_id=0, pad_id=1, image_id=64003, image_end_id=64004, num_image_tokens=64)
    caption = [64012, 10, 6454, 2]
    text_only = [5, 6, 2]
    batch = collate(
        [{"__key__": "a", "tokens": caption, "image": torch.zeros(3, 8, 8)}, {"__key__": "b", "tokens": text_only}]
    )
    n = len(caption)
    src, tgt = batch["net_input"]["src_tokens"], batch["target"]
    assert src.shape == (2, 66 + n) and batch["ntokens"] == (67 + n) + (1 + len(text_only))
    img_mask, loss_mask = batch["net_input"]["image_mask"], batch["loss_mask"]
    assert img_mask[0].nonzero().flatten().tolist() == list(range(2, 66))
    assert loss_mask[0].nonzero().flatten().tolist() == list(range(66, 66 + n))
    assert tgt[0][loss_mask[0]].tolist() == caption
    assert src[0, :2].tolist() == [0, 64003] and src[0, 66].item() == 64004
    # the text-only row: <s> ids, loss on every real target, right-padded, no image rows
    assert src[1, :3].tolist() == [0, 5, 6] and (src[1, 3:] == 1).all() and not img_mask[1].any()
    assert tgt[1][loss_mask[1]].tolist() == text_only
    assert batch["net_input"]["image"].shape == (1, 3, 8, 8)


def test_text_only_documents_from_jsonl_and_txt(tmp_path):
    from unilm_vl.data.build_vocab import train_vocab
    from unilm_vl.data.grounding import build_kosmos2_tokenizer
    from unilm_vl.data.sources import READERS, decode_record, parse_data_spec

    train_vocab(
        ["a red circle", "a blue square above a green star", "two lines of text"] * 20,
        str(tmp_path / "v"),
        vocab_size=60,
    )
    tok = build_kosmos2_tokenizer(
        str(tmp_path / "v" / "sentencepiece.bpe.model"), str(tmp_path / "v" / "dict.txt"), num_bins=4
    )
    (tmp_path / "docs.jsonl").write_text('{"text": "a red circle\\ntwo lines"}\n\nnot json\n{"txt": 1}\n')
    (tmp_path / "docs.txt").write_text("a blue square\\na green star\n")
    spec = parse_data_spec("docs.jsonl", root=str(tmp_path))[0]
    assert spec.kind == "text"
    raws = list(READERS["text"](spec.shards[0], spec))
    assert len(raws) == 3  # the empty line is not a record
    doc = decode_record(raws[0], spec)
    with pytest.raises(BadSample, match="not JSON"):
        decode_record(raws[1], spec)
    with pytest.raises(BadSample, match="string 'text'"):
        decode_record(raws[2], spec)
    stage = GritGroundedCaption(tok, num_bins=4)
    ids = stage(doc)["tokens"]
    line_end = tok.dictionary.index("</line>")
    assert ids == tok.encode("a red circle") + [line_end] + tok.encode("two lines") + [2]
    txt_spec = parse_data_spec("docs.txt", root=str(tmp_path))[0]
    txt_doc = decode_record(next(READERS["text"](txt_spec.shards[0], txt_spec)), txt_spec)
    assert txt_doc["text"] == "a blue square\na green star" and "image" not in txt_doc
    short = GritGroundedCaption(tok, num_bins=4, max_text_tokens=3)(dict(doc))["tokens"]
    assert short == ids[:2] + [2]


@pytest.mark.parametrize(
    "entry",
    [
        [0, 1, 10**400, 0, 1, 1, 0.9],  # float() of it raises OverflowError
        [0, 1, float("nan"), 0, 1, 1, 0.9],
        [0, 1, 0, 0, 1, 1, float("nan")],  # a NaN score would pass any threshold test as False and be kept by others
        [0, 1, 0, 0, 1, 1, float("inf")],
        [0, 1, "0.1", 0, 1, 1, 0.9],  # a string where a number goes
        [0, 1, [0.1], 0, 1, 1, 0.9],
        [0, 1, True, 0, 1, 1, 0.9],
        [False, True, 0, 0, 1, 1, 0.9],  # booleans are not character offsets
        [0, 10**400, 0, 0, 1, 1, 0.9],
        [0.0, 1, 0, 0, 1, 1, 0.9],
    ],
)
def test_parse_grit_entries_rejects_absurd_values(entry):
    with pytest.raises(ValueError):
        parse_grit_entries([entry], "a")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from unilm_vl.data.build_vocab import train_vocab
    from unilm_vl.data.grounding import build_kosmos2_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    train_vocab(
        ["a red circle", "a blue square above a green star", "two lines of text"] * 20, str(root), vocab_size=60
    )
    return build_kosmos2_tokenizer(str(root / "sentencepiece.bpe.model"), str(root / "dict.txt"), num_bins=4)


def test_absurd_annotation_json_is_a_bad_sample_not_a_crash(tiny_tokenizer):
    """Valid JSON, absurd values: a 400-digit box coordinate (OverflowError before), NaN, a string."""
    stage = GritGroundedCaption(tiny_tokenizer, mode="phrase", num_bins=4, use_object_bbox_prob=1.0)
    for box in ("1" + "0" * 400 + ", 0, 1, 1", "NaN, 0, 1, 1", '"0.1", 0, 1, 1'):
        sample = {
            "__key__": "k",
            "__seed__": 1,
            "__where__": "x.tsv:3",
            "caption": "a red circle",
            "image": Image.new("RGB", (8, 8)),
            "meta": {"annotation": '{"phrase": [[0, 5, %s, 0.9]]}' % box},
        }
        with pytest.raises(BadSample, match=r"grounding: bad box or score.*x\.tsv:3"):
            stage(sample)


class RecordingTokenizer:
    """Passes through to a tokenizer and records the longest text it was asked to cut into pieces."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def encode_pieces(self, text):
        self.longest = max(self.longest, len(text))
        return self.tokenizer.encode_pieces(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_long_captions_and_documents_are_cut_before_tokenising(tiny_tokenizer):
    """A 1.3 MB caption with max_text_tokens=20 is tokenised as its first 20 * MAX_CHARS_PER_TOKEN characters;
    a span inside them stays grounded, a span past the cut is dropped; documents are cut the same way."""
    from unilm_vl.data.tokenizers import MAX_CHARS_PER_TOKEN

    tok = RecordingTokenizer(tiny_tokenizer)
    stage = GritGroundedCaption(
        tok, mode="phrase", num_bins=4, use_object_bbox_prob=1.0, center_crop=False, max_text_tokens=20
    )
    caption = "a red circle " * 100_000
    cut = caption[: 20 * MAX_CHARS_PER_TOKEN]
    entries = [[0, 12, 0.0, 0.0, 0.5, 0.5, 0.9], [len(caption) - 7, len(caption) - 1, 0.5, 0.5, 1.0, 1.0, 0.9]]
    sample = stage(
        {
            "__key__": "k",
            "__seed__": 1,
            "caption": caption,
            "image": Image.new("RGB", (8, 8)),
            "meta": {"annotation": str({"phrase": entries})},
        }
    )
    assert tok.longest == len(cut)
    short = stage(
        {
            "__key__": "k",
            "__seed__": 1,
            "caption": cut,
            "image": Image.new("RGB", (8, 8)),
            "meta": {"annotation": str({"phrase": entries[:1]})},
        }
    )
    assert sample["grounded"] and sample["tokens"] == short["tokens"]
    tok.longest = 0
    doc = stage({"__key__": "d", "text": caption})["tokens"]
    assert tok.longest <= len(cut) and len(doc) == 20 and doc[-1] == tiny_tokenizer.eos_id
