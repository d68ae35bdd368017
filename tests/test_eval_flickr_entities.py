"""Flickr30k Entities evaluation: official-file parsers, MDETR-json matching, prompts, R@k from hand-written
generations (values computed by hand), CLI and error messages. The run mode (--checkpoint) is only checked up to
its argument / file validation: generating needs a trained checkpoint."""

import json

import pytest

from unilm_vl.eval.flickr_entities import (
    Sentence,
    SentencePhrase,
    evaluate_checkpoint,
    evaluate_generations,
    flickr_prompt,
    load_flickr_entities,
    main,
    match_phrase,
    parse_annotation_file,
    parse_sentence,
    parse_sentence_file,
    predicted_boxes,
    read_generations,
)

SENTENCES = (
    "[/EN#1/people/other Two men] in [/EN#2/clothing red shirts] look at [/EN#4/scene the sky] .\n"
    "[/EN#5/people The guys] wear [/EN#2/clothing shirts] and [/EN#6/other a cup] .\n"
)
CAPTION_0 = "Two men in red shirts look at the sky ."
CAPTION_1 = "The guys wear shirts and a cup ."


def _obj(names, box=None, nobox=False):
    tags = "".join(f"<name>{n}</name>" for n in names)
    if box is None:
        return f"<object>{tags}<nobndbox>{int(nobox)}</nobndbox><scene>1</scene></object>"
    xmin, ymin, xmax, ymax = box
    return (
        f"<object>{tags}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object>"
    )


XML = (
    "<annotation><filename>100.jpg</filename><size><width>320</width><height>320</height><depth>3</depth></size>"
    + _obj(["1", "5"], (0, 0, 100, 100))  # one box shared by phrases 1 and 5
    + _obj(["1"], (200, 200, 300, 300))
    + _obj(["2"], (100, 0, 200, 100))
    + _obj(["2"], (0, 200, 100, 300))
    + _obj(["6"], (200, 0, 300, 100))
    + _obj(["4"], nobox=True)  # the sky: no box
    + "</annotation>"
)

# 32 x 32 grid on a 320 x 320 image: cell pair (ul, lr) in different rows and columns decodes to the cell centres,
# pixel ((col + .5) * 10, (row + .5) * 10)
MISS = "<patch_index_0528><patch_index_0594>"  # (16,16)-(18,18) -> [165, 165, 185, 185]: IoU 0 with every GT
HIT_TL = "<patch_index_0000><patch_index_0297>"  # (0,0)-(9,9)     -> [5, 5, 95, 95]: IoU .81 with [0,0,100,100]
HIT_BL = "<patch_index_0640><patch_index_0937>"  # (20,0)-(29,9)   -> [5, 205, 95, 295]: .81 with [0,200,100,300]
HIT_TR = "<patch_index_0020><patch_index_0317>"  # (0,20)-(9,29)   -> [205, 5, 295, 95]: .81 with [200,0,300,100]
DELIM = "</delimiter_of_multi_objects/>"


def obj(*pairs):
    return "<object>" + DELIM.join(pairs) + "</object>"


GENERATIONS = [
    # Two men (people, other): 4 misses in one object, 2 in a second one named with extra spaces, then the hit at
    # rank 7 -> R@1 0, R@5 0, R@10 1, UB 1; a differently named entity does not count
    "<grounding> <phrase>Two men</phrase>"
    + obj(*[MISS] * 4)
    + " in<phrase> men</phrase>"
    + obj(HIT_TL)
    + " look at<phrase>  Two men </phrase>"
    + obj(MISS, MISS, HIT_TL),
    # red shirts (clothing): hit at rank 3 -> 0, 1, 1, 1
    "<grounding>Two men in  <phrase>red shirts</phrase>" + obj(MISS, MISS, HIT_BL, MISS),
    # the sky: no GT box -> skipped whatever is predicted
    "<grounding>Two men in red shirts look at  <phrase>the sky</phrase>" + obj(HIT_TL),
    # The guys (people): no entity with that name (the phrase has no object; 'the guys' differs) -> miss everywhere
    "<grounding> <phrase>The guys</phrase> wear<phrase> the guys</phrase>" + obj(HIT_TL),
    # shirts (clothing): hit at rank 11 -> 0, 0, 0, 1
    "<grounding>The guys wear  <phrase>shirts</phrase>" + obj(*[MISS] * 10, HIT_BL),
    # a cup (other): hit at rank 1 -> 1, 1, 1, 1
    "<image>x</image><grounding>The guys wear shirts and  <phrase>a cup</phrase>" + obj(HIT_TR) + " .",
]
# 5 scored phrases: R@1 1/5, R@5 2/5, R@10 3/5, upper bound 4/5
EXPECTED = {"R@1": 20.0, "R@5": 40.0, "R@10": 60.0, "R@upper_bound": 80.0}
EXPECTED_TYPES = {
    "people": [0.0, 0.0, 50.0, 50.0],  # Two men, The guys
    "other": [50.0, 50.0, 100.0, 100.0],  # Two men, a cup
    "clothing": [0.0, 50.0, 50.0, 100.0],
}  # red shirts, shirts


def write_flickr(tmp_path, tokens_1=None):
    root = tmp_path / "flickr30k_entities"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "100.txt").write_text(SENTENCES)
    (root / "Annotations" / "100.xml").write_text(XML)
    images = [
        {
            "id": 0,
            "file_name": "100.jpg",
            "caption": CAPTION_0,
            "width": 320,
            "height": 320,
            "original_img_id": 100,
            "sentence_id": 0,
            "tokens_positive_eval": [[[0, 7]], [[11, 21]], [[30, 37]]],
        },
        {
            "id": 1,
            "file_name": "100.jpg",
            "caption": CAPTION_1,
            "width": 320,
            "height": 320,
            "original_img_id": 100,
            "sentence_id": 1,
            # only the first span of an entry is used
            "tokens_positive_eval": tokens_1 or [[[0, 8]], [[14, 20], [0, 3]], [[25, 30]]],
        },
    ]
    data = tmp_path / "final_flickr_separateGT_test.json"
    data.write_text(json.dumps({"images": images, "annotations": []}))
    return str(data), str(root)


def write_generations(tmp_path, texts=GENERATIONS, extra_rank1=True):
    path = tmp_path / "gen.jsonl"
    lines = []
    for i, text in enumerate(texts):
        lines.append(json.dumps({"where": f"x:{i}", "rank": 0, "text": text, "entities": []}))
        if extra_rank1 and i == 0:  # an n-best hypothesis: ignored
            lines.append(json.dumps({"where": "x:0", "rank": 1, "text": "<grounding> nothing"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_parse_sentence_spans_ids_types():
    sentence = parse_sentence(SENTENCES.splitlines()[0])
    assert sentence.sentence == CAPTION_0
    assert [(p.phrase, p.span, p.first_word_index, p.phrase_id, p.phrase_type) for p in sentence.phrases] == [
        ("Two men", (0, 7), 0, "1", ["people", "other"]),
        ("red shirts", (11, 21), 3, "2", ["clothing"]),
        ("the sky", (30, 37), 7, "4", ["scene"]),
    ]
    for p in sentence.phrases:
        assert sentence.sentence[p.span[0] : p.span[1]] == p.phrase
    one_word = parse_sentence("A [/EN#9/animals dog] runs")
    assert one_word.sentence == "A dog runs" and one_word.phrases[0].span == (2, 5)


def test_parse_sentence_file_and_errors(tmp_path):
    path = tmp_path / "1.txt"
    path.write_text(SENTENCES + "\n")
    sentences = parse_sentence_file(str(path))
    assert [s.sentence for s in sentences] == [CAPTION_0, CAPTION_1]  # trailing blank line skipped
    assert [p.phrase_id for p in sentences[1].phrases] == ["5", "2", "6"]
    path.write_text("ok\n[/EN#3/people A man walks\n")
    with pytest.raises(ValueError, match=r"1\.txt:2: phrase /EN#3 is not closed"):
        parse_sentence_file(str(path))
    with pytest.raises(ValueError, match="malformed phrase tag"):
        parse_sentence("[/XX#3/people A man]", "f:1")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        parse_sentence_file(str(tmp_path / "missing.txt"))


def test_parse_annotation_file(tmp_path):
    path = tmp_path / "100.xml"
    path.write_text(XML)
    info = parse_annotation_file(str(path))
    assert info["boxes"] == {
        "1": [[0, 0, 100, 100], [200, 200, 300, 300]],
        "5": [[0, 0, 100, 100]],
        "2": [[100, 0, 200, 100], [0, 200, 100, 300]],
        "6": [[200, 0, 300, 100]],
    }
    assert info["nobox"] == ["4"] and info["scene"] == ["4"]
    assert (info["width"], info["height"], info["depth"]) == (320, 320, 3)
    path.write_text("<annotation><object><name>1</name>")
    with pytest.raises(ValueError, match=r"100\.xml: malformed xml"):
        parse_annotation_file(str(path))
    path.write_text("<annotation>" + _obj(["1"], (0, 0, "x", 5)) + "</annotation>")
    with pytest.raises(ValueError, match=r"100\.xml: malformed annotation: object 0 bndbox/xmax"):
        parse_annotation_file(str(path))


def test_prompt_is_verbatim():
    assert flickr_prompt(CAPTION_0, 0, 7) == "<grounding> <phrase>Two men</phrase>"
    assert flickr_prompt(CAPTION_0, 11, 21) == "<grounding>Two men in  <phrase>red shirts</phrase>"


def test_match_phrase_prefers_phrases_with_boxes():
    sentence = Sentence(
        "a dog and a dog",
        [SentencePhrase("a dog", (0, 5), 0, "7", ["animals"]), SentencePhrase("a dog", (10, 15), 3, "8", ["animals"])],
    )
    record, boxes = match_phrase("a dog", sentence, {"8": [[1, 2, 3, 4]]})
    assert record.phrase_id == "8" and boxes == [[1, 2, 3, 4]]
    record, boxes = match_phrase("a dog", sentence, {})
    assert record.phrase_id == "7" and boxes == []
    assert match_phrase("a cat", sentence, {}) is None


def test_load_and_match(tmp_path):
    data, root = write_flickr(tmp_path)
    items = load_flickr_entities(data, root)
    assert [it["id"] for it in items] == ["0_0", "0_1", "0_2", "1_0", "1_1", "1_2"]
    assert [it["phrase"] for it in items] == ["Two men", "red shirts", "the sky", "The guys", "shirts", "a cup"]
    assert [it["phrase_id"] for it in items] == ["1", "2", "4", "5", "2", "6"]
    assert [it["phrase_type"] for it in items] == [
        ["people", "other"],
        ["clothing"],
        ["scene"],
        ["people"],
        ["clothing"],
        ["other"],
    ]
    assert items[0]["gt_boxes"] == [[0, 0, 100, 100], [200, 200, 300, 300]]
    assert items[2]["gt_boxes"] == []  # nobndbox
    assert items[3]["gt_boxes"] == [[0, 0, 100, 100]]  # the shared box
    assert items[4]["span"] == (14, 20) and items[4]["prompt"] == "<grounding>The guys wear  <phrase>shirts</phrase>"
    assert items[0]["image"] == str(tmp_path / "100.jpg")
    assert len(load_flickr_entities(data, root, limit=1)) == 3


def test_predicted_boxes_in_generation_order(tmp_path):
    items = load_flickr_entities(*write_flickr(tmp_path))
    boxes = predicted_boxes(GENERATIONS[0], items[0])
    assert boxes == [[165.0, 165.0, 185.0, 185.0]] * 6 + [[5.0, 5.0, 95.0, 95.0]]
    assert predicted_boxes(GENERATIONS[3], items[3]) == []
    # crop view of a 640 x 320 image: the central 320 square starts at x = 160
    wide = dict(items[5], width=640, height=320)
    assert predicted_boxes(GENERATIONS[5], wide, view="crop") == [[365.0, 5.0, 455.0, 95.0]]
    assert predicted_boxes(GENERATIONS[5], wide) == [[410.0, 5.0, 590.0, 95.0]]


def test_recall_by_hand(tmp_path):
    data, root = write_flickr(tmp_path)
    metrics = evaluate_generations(data, root, write_generations(tmp_path))
    assert {k: metrics[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert (
        metrics["num_prompts"],
        metrics["num_phrases"],
        metrics["num_skipped_without_gt"],
        metrics["num_missing_predictions"],
    ) == (6, 5, 1, 1)
    assert set(metrics["per_type"]) == set(EXPECTED_TYPES)  # scene only had the box-less phrase
    for name, values in EXPECTED_TYPES.items():
        got = metrics["per_type"][name]
        assert [got[k] for k in EXPECTED] == pytest.approx(values), name
        assert got["num_phrases"] == 2


def test_cli_generations_mode(tmp_path, capsys):
    data, root = write_flickr(tmp_path)
    out = tmp_path / "metrics.json"
    main(["--data", data, "--flickr-root", root, "--generations", write_generations(tmp_path), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "all" in printed and "clothing" in printed and "80.00" in printed
    saved = json.loads(out.read_text())
    assert saved["R@10"] == pytest.approx(60.0) and saved["per_type"]["other"]["R@1"] == pytest.approx(50.0)


def test_generation_count_mismatch_names_file(tmp_path):
    data, root = write_flickr(tmp_path)
    gen = write_generations(tmp_path, GENERATIONS[:5])
    with pytest.raises(ValueError, match=r"gen\.jsonl holds 5 generations but there are 6 prompts"):
        evaluate_generations(data, root, gen)
    (tmp_path / "gen.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"gen\.jsonl:2: not valid JSON"):
        read_generations(str(tmp_path / "gen.jsonl"))


def test_missing_and_malformed_files_are_named(tmp_path):
    data, root = write_flickr(tmp_path)
    gen = write_generations(tmp_path)
    (tmp_path / "flickr30k_entities" / "Annotations" / "100.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match=r"Annotations/100\.xml: malformed xml"):
        evaluate_generations(data, root, gen)
    (tmp_path / "flickr30k_entities" / "Annotations" / "100.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*Annotations/100\.xml"):
        evaluate_generations(data, root, gen)
    (tmp_path / "flickr30k_entities" / "Sentences" / "100.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"sentence file not found: .*Sentences/100\.txt"):
        evaluate_generations(data, root, gen)


def test_unknown_phrase_and_bad_sentence_id(tmp_path):
    data, root = write_flickr(tmp_path, tokens_1=[[[0, 3]]])  # 'The' is no phrase of the sentence
    with pytest.raises(ValueError, match=r"phrase 'The' is no phrase of sentence 1 of .*Sentences/100\.txt"):
        load_flickr_entities(data, root)
    content = json.loads(open(data).read())
    content["images"][1]["sentence_id"] = 5
    open(data, "w").write(json.dumps(content))
    with pytest.raises(ValueError, match=r"sentence_id 5 but .*100\.txt has 2 sentences"):
        load_flickr_entities(data, root)


def test_cli_arguments_and_run_mode_checks(tmp_path):
    data, root = write_flickr(tmp_path)
    with pytest.raises(SystemExit):  # needs one of --checkpoint / --generations
        main(["--data", data, "--flickr-root", root])
    with pytest.raises(SystemExit):  # not both
        main(["--data", data, "--flickr-root", root, "--checkpoint", "c.pt", "--generations", "g.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"images of .* not found, e\.g\. .*100\.jpg"):
        evaluate_checkpoint(str(tmp_path / "none.pt"), data, root)
    (tmp_path / "100.jpg").write_bytes(b"")  # only its existence is checked before the checkpoint
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*none\.pt"):
        evaluate_checkpoint(str(tmp_path / "none.pt"), data, root)
