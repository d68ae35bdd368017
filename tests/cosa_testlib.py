"""Shared helpers of the COSA model/loss/train tests: a tiny WordPiece vocabulary, the cosa_tiny model on it and
hand-made batches in the task contract (``frames``, ``text_ids``, ``text_mask``)."""

from argparse import Namespace

import torch

WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "yellow",
    "picture",
    "circle",
    "square",
    "big",
    "small",
    "moves",
    "left",
    "right",
    "of",
    "the",
    "##s",
    ".",
    ",",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + WORDS  # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
PAD, UNK, CLS, SEP, MASK = range(5)


def write_vocab(path) -> str:
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(path)


def tokenizer(tmp_path):
    from unilm_vl.data.tokenizers import WordPieceTokenizer

    return WordPieceTokenizer(write_vocab(tmp_path / "vocab.txt"))


def tiny_args(**overrides) -> Namespace:
    from fairseq.models import ARCH_CONFIG_REGISTRY

    import unilm_vl  # noqa: F401  (registers the archs)

    args = Namespace(**overrides)
    ARCH_CONFIG_REGISTRY["cosa_tiny"](args)
    return args


def tiny_model(max_text_tokens=8, seed=0, **overrides):
    from unilm_vl.models.cosa import CosaModel, CosaModelConfig, CosaSpecialIds

    torch.manual_seed(seed)
    cfg = CosaModelConfig(**vars(tiny_args(bert_max_positions=64, **overrides)))
    special = CosaSpecialIds(vocab_size=len(VOCAB), pad_id=PAD, cls_id=CLS, sep_id=SEP, mask_id=MASK, unk_id=UNK)
    return CosaModel(cfg, special, max_text_tokens)


def text_batch(rows, length):
    """[CLS] ids [SEP] padded with [PAD] to ``length``: (ids B x L, mask B x L)."""
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        seq = [CLS] + list(row) + [SEP]
        ids[i, : len(seq)] = torch.tensor(seq)
    return ids, ids.ne(PAD).long()


def random_batch(b, length=8, frames=1, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length - 1, (b,), generator=g).tolist()
    rows = [torch.randint(5, len(VOCAB), (n,), generator=g).tolist() for n in lengths]
    ids, mask = text_batch(rows, length)
    pixels = torch.randn(b, frames, 3, size, size, generator=g)
    return {
        "id": [str(i) for i in range(b)],
        "nsentences": b,
        "ntokens": int(mask.sum()),
        "net_input": {"frames": pixels, "text_ids": ids, "text_mask": mask},
    }
