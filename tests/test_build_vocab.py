"""build_vocab writes a sentencepiece model and dict.txt in the released Kosmos-2 layout (index = spm id + 1)."""

import sentencepiece

from unilm_vl.data import build_vocab
from unilm_vl.data.grounding import build_kosmos2_tokenizer

from conftest import write_wds


def test_vocab_layout_matches_the_release(tmp_path):
    write_wds(str(tmp_path / "shards" / "part"), 30, 10)
    build_vocab.main(
        ["--data", "shards/part-*.tar", "--root", str(tmp_path), "--out", str(tmp_path / "vocab"), "--vocab-size", "60"]
    )
    spm = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "vocab" / "sentencepiece.bpe.model"))
    assert [spm.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    tok = build_kosmos2_tokenizer(
        str(tmp_path / "vocab" / "sentencepiece.bpe.model"), str(tmp_path / "vocab" / "dict.txt"), num_bins=4
    )
    for piece_id in range(3, spm.get_piece_size()):
        assert tok.dictionary.index(spm.id_to_piece(piece_id)) == piece_id + 1
    n = spm.get_piece_size() + 1  # 4 fairseq specials + V - 3 pieces
    assert tok.dictionary.index("<mask>") == n and tok.dictionary.index("<patch_index_0015>") == n + 12 + 15
    assert len(tok.dictionary) == n + 12 + 16
    assert tok.decode(tok.encode("a red picture")) == "a red picture"
    mtime = (tmp_path / "vocab" / "dict.txt").stat().st_mtime_ns
    build_vocab.main(
        ["--data", "shards/part-*.tar", "--root", str(tmp_path), "--out", str(tmp_path / "vocab"), "--if-missing"]
    )
    assert (tmp_path / "vocab" / "dict.txt").stat().st_mtime_ns == mtime
