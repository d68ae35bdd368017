"""Train a sentencepiece model on captions and write the fairseq ``dict.txt`` that goes with it, in the layout of the
released Kosmos-2 vocabulary: sentencepiece ids ``<unk>=0, <s>=1, </s>=2``, and ``dict.txt`` holding the pieces of
ids 3..V-1 in id order (count 1 each), so that fairseq index = sentencepiece id + 1 for every piece.

For corpora without a released vocabulary, e.g. the synthetic world (the released 64k vocabulary is used
whenever it is given: ``--spm-model``/``--dict-path`` of the ``kosmos2`` task).

CLI::

    python -m unilm_vl.data.build_vocab --data "DIR/train/grit/part-*.tsv" --out DIR/vocab [--vocab-size 1000]
        [--if-missing]

Captions are read with the data layer (TSV, webdataset or frames sources; ``::``-separated patterns); the output is
``OUT/sentencepiece.bpe.model`` and ``OUT/dict.txt``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Iterable, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

SPM_NAME, DICT_NAME = "sentencepiece.bpe.model", "dict.txt"


def train_vocab(captions: Iterable[str], out_dir: str, vocab_size: int = 1000) -> None:
    """Train a BPE sentencepiece model on ``captions`` and write ``OUT/sentencepiece.bpe.model`` and
    ``OUT/dict.txt`` (module docstring). ``vocab_size`` includes the three special pieces."""
    import sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, SPM_NAME[: -len(".model")])
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(captions)),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    os.replace(prefix + ".model", os.path.join(out_dir, SPM_NAME))
    os.remove(prefix + ".vocab")
    spm = sentencepiece.SentencePieceProcessor(model_file=os.path.join(out_dir, SPM_NAME))
    with open(os.path.join(out_dir, DICT_NAME), "w", encoding="utf-8") as fh:
        for piece_id in range(3, spm.get_piece_size()):
            fh.write(f"{spm.id_to_piece(piece_id)} 1\n")
    logger.info("wrote %s (%d pieces) and %s", SPM_NAME, spm.get_piece_size(), DICT_NAME)


def read_captions(data: str, root: str = ".", schema: str = "grit", caption_key: str = "txt") -> Iterator[str]:
    """Captions of every record of a data spec (see :func:`unilm_vl.data.sources.parse_data_spec`); records that
    do not decode are skipped with a warning."""
    from .decode import BadSample
    from .sources import READERS, decode_record, parse_data_spec

    for spec in parse_data_spec(data, root=root, schema=schema, caption_key=caption_key):
        for shard in spec.shards:
            for raw in READERS[spec.kind](shard, spec):
                try:
                    yield decode_record(raw, spec)["caption"]
                except BadSample as exc:
                    logger.warning("skipped: %s", exc)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train a Kosmos-2-layout sentencepiece vocabulary on captions.")
    parser.add_argument("--data", required=True, help="data spec of the caption sources (shard patterns, '::')")
    parser.add_argument("--root", default=".", help="directory relative data specs resolve against")
    parser.add_argument("--out", required=True, help="output directory for sentencepiece.bpe.model and dict.txt")
    parser.add_argument("--vocab-size", type=int, default=1000, help="sentencepiece vocabulary size")
    parser.add_argument("--tsv-schema", default="grit", help="column schema of TSV shards")
    parser.add_argument("--caption-key", default="txt", help="webdataset caption member or json field")
    parser.add_argument("--if-missing", action="store_true", help="do nothing when both output files exist")
    args = parser.parse_args(argv)
    from ..logging_utils import setup_cli_logging

    setup_cli_logging()
    if args.if_missing and all(os.path.isfile(os.path.join(args.out, n)) for n in (SPM_NAME, DICT_NAME)):
        logger.info("%s already holds a vocabulary", args.out)
        return
    captions = list(read_captions(args.data, args.root, args.tsv_schema, args.caption_key))
    if not captions:
        raise ValueError(f"--data {args.data}: no captions found (relative specs resolve against --root {args.root})")
    train_vocab(captions, args.out, args.vocab_size)


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
