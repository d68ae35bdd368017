"""Hard-negative caption generators (NegCLIP / FSC-CLIP, rule-based) and their type-major batch layout."""

import pickle
import random
from collections import Counter
from itertools import permutations

import pytest
import torch
from PIL import Image

from unilm_vl.data import synthetic
from unilm_vl.data.hard_negatives import (
    GENERATORS,
    CollateHardNegatives,
    HardNegatives,
    Lexicon,
    TokenizeHardNegatives,
    load_lexicon_file,
    negclip_swap,
    ngram_shuffle,
    parse_style,
    replace,
    svlc,
    tokenize,
)
from unilm_vl.data.pipeline import derive_seed
from unilm_vl.data.tokenizers import TokenizerConfig, build_tokenizer

SEEDS = range(60)


@pytest.fixture(scope="module")
def lexicon():
    return Lexicon.build()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TokenizerConfig(text_tokenizer="open_clip", context_length=16))


def outputs(fn, caption, lexicon, seeds=SEEDS, **kw):
    return {fn(caption, random.Random(s), lexicon, **kw) for s in seeds}


def small_lexicon(tmp_path, text):
    path = tmp_path / "lexicon.tsv"
    path.write_text(text)
    return Lexicon.build(str(path), builtin=False)


def synthetic_samples(n=20):
    cfg = synthetic.WorldConfig(seed=0, image_size=32)
    heldout = synthetic.heldout_combos(0)
    return [synthetic.make_train_sample(cfg, heldout, "train", i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- negclip
def test_negclip_reference_example(lexicon):
    caption = "a black dog chasing a white cat"
    assert outputs(negclip_swap, caption, lexicon) == {
        "a white dog chasing a black cat",  # adjectives
        "a black cat chasing a white dog",  # nouns
        "a white cat chasing a black dog",  # noun chunks
    }


def test_negclip_keeps_character_multiset(lexicon):
    captions = [s["caption"] for s in synthetic_samples()] + [
        "A woman is holding an umbrella next to the old building.",
        "two dogs and three cats run quickly",
        "a man riding a horse",
    ]
    produced = 0
    for caption in captions:
        for neg in outputs(negclip_swap, caption, lexicon, range(10)) - {None}:
            produced += 1
            assert neg != caption
            assert Counter(neg) == Counter(caption)
    assert produced >= len(captions)


def test_negclip_none_when_nothing_to_swap(lexicon):
    for caption in ("dog", "a dog", "a red circle", "two red apples on a table"):
        assert outputs(negclip_swap, caption, lexicon, range(5)) == {None}


# ---------------------------------------------------------------------------------------------- ngram shuffle
def test_ngram_shuffle_bigrams_reference_example(lexicon):
    caption = "a man riding a horse"
    grams = ["a man", "riding a", "horse"]
    expected = {" ".join(p) for p in permutations(grams)} - {caption}
    got = outputs(ngram_shuffle, caption, lexicon, n=2)
    assert got == expected  # every non-identity bigram order, nothing else
    for neg in got:
        assert Counter(neg.replace(" ", "")) == Counter(caption.replace(" ", ""))


def test_ngram_shuffle_trailing_punctuation_and_none(lexicon):
    caption = "a man riding a horse."
    for neg in outputs(ngram_shuffle, caption, lexicon, n=1):
        assert neg is not None and neg.strip(".") != caption.strip(".")
        assert Counter(neg.replace(" ", "")) == Counter(caption.replace(" ", ""))
        assert " ." not in neg  # no space before punctuation
    # last n-gram is a lone '.', leaving 2 n-grams: no negative; one n-gram: no negative
    assert outputs(ngram_shuffle, caption, lexicon, range(5), n=5) == {None}
    assert outputs(ngram_shuffle, "a man", lexicon, range(5), n=2) == {None}
    assert outputs(ngram_shuffle, "dog", lexicon, range(5), n=1) == {None}


# ---------------------------------------------------------------------------------------------- svlc
def test_svlc_reference_example(lexicon):
    caption = "two red apples on a table"
    lists = dict(lexicon.word_lists(["colour", "count", "noun"]))
    got = outputs(svlc, caption, lexicon, range(200))
    assert "three red apples on a table" in got
    kinds = set()
    for neg in got:
        old, new = caption.split(), neg.split()
        diff = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(diff) == 1
        ((a, b),) = diff
        kind = next(k for k, words in lists.items() if a in words and b in words)
        kinds.add(kind)
    assert kinds == {"colour", "count", "noun"}  # red, two and table are list words; apples is not


def test_svlc_replaces_every_occurrence_and_skips_multiword(tmp_path):
    lex = small_lexicon(tmp_path, "colour\tred,blue\nnoun\thot dog,pizza\n")
    assert outputs(svlc, "Red ball and a red box", lex, range(5)) == {"Blue ball and a blue box"}
    # per-token matching: the multi-word entry never matches
    assert outputs(svlc, "a hot dog on a plate", lex, range(5)) == {None}


# ---------------------------------------------------------------------------------------------- replace
def single_replacements(caption, lexicon):
    """Every caption with one span of <= 4 tokens replaced by another member of a lexicon group holding it (as
    itself or, for a plural noun, its singular), with a preceding a/an adjusted: built from the lexicon alone."""
    toks = tokenize(caption)
    out = set()
    for i in range(len(toks)):
        for j in range(i + 1, min(i + 5, len(toks) + 1)):
            key = tuple(t.lower() for t, _, _ in toks[i:j])
            keys = [(key, False)] + ([((key[0][:-1],), True)] if j == i + 1 and key[0].endswith("s") else [])
            for k, is_plural in keys:
                for pos in ("ADJ", "NOUN", "VERB", "NUM", "ADP"):
                    for word in lexicon.alternatives(k, pos):
                        for new in [word + "s", word + "es"] if is_plural else [word]:
                            new = new[:1].upper() + new[1:] if toks[i][0][:1].isupper() else new
                            start, end = toks[i][1], toks[j - 1][2]
                            out.add(caption[:start] + new + caption[end:])
                            if i > 0 and toks[i - 1][0].lower() in ("a", "an"):
                                article = "an" if new[0].lower() in "aeiou" else "a"
                                out.add(caption[: toks[i - 1][1]] + article + " " + new + caption[end:])
    return out


def test_replace_reference_example_exact(tmp_path):
    lex = small_lexicon(tmp_path, "colour\tblack,white\nnoun\tdog,cat\nrelation\ton,under\n")
    assert outputs(replace, "a black dog on a red couch", lex) == {
        "a white dog on a red couch",
        "a black cat on a red couch",
        "a black dog under a red couch",
    }


def test_replace_changes_one_span_from_one_group(lexicon):
    captions = [
        "a small red circle to the left of a large blue square and a green star",
        "two red apples on a table",
        "a man riding a horse",
        "A woman holding an umbrella near a bench",
    ]
    relations = set()
    for caption in captions:
        got = outputs(replace, caption, lexicon) - {None}
        assert len(got) >= 5
        assert caption not in got
        assert got <= single_replacements(caption, lexicon), got - single_replacements(caption, lexicon)
        relations |= {r for r in synthetic.RELATIONS for neg in got if r in neg and r not in caption}
    assert relations & {"to the right of", "above", "below"}  # multi-word relation replaced as one span


def test_replace_fixes_article_and_plural(tmp_path, lexicon):
    lex = small_lexicon(tmp_path, "colour\tred,orange\n")
    assert outputs(replace, "a red ball on a table", lex, range(5)) == {"an orange ball on a table"}
    plural_nouns = {
        neg.split()[2] for neg in outputs(replace, "two red apples on a table", lexicon, range(200)) - {None}
    } - {"apples"}
    assert plural_nouns and all(w.endswith("s") for w in plural_nouns)


def test_replace_needs_two_entities_and_a_relation_or_modifier(lexicon):
    for caption in ("dog", "a large red circle", "a man"):
        assert outputs(replace, caption, lexicon, range(5)) == {None}


# ---------------------------------------------------------------------------------------------- styles, lexicon
def test_styles():
    assert parse_style("fsc-clip") == ("negclip", "replace", "ngram_shuffle_2")
    assert parse_style("negclip") == ("negclip",)
    assert parse_style("svlc, ngram_shuffle_3") == ("svlc", "ngram_shuffle_3")
    assert parse_style("fsc-clip,given") == ("negclip", "replace", "ngram_shuffle_2", "given")
    with pytest.raises(ValueError, match="unknown hard-negative style.*fsc-clip"):
        parse_style("negclip,wordnet")
    with pytest.raises(ValueError, match="repeats"):
        parse_style("fsc-clip,negclip")


def test_lexicon_file(tmp_path):
    path = tmp_path / "lex.tsv"
    path.write_text("# extra words\n\ncolour\tteal, mauve # trailing comment\nRELATION\ton=3,in front of=0.5\n")
    groups = load_lexicon_file(str(path))
    assert [(g.category, g.words, g.weights) for g in groups] == [
        ("colour", ("teal", "mauve"), (1.0, 1.0)),
        ("relation", ("on", "in front of"), (3.0, 0.5)),
    ]
    lex = Lexicon.build(str(path))
    assert lex.alternatives(("in", "front", "of"), "ADP")["on"] >= 3.0
    bad = {
        "colour red,green": "expected 'category<TAB>",
        "colours\tred": "unknown category",
        "colour\tred=x": "not a number",
        "size\tbig=0": "must be positive",
        "noun\t , ": "lists no words",
        "noun\tcat,cat": "appears twice",
    }
    for line, message in bad.items():
        path.write_text(f"# ok\ncolour\tred\n{line}\n")
        with pytest.raises(ValueError, match=f"lex.tsv:3: .*{message}"):
            load_lexicon_file(str(path))


def test_spacy_model_not_installed_error():
    with pytest.raises(ImportError, match=r"en_core_web_nonexistent_model.*python -m spacy download"):
        Lexicon.build(spacy_model="en_core_web_nonexistent_model")


# ---------------------------------------------------------------------------------------------- stages, batch
def make_sample(caption, seed, key="k"):
    return {"__key__": key, "__seed__": seed, "caption": caption, "image": torch.zeros(3, 8, 8), "meta": {}}


def test_type_major_batch_layout(lexicon, tokenizer):
    captions = ["a black dog chasing a white cat", "a red circle", "dog"]
    stage = HardNegatives("fsc-clip", lexicon)
    tok = TokenizeHardNegatives(tokenizer, 16)
    samples = [tok(stage(make_sample(c, 100 + b, str(b)))) for b, c in enumerate(captions)]
    samples = [dict(s, text=tokenizer.encode_batch([s["caption"]], 16)[0]) for s in samples]
    batch = CollateHardNegatives(pad_id=tokenizer.pad_id)(samples)
    neg_text, neg_mask = batch["net_input"]["neg_text"], batch["net_input"]["neg_mask"]
    assert neg_text.shape == (9, 16) and neg_text.dtype == torch.long
    # rows t*B + b: types negclip, replace, ngram_shuffle_2; only ngram_shuffle_2 exists for "a red circle"
    assert neg_mask.tolist() == [1, 0, 0, 1, 0, 0, 1, 1, 0]
    for t, name in enumerate(stage.types):
        for b, caption in enumerate(captions):
            row = neg_text[t * len(captions) + b]
            expected = GENERATORS[name](caption, random.Random(derive_seed(100 + b, "hard_negatives", name)), lexicon)
            if neg_mask[t * len(captions) + b]:
                assert torch.equal(row, tokenizer.encode_batch([expected], 16)[0])
            else:
                assert expected is None and bool((row == tokenizer.pad_id).all())
    assert dict(stage.generated) == {"negclip": 1, "replace": 1, "ngram_shuffle_2": 2}
    assert dict(stage.missing) == {"negclip": 2, "replace": 2, "ngram_shuffle_2": 1}


def test_given_negatives_from_record(lexicon):
    stage = HardNegatives("given", lexicon)
    sample = make_sample("a cat", 3)
    sample["meta"] = {"neg_caption": "['a dog', 'a bird']"}  # tsv column: a Python list literal
    assert stage(sample)["hard_negatives"][0] in ("a dog", "a bird")
    sample = make_sample("a cat", 3)
    sample["meta"] = {"neg_captions": ["a cow"]}
    assert stage(sample)["hard_negatives"] == ["a cow"]
    assert stage(make_sample("a cat", 3))["hard_negatives"] == [None]


def test_seeded_and_picklable(lexicon):
    captions = [s["caption"] for s in synthetic_samples()]
    stage = HardNegatives("fsc-clip,svlc", lexicon)
    first = [stage.generate(make_sample(c, 7 + i)) for i, c in enumerate(captions)]
    clone = pickle.loads(pickle.dumps(stage))  # as in a loader worker
    assert [clone.generate(make_sample(c, 7 + i)) for i, c in enumerate(captions)] == first
    other = [stage.generate(make_sample(c, 1000 + i)) for i, c in enumerate(captions)]
    for t in range(len(stage.types)):  # another seed changes some negatives of every type
        assert [n[t] for n in other] != [n[t] for n in first]
    # a type draws the same negative whatever the other types of the style
    alone = HardNegatives("replace", lexicon)
    assert [alone.generate(make_sample(c, 7 + i))[0] for i, c in enumerate(captions)] == [n[1] for n in first]


def test_synthetic_world_captions(lexicon):
    samples = synthetic_samples(20)
    with_relation = sum(len(s["objects"]) >= 2 for s in samples)
    assert with_relation == 14
    # replace needs 2 entities; a one-object caption ("a large red circle") is one n-gram for n >= 4
    expected = {
        "negclip": 20,
        "replace": with_relation,
        "svlc": 20,
        "ngram_shuffle_1": 20,
        "ngram_shuffle_2": 20,
        "ngram_shuffle_3": 20,
        "ngram_shuffle_4": with_relation,
        "ngram_shuffle_5": with_relation,
    }
    for style, count in expected.items():
        stage = HardNegatives(style, lexicon)
        negs = [stage.generate(make_sample(s["caption"], i))[0] for i, s in enumerate(samples)]
        assert sum(n is not None for n in negs) == count, style
        assert all(n != s["caption"] for n, s in zip(negs, samples))
    stage = HardNegatives("fsc-clip", lexicon)
    counts = Counter(
        sum(n is not None for n in stage.generate(make_sample(s["caption"], i))) for i, s in enumerate(samples)
    )
    assert counts == {3: with_relation, 2: 20 - with_relation}


def test_task_collates_negatives_for_train_and_valid(tokenizer):
    from unilm_vl.tasks.image_text_contrastive import ImageTextContrastiveConfig, ImageTextContrastiveTask

    task = ImageTextContrastiveTask(ImageTextContrastiveConfig(hard_negatives="fsc-clip", context_length=16, seed=1))
    task.image_size, task.image_mean, task.image_std = 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for split in ("train", "valid"):
        stages, collate = task.build_stages(split), task.build_collater(split)
        samples = []
        for b, caption in enumerate(["a black dog chasing a white cat", "a red circle", "dog"]):
            sample = {
                "__key__": str(b),
                "__seed__": b,
                "caption": caption,
                "image": Image.new("RGB", (40, 30)),
                "meta": {},
            }
            for stage in stages:
                sample = stage(sample)
            samples.append(sample)
        batch = collate(samples)
        assert batch["net_input"]["image"].shape == (3, 3, 32, 32)
        assert batch["net_input"]["neg_text"].shape == (9, 16)
        assert batch["net_input"]["neg_mask"].tolist() == [1, 0, 0, 1, 0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="--num-augs"):
        ImageTextContrastiveTask(ImageTextContrastiveConfig(hard_negatives="negclip", num_augs=2, seed=1))
    with pytest.raises(ValueError, match="unknown hard-negative style"):
        ImageTextContrastiveTask(ImageTextContrastiveConfig(hard_negatives="negclp", seed=1))


def _collect_keys(samples):
    return {s["__key__"]: tuple(s["hard_negatives"]) for s in samples}


def test_negatives_independent_of_worker_count(wds_dir, lexicon):
    """Through the real pipeline: each sample's negatives depend on its identity, not on the worker layout."""
    from unilm_vl.data.pipeline import StreamPlan, worker_batches
    from unilm_vl.data.sources import parse_data_spec

    sources = parse_data_spec(str(wds_dir / "part-*.tar"))
    results = []
    for workers in (1, 3):
        plan = StreamPlan(
            sources=sources,
            stages=[HardNegatives("ngram_shuffle_1,svlc", lexicon)],
            collate=_collect_keys,
            batch_size=4,
            num_workers=workers,
            train=False,
            shuffle=False,
        )
        merged = {}
        for worker in range(workers):
            for batch, _ in worker_batches(plan, 1, worker, 0, 100):
                merged.update(batch)
        results.append(merged)
    assert len(results[0]) == 60 and results[0] == results[1]
    assert all(None not in negs for negs in results[0].values())  # "a red picture": both types exist


def test_unreadable_given_negatives_are_a_bad_sample(lexicon):
    from unilm_vl.data.decode import BadSample

    sample = make_sample("a cat", 3)
    sample["meta"] = {"neg_caption": "['a dog', "}
    with pytest.raises(BadSample, match="neg_caption"):
        HardNegatives("given", lexicon)(sample)
