"""A WordPiece ``vocab.txt`` for COSA on corpora without the released one (bert-base-uncased's cannot be downloaded
here; a local copy works with ``--vocab-file``).

The vocabulary covers every text of the data: the five specials ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4),
every single character ``c`` and its continuation ``##c``, then every basic-tokenised word (BERT's basic
tokenisation, lowercased unless ``--cased``), most frequent first. Any text over the same characters therefore
tokenises without ``[UNK]``, and every word of the corpus is one token. Texts are the ``desc`` / ``caption`` /
``question`` / ``answer`` strings of annotation jsons (no frame is read) and the captions of webdataset / TSV
shards.

CLI::

    python -m unilm_vl.data.cosa_vocab --data "videos/train.json::train/wds/part-*.tar" --root DIR \
        --out DIR/cosa_vocab.txt [--cased] [--if-missing]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from typing import Iterable, Iterator, List, Optional, Sequence

from .cosa import read_annotation

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Specials of a :func:`build_wordpiece_vocab` vocabulary, in id order."""


def _texts_of_spec(data: str, root: str) -> Iterator[str]:
    """Every text of a data spec (each ``::`` part may be of another kind): all desc / caption / question / answer
    strings of frames annotations (no frame is read), captions of webdataset / TSV records."""
    from .build_vocab import read_captions
    from .sources import parse_data_spec

    specs = [spec for part in data.split("::") if part.strip() for spec in parse_data_spec(part, root=root)]
    for spec in specs:
        if spec.kind != "frames":
            yield from read_captions("::".join(spec.shards), root=".")
            continue
        for path in spec.shards:
            for parsed in read_annotation(path):
                yield from parsed["captions"]
                for question, answers, _ in parsed["qa"]:
                    yield question
                    yield from answers


def build_wordpiece_vocab(texts: Iterable[str], lowercase: bool = True) -> List[str]:
    """A WordPiece vocabulary covering ``texts``: :data:`SPECIAL_TOKENS`, every character ``c`` and ``##c`` seen,
    then every basic-tokenised word (most frequent first, ties alphabetical). Any text over the same characters
    tokenises without ``[UNK]``; words of the corpus are single tokens."""
    from .tokenizers import bert_basic_tokenize

    words: Counter = Counter()
    for text in texts:
        words.update(bert_basic_tokenize(text, lowercase))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    seen = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def write_vocab(vocab: Sequence[str], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from ..logging_utils import setup_cli_logging

    vocab = argparse.ArgumentParser(description="Write a WordPiece vocab.txt covering the texts of a data spec.")
    vocab.add_argument("--data", required=True, help="data spec ('::'-separated shards / annotation jsons)")
    vocab.add_argument("--root", default=".", help="directory relative data specs resolve against")
    vocab.add_argument("--out", required=True, help="output vocab.txt")
    vocab.add_argument("--cased", action="store_true", help="keep case (default: lowercase, as bert-base-uncased)")
    vocab.add_argument("--if-missing", action="store_true", help="do nothing when --out already exists")
    args = vocab.parse_args(argv)
    setup_cli_logging()
    if args.if_missing and os.path.isfile(args.out):
        logger.info("%s exists; kept", args.out)
        return
    tokens = build_wordpiece_vocab(_texts_of_spec(args.data, args.root), lowercase=not args.cased)
    write_vocab(tokens, args.out)
    logger.info("wrote %s (%d tokens)", args.out, len(tokens))


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
