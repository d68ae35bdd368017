"""Kosmos-2 grounding: vocabulary ids from the release files, the box codec and the text parser, against the values
computed with the release (Peng et al. 2023; microsoft/unilm ``kosmos-2/unilm/tasks/gpt_base.py`` and
``kosmos-2/unilm/data/utils.py`` for the vocabulary, ``kosmos-2/unilm/data/vl/obj_utils.py`` for the box codec,
``kosmos-2/demo/decode_string.py`` for the parser) and with HF transformers ``models/kosmos2/processing_kosmos2.py``."""

import os
import pickle
import random

import pytest
import sentencepiece

from unilm_vl.data.grounding import (
    GROUNDING_SPECIALS,
    box_to_patch_indices,
    box_to_pixels,
    build_kosmos2_dictionary,
    build_kosmos2_tokenizer,
    decode_bbox_from_caption,
    find_grounded_objects,
    format_object,
    kosmos2_added_symbols,
    object_boxes,
    object_patch_pairs,
    parse_grounded_text,
    patch_index_token,
    patch_indices_to_box,
)

from conftest import GRIT_README_IDS, SHARED

REFERENCE_DIR = os.path.join(SHARED, "reference", "kosmos2")
REFERENCE_DICT = os.path.join(REFERENCE_DIR, "dict.txt")
REFERENCE_SPM = os.path.join(REFERENCE_DIR, "sentencepiece.bpe.model")
needs_reference = pytest.mark.skipif(
    not (os.path.isfile(REFERENCE_DICT) and os.path.isfile(REFERENCE_SPM)),
    reason=f"Kosmos-2 release vocabulary files (dict.txt, sentencepiece.bpe.model) not found in {REFERENCE_DIR}",
)

SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)
SNOWMAN_BOX = (0.390625, 0.046875, 0.984375, 0.828125)
FIRE_BOX = (0.171875, 0.015625, 0.484375, 0.890625)
TWO_DOGS = (
    "<grounding><phrase> Two dogs</phrase><object><patch_index_0000><patch_index_0527>"
    "</delimiter_of_multi_objects/><patch_index_0016><patch_index_1023></object> play on"
    "<object><patch_index_0900><patch_index_1023></object> grass"
)
GRIT_README_TEXT = (
    "<grounding><phrase> a wire hanger</phrase><object><patch_index_0000><patch_index_1023></object>"
    " with<phrase> a paper cover</phrase><object><patch_index_0288><patch_index_0991></object>"
    " that reads we heart our customers</s>"
)


# ---- vocabulary ------------------------------------------------------------------------------------------------


def test_symbol_list_order():
    assert GROUNDING_SPECIALS == (
        "</doc>",
        "<image>",
        "</image>",
        "</chunk>",
        "</line>",
        "<phrase>",
        "</phrase>",
        "<object>",
        "</object>",
        "</delimiter_of_multi_objects/>",
        "<grounding>",
    )
    assert patch_index_token(0) == "<patch_index_0000>" and patch_index_token(1023) == "<patch_index_1023>"
    symbols = kosmos2_added_symbols(32)
    assert len(symbols) == 1 + 11 + 1024
    assert symbols[:2] == ["<mask>", "</doc>"] and symbols[12] == "<patch_index_0000>"
    assert len(kosmos2_added_symbols(16)) == 1 + 11 + 256
    with pytest.raises(ValueError, match="-1"):
        patch_index_token(-1)


@needs_reference
def test_dictionary_ids_and_size():
    d = build_kosmos2_dictionary(REFERENCE_DICT)
    assert len(d) == 65037
    expected = {
        "<s>": 0,
        "<pad>": 1,
        "</s>": 2,
        "<unk>": 3,
        "<mask>": 64001,
        "</doc>": 64002,
        "<image>": 64003,
        "</image>": 64004,
        "<phrase>": 64007,
        "</phrase>": 64008,
        "<object>": 64009,
        "</object>": 64010,
        "</delimiter_of_multi_objects/>": 64011,
        "<grounding>": 64012,
        "\u2581the": 5,
        ".": 4,
    }
    assert {s: d.index(s) for s in expected} == expected
    assert [d.index(patch_index_token(k)) for k in range(1024)] == list(range(64013, 65037))
    assert d[65036] == "<patch_index_1023>"
    assert not any(d[i].startswith("madeupword") for i in range(len(d)))


@needs_reference
def test_dictionary_other_grid_size():
    d = build_kosmos2_dictionary(REFERENCE_DICT, num_bins=16)
    assert len(d) == 64013 + 256
    assert d.index("<patch_index_0255>") == 64013 + 255


def test_dictionary_missing_file(tmp_path):
    missing = str(tmp_path / "no_such_dict.txt")
    with pytest.raises(FileNotFoundError, match="no_such_dict.txt"):
        build_kosmos2_dictionary(missing)


@needs_reference
def test_tokenizer_matches_dictionary_and_spm():
    tok = build_kosmos2_tokenizer(REFERENCE_SPM, REFERENCE_DICT)
    assert tok.vocab_size == 65037
    d = build_kosmos2_dictionary(REFERENCE_DICT)
    assert [tok.dictionary[i] for i in range(len(d))] == [d[i] for i in range(len(d))]
    spm = sentencepiece.SentencePieceProcessor(model_file=REFERENCE_SPM)
    assert spm.get_piece_size() == 64000
    assert all(tok.dictionary.index(spm.id_to_piece(s)) == s + 1 for s in range(3, 64000))  # check 2
    assert tok.encode("An image of") == [712, 1648, 9]  # check 3
    assert tok.encode(" ") == []
    assert tok.encode_pieces("Describe this image in detail:") == [
        "\u2581Describ",
        "e",
        "\u2581this",
        "\u2581image",
        "\u2581in",
        "\u2581detail",
        ":",
    ]
    assert tok.encode("<grounding>An image of", split_symbols=True) == [64012, 712, 1648, 9]  # check 12
    assert pickle.loads(pickle.dumps(tok)).encode("<grounding>", split_symbols=True) == [64012]


@needs_reference
def test_grit_readme_serialisation_round_trip():
    """The 27 ids of the README record detokenise to the release's string and re-encode to the same ids."""
    tok = build_kosmos2_tokenizer(REFERENCE_SPM, REFERENCE_DICT)
    assert tok.decode(GRIT_README_IDS, skip_special=False) == GRIT_README_TEXT
    body = GRIT_README_TEXT[: -len("</s>")]
    assert tok.encode(body, split_symbols=True) + [tok.eos_id] == GRIT_README_IDS
    clean, entities = parse_grounded_text(GRIT_README_TEXT)
    assert clean == "a wire hanger with a paper cover that reads we heart our customers"
    assert entities == [
        ("a wire hanger", (0, 13), [(1 / 64, 1 / 64, 63 / 64, 63 / 64)]),
        ("a paper cover", (19, 32), [(0.015625, 0.296875, 0.984375, 0.953125)]),
    ]


# ---- box codec -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box, release, hf",
    [
        ((0, 0, 1, 1), (0, 1023), (0, 1023)),
        ((0.1, 0.2, 0.5, 0.75), (195, 784), (195, 751)),
        ((0.25, 0.25, 0.5, 0.5), (264, 528), (264, 495)),
    ],
)
def test_encoders(box, release, hf):
    assert box_to_patch_indices(box) == release
    assert box_to_patch_indices(box, mode="release") == release
    assert box_to_patch_indices(box, mode="hf") == hf


def test_encoders_agree_off_grid_lines():
    rng = random.Random(0)
    for _ in range(2000):
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        box = (x0, y0, x1, y1)
        assert box_to_patch_indices(box) == box_to_patch_indices(box, mode="hf"), box


@pytest.mark.parametrize(
    "pair, box",
    [
        ((44, 863), SNOWMAN_BOX),
        ((5, 911), FIRE_BOX),
        ((0, 1023), (1 / 64, 1 / 64, 63 / 64, 63 / 64)),
        ((33, 33), (1 / 32, 1 / 32, 1 / 16, 1 / 16)),  # same cell: edges
        ((0, 31), (0.0, 0.0, 1.0, 1 / 32)),  # same row: edges
        ((0, 992), (0.0, 0.0, 1 / 32, 1.0)),  # same column: edges
        ((264, 528), (0.265625, 0.265625, 0.515625, 0.515625)),
    ],
)
def test_decoder(pair, box):
    assert patch_indices_to_box(*pair) == box


def test_decoder_other_grid_size():
    assert patch_indices_to_box(0, 15, num_bins=4) == (0.125, 0.125, 0.875, 0.875)
    assert patch_indices_to_box(5, 5, num_bins=4) == (0.25, 0.25, 0.5, 0.5)


def test_box_to_pixels_is_float():
    """The one pixel conversion of every evaluation: ``x * W`` without truncation (a 0.29 x 10 px edge stays 2.9)."""
    assert box_to_pixels((0.05, 0.05, 0.29, 0.29), 10, 10) == pytest.approx((0.5, 0.5, 2.9, 2.9))
    assert box_to_pixels((0.0, 0.0, 1.0, 1.0), 200, 100, "squash") == (0.0, 0.0, 200.0, 100.0)
    assert box_to_pixels((0.0, 0.0, 1.0, 1.0), 200, 100, "crop") == (50.0, 0.0, 150.0, 100.0)  # central square
    assert box_to_pixels((0.25, 0.5, 0.75, 1.0), 100, 300, "crop") == (25.0, 150.0, 75.0, 200.0)
    assert box_to_pixels((0.1, 0.1, 0.2, 0.2), 7, 5, "crop") == pytest.approx((1.5, 0.5, 2.0, 1.0))
    with pytest.raises(ValueError, match="view must be one of"):
        box_to_pixels((0, 0, 1, 1), 10, 10, "pad")


def test_box_token_box_round_trip():
    """Release encoder + decoder, 10^5 random boxes."""
    rng = random.Random(1)
    worst_centre = worst_edge = 0.0
    for _ in range(100_000):
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        ul, lr = box_to_patch_indices((x0, y0, x1, y1))
        decoded = patch_indices_to_box(ul, lr)
        error = max(abs(a - b) for a, b in zip(decoded, (x0, y0, x1, y1)))
        if ul % 32 != lr % 32 and ul // 32 != lr // 32:
            worst_centre = max(worst_centre, error)
        else:
            worst_edge = max(worst_edge, error)
    assert worst_centre <= 1 / 64
    assert worst_edge < 1 / 32


def ordered_pairs(num_bins):
    """Every ``(ul, lr)`` whose lower-right cell is neither left of nor above the upper-left one."""
    p = num_bins
    return [
        (uy * p + ux, ly * p + lx) for uy in range(p) for ly in range(uy, p) for ux in range(p) for lx in range(ux, p)
    ]


def test_token_box_token_round_trip():
    """The hf encoder inverts the decoder on all 278,784 ordered pairs; the release one fails on 32,705."""
    pairs = ordered_pairs(32)
    assert len(pairs) == 278_784
    release_failures = 0
    for ul, lr in pairs:
        box = patch_indices_to_box(ul, lr)
        assert box_to_patch_indices(box, mode="hf") == (ul, lr)
        release_failures += box_to_patch_indices(box, mode="release") != (ul, lr)
    assert release_failures == 32_705
    assert box_to_patch_indices(patch_indices_to_box(0, 0)) == (0, 33)


@pytest.mark.parametrize("num_bins", [20, 24, 40])
def test_hf_encoder_inverts_the_decoder_on_every_grid(num_bins):
    """The documented claim of box_to_patch_indices: decode-then-encode is the identity on every ordered pair of a
    grid that is not a power of two too, where HF's uncorrected float formula is not (test_hf_codec_bit_for_bit)."""
    pairs = ordered_pairs(num_bins)
    assert len(pairs) == (num_bins * (num_bins + 1) // 2) ** 2
    wrong = [
        (ul, lr)
        for ul, lr in pairs
        if box_to_patch_indices(patch_indices_to_box(ul, lr, num_bins), num_bins, mode="hf") != (ul, lr)
    ]
    assert wrong == []


def test_hf_codec_bit_for_bit():
    """Against HF transformers' own ``patch_index_to_coordinate`` / ``coordinate_to_patch_index``: the decoder is
    theirs bit for bit on every grid; the hf encoder is theirs bit for bit at the released P = 32 (every decoded
    pair, random boxes, boxes on grid lines); on P = 24 their encoder does not invert their decoder, ours does."""
    hf = pytest.importorskip(
        "transformers.models.kosmos2.processing_kosmos2",
        reason="transformers (test-only: HF parity of the box codec) is not installed",
    )
    for num_bins in (24, 32):
        for ul, lr in ordered_pairs(num_bins):
            box = patch_indices_to_box(ul, lr, num_bins)
            assert box == hf.patch_index_to_coordinate(ul, lr, num_bins), (num_bins, ul, lr)
            if num_bins == 32:
                assert box_to_patch_indices(box, 32, mode="hf") == hf.coordinate_to_patch_index(box, 32) == (ul, lr)
    rng = random.Random(2)
    grid = [k / 32 for k in range(33)]
    for _ in range(20_000):
        x0, x1 = sorted(rng.sample(grid, 2) if rng.random() < 0.3 else (rng.random(), rng.random()))
        y0, y1 = sorted(rng.sample(grid, 2) if rng.random() < 0.3 else (rng.random(), rng.random()))
        if x1 > x0 and y1 > y0:
            box = (x0, y0, x1, y1)
            assert box_to_patch_indices(box, 32, mode="hf") == hf.coordinate_to_patch_index(box, 32), box
    # HF's own formula at P = 24: the left edge of column 7 decodes to 7 * (1 / 24) = 0.29166666666666663, and
    # floor(0.29166666666666663 * 24) = floor(6.999999999999999) = 6, so the pair (7, 7) comes back as (6, 7)
    assert hf.coordinate_to_patch_index(hf.patch_index_to_coordinate(7, 7, 24), 24) == (6, 7)
    assert box_to_patch_indices(patch_indices_to_box(7, 7, 24), 24, mode="hf") == (7, 7)
    hf_wrong = [
        (ul, lr)
        for ul, lr in ordered_pairs(24)
        if hf.coordinate_to_patch_index(hf.patch_index_to_coordinate(ul, lr, 24), 24) != (ul, lr)
    ]
    assert len(hf_wrong) == 2296


def test_release_encoder_accepts_degenerate_boxes():
    assert box_to_patch_indices((0.5, 0.5, 0.5, 0.5)) == (528, 528)
    assert box_to_patch_indices((0.2, 0.3, 0.2, 1.0)) == (9 * 32 + 6, 31 * 32 + 6)
    assert box_to_patch_indices((0.0, 0.0, 0.5, 0.5), num_bins=2) == (0, 3)
    assert box_to_patch_indices((0.0, 0.0, 0.5, 0.5), num_bins=2, mode="hf") == (0, 0)


@pytest.mark.parametrize(
    "box, mode",
    [
        ((-0.1, 0.0, 0.5, 0.5), "release"),
        ((0.0, 0.0, 1.2, 0.5), "release"),
        ((0.6, 0.0, 0.5, 0.5), "release"),  # x1 < x0
        ((0.0, 0.6, 0.5, 0.5), "hf"),  # y1 < y0
        ((0.5, 0.5, 0.5, 0.9), "hf"),  # zero width: hf needs x1 > x0
        ((1.0, 0.5, 1.0, 0.9), "release"),  # upper-left corner on the right border
        ((float("nan"), 0.0, 0.5, 0.5), "release"),
    ],
)
def test_encoder_rejects_bad_boxes(box, mode):
    with pytest.raises(ValueError) as info:
        box_to_patch_indices(box, mode=mode)
    assert repr(box) in str(info.value)


def test_encoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        box_to_patch_indices((0, 0, 1, 1), mode="center")
    with pytest.raises(ValueError, match="four numbers"):
        box_to_patch_indices((0, 0, 1))
    with pytest.raises(ValueError, match="num_bins"):
        box_to_patch_indices((0, 0, 1, 1), num_bins=0)


@pytest.mark.parametrize("pair", [(-1, 5), (0, 1024), (1024, 1024), (3.0, 5)])
def test_decoder_rejects_bad_indices(pair):
    with pytest.raises(ValueError, match=r"outside \[0, 1024\)"):
        patch_indices_to_box(*pair)


# ---- object chunks and parsing ---------------------------------------------------------------------------------


def test_object_chunk_helpers():
    chunk = (
        "<object><patch_index_0000><patch_index_0527></delimiter_of_multi_objects/>"
        "<patch_index_0016><patch_index_1023></object>"
    )
    assert format_object([(0, 527), (16, 1023)]) == chunk
    assert object_patch_pairs(chunk) == [(0, 527), (16, 1023)]
    assert object_patch_pairs("<patch_index_0044><patch_index_0863>") == [(44, 863)]
    assert object_boxes(chunk) == [(1 / 64, 1 / 64, 31 / 64, 33 / 64), (33 / 64, 1 / 64, 63 / 64, 63 / 64)]
    for bad in (
        "<object><patch_index_0044></object>",
        "<object>x<patch_index_1><patch_index_2></object>",
        "<object></object>",
    ):
        with pytest.raises(ValueError, match="not an object chunk"):
            object_patch_pairs(bad)
    with pytest.raises(ValueError, match="at least one"):
        format_object([])


def test_parse_snowman_like_hf():
    """Check 18, HF part: the tuple from the HF ``post_process_generation`` docs."""
    assert parse_grounded_text(SNOWMAN) == (
        "An image of a snowman warming himself by a fire.",
        [("a snowman", (12, 21), [SNOWMAN_BOX]), ("a fire", (41, 47), [FIRE_BOX])],
    )
    # Everything up to the last </image> is dropped, as in post_process_generation.
    with_prompt = "<image>" + "<image>" * 64 + "</image>" + SNOWMAN + "</s>"
    assert parse_grounded_text(with_prompt) == parse_grounded_text(SNOWMAN)


def test_decode_bbox_from_caption_snowman():
    """Check 18, release part: flat rows, names with their leading space."""
    assert decode_bbox_from_caption(SNOWMAN) == [[" a snowman", *SNOWMAN_BOX], [" a fire", *FIRE_BOX]]


def test_parse_multi_box_and_unnamed():
    """Check 19."""
    dog_boxes = [(1 / 64, 1 / 64, 31 / 64, 33 / 64), (33 / 64, 1 / 64, 63 / 64, 63 / 64)]
    grass_box = (9 / 64, 57 / 64, 63 / 64, 63 / 64)
    clean, entities = parse_grounded_text(TWO_DOGS)
    assert clean == "Two dogs play on grass"
    assert entities == [("Two dogs", (0, 8), dog_boxes), ("<patch_index_900><patch_index_1023>", (16, 16), [grass_box])]
    assert decode_bbox_from_caption(TWO_DOGS) == [
        [" Two dogs", *dog_boxes[0]],
        [" Two dogs", *dog_boxes[1]],
        ["<0900><1023>", *grass_box],
    ]


def test_parse_space_before_object_is_unnamed():
    """``</phrase>`` must be followed directly by ``<object>``."""
    text = "<phrase>a dog</phrase> <object><patch_index_0000><patch_index_0001></object>"
    objects = find_grounded_objects(text)
    assert len(objects) == 1 and objects[0].name is None and objects[0].pairs == [(0, 1)]
    clean, entities = parse_grounded_text(text)
    assert clean == "a dog"
    # HF keeps the raw offset of the object (after "a dog "), one past the stripped text.
    assert entities == [("<patch_index_0><patch_index_1>", (6, 6), [(0.0, 0.0, 2 / 32, 1 / 32)])]


def test_parse_edge_cases():
    assert parse_grounded_text("  plain text  ") == ("plain text", [])
    # A phrase holding '<' cannot name an object; a malformed object is left alone (and its tags cleaned away).
    text = "<phrase>a<b</phrase><object><patch_index_0001><patch_index_0002></object> x<object><patch_index_5></object>"
    clean, entities = parse_grounded_text(text)
    assert [e[0] for e in entities] == ["<patch_index_1><patch_index_2>"]
    assert clean == "a x"
    # The span always points at the phrase in the cleaned text.
    for clean, entities in (parse_grounded_text(SNOWMAN), parse_grounded_text(TWO_DOGS)):
        for name, (start, end), _ in entities:
            if not name.startswith("<patch_index_"):
                assert clean[start:end] == name
    with pytest.raises(ValueError, match="outside"):
        parse_grounded_text("<object><patch_index_0000><patch_index_1024></object>")
    assert parse_grounded_text("<object><patch_index_0000><patch_index_0015></object>", num_bins=4)[1] == [
        ("<patch_index_0><patch_index_15>", (0, 0), [(0.125, 0.125, 0.875, 0.875)])
    ]
