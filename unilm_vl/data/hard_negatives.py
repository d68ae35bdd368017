"""Hard-negative captions for NegCLIP / FSC-CLIP, rule-based (no parser model, no WordNet download).

FSC-CLIP (Oh et al., EMNLP 2024) and NegCLIP (Yuksekgonul et al., ICLR 2023) fine-tune CLIP with captions that
keep the words of the positive caption but change its meaning. The reference parses each caption with spaCy
``en_core_web_sm`` and looks co-hyponyms up in WordNet; neither can be downloaded here, so this module analyses
captions with a regex tokenizer, built-in English word lists and a :class:`Lexicon` of interchangeable words
(built-in groups, including the synthetic world's shapes, colours, sizes, relations and motions, plus an optional
user file). spaCy is used only when the user names an English model that is already installed
(``--spacy-model en_core_web_sm``); it is never downloaded.

Negative types (each a function ``(caption, rng, lexicon) -> Optional[str]``; ``None`` = no negative exists):

- ``negclip`` (:func:`negclip_swap`): swap two spans of one kind (noun chunks of more than 2 tokens, verb phrases,
  singular nouns, plural nouns, adverbs, adjectives). The text is spliced, so the character multiset is kept.
- ``replace`` (:func:`replace`): SugarCrepe-REPLACE: one word or lexicon phrase becomes another member of a lexicon
  group containing it (a co-hyponym or an antonym: colours, sizes, shapes/nouns, materials, states, actions,
  counts, relations such as ``to the left of`` -> ``above``).
- ``ngram_shuffle_{1..5}`` (:func:`ngram_shuffle`): shuffle consecutive non-overlapping n-grams.
- ``svlc`` (:func:`svlc`): replace every occurrence of one word of a word list by another word of that list.
- ``given``: one of the precomputed negatives of the record (wds json field ``neg_captions`` or the tsv column
  ``neg_caption``: a list, or a string holding a JSON / Python list literal).

Styles (``--hard-negatives``): ``negclip``, ``replace``, ``svlc``, ``given``, ``ngram_shuffle_{1..5}``, ``fsc-clip``
(= ``negclip,replace,ngram_shuffle_2``, as the reference), or a comma list of these (types must not repeat).

Lexicon file (``--negatives-lexicon``): UTF-8 text, one group per line::

    # comment lines and trailing comments start with '#'
    colour<TAB>red,green,teal
    relation<TAB>on=3,under=1,in front of=0.5
    state<TAB>open,closed

``category`` is one of :data:`CATEGORY_POS` (it fixes the part of speech of the words). The words of one line are
interchangeable (co-hyponyms or antonyms; do not put synonyms on one line). ``word=weight`` sets a positive
sampling weight for ``replace`` (default 1). Words may be multi-word phrases. The file's groups are added to the
built-in ones. A malformed line raises ``ValueError`` naming ``file:line``.

Rule-based analysis (what spaCy does in the reference, approximated):

- tokens: words (letters with inner apostrophes), numbers, and every other non-space character on its own;
- lexicon phrases of more than one word are matched first (longest first) and tagged with their category's part of
  speech (``to the left of`` becomes one ADP phrase);
- parts of speech: closed word classes (determiners, prepositions, auxiliaries, pronouns, conjunctions), number
  words, the lexicon, common adjectives and adverbs, then suffix rules (``-ing`` verb, ``-ly`` adverb, ``-ed``
  participle), plural nouns by stripping ``s``/``es``/``ies`` (and irregular plurals); a word both adjective and
  noun is an adjective before another nominal word, else a noun; a word both noun and verb is a noun after a
  determiner / adjective / number; an unknown word after a determiner / adjective / number is a noun;
- noun chunks: ``DET? (NUM | ADJ | ADV ADJ)* NOUN+``;
- verb phrases: ``VERB? ADV* AUX* VERB+`` (the reference's Matcher pattern), longest first, non-overlapping.

Reproducibility: :class:`HardNegatives` draws each type's negative from ``random.Random(derive_seed(sample seed,
type))`` where the sample seed is the one :mod:`unilm_vl.data.pipeline` derives from the sample's identity, so the
negatives do not depend on the number of ranks or loader workers, and a type draws the same negative whatever the
other types of the style.

Batch contract (:class:`CollateHardNegatives`, types ``t = 0..T-1`` in style order, samples ``b = 0..B-1``)::

    net_input["neg_text"]: (T*B) x L long, row t*B + b = negative of type t for sample b (all pad id if missing)
    net_input["neg_mask"]: (T*B,) long, 1 where that negative exists, type-major like neg_text
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .decode import BadSample
from .formats import parse_annotation
from .pipeline import derive_seed
from .stages import CollateImageText
from .synthetic.vocabulary import COLOURS, MOTIONS, RELATIONS, SHAPES, SIZES

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ word lists
DET, ADJ, NOUN, VERB, ADV, ADP, NUM, PUNCT, CCONJ, AUX, PRON, X = (
    "DET",
    "ADJ",
    "NOUN",
    "VERB",
    "ADV",
    "ADP",
    "NUM",
    "PUNCT",
    "CCONJ",
    "AUX",
    "PRON",
    "X",
)

CATEGORY_POS: Dict[str, str] = {
    "colour": ADJ,
    "color": ADJ,
    "size": ADJ,
    "material": ADJ,
    "state": ADJ,
    "shape": NOUN,
    "noun": NOUN,
    "action": VERB,
    "count": NUM,
    "relation": ADP,
    "adverb": ADV,
}
"""Lexicon categories and the part of speech of their words."""

SVLC_CATEGORIES: Tuple[str, ...] = ("colour", "color", "action", "size", "state", "material", "noun", "shape", "count")
"""The word lists of :func:`svlc` (the reference's color, action, size, state, material, noun and counts lists)."""

_CLOSED_CLASS: Dict[str, str] = {}
for _tag, _words in (
    (
        DET,
        "a an the this that these those some each every any another no both either neither several many few "
        "its his her their my your our",
    ),
    (CCONJ, "and or but nor"),
    (AUX, "is are was were be been being am has have had does do did can could will would may might should must"),
    (
        PRON,
        "it he she they them him me we us you i someone something somebody anyone anything who whom which "
        "what there itself himself herself themselves",
    ),
    (
        ADP,
        "of on in at under above below behind beside besides near with without by over into onto inside "
        "outside across along through against between among around from for to up down off atop beneath "
        "underneath toward towards past within upon via like amid next",
    ),
):
    _CLOSED_CLASS.update((w, _tag) for w in _words.split())

NUMBER_WORDS: Tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

COMMON_ADJECTIVES = frozenset(
    """
beautiful pretty cute happy sad busy sunny cloudy snowy grassy sandy rocky crowded colorful colourful shiny bright
dark light giant smiling various different same other single double large small fresh sliced green ripe modern
vintage plain striped dotted
""".split()
)
"""Adjectives used for tagging only (the interchangeable ones are lexicon groups)."""

COMMON_ADVERBS = frozenset(
    """
very quite too also still just almost nearly together away here rather really outdoors indoors apart not never
always often fast
""".split()
)

_NOT_ING_VERBS = frozenset(
    "thing something nothing anything everything ceiling king ring string wing spring "
    "morning evening building painting clothing wedding sibling pudding icing".split()
)
_NOT_LY_ADVERBS = frozenset(
    "fly family belly jelly lily bully holy only ugly silly curly hilly friendly lonely "
    "daily early italy july reply supply apply".split()
)
_IRREGULAR_PLURALS: Dict[str, str] = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "skis": "ski",
    "buses": "bus",
    "glasses": "glass",
    "boxes": "box",
    "benches": "bench",
    "dishes": "dish",
}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}


def _motion_verbs() -> Tuple[str, ...]:
    """The verbs of the synthetic world's motions (``moves``, ``grows``, ``shrinks``)."""
    return tuple(dict.fromkeys(m.split()[0] for m in MOTIONS))


def _builtin_groups() -> List[Tuple[str, Tuple[str, ...]]]:
    """Built-in interchangeable-word groups ``(category, words)``: the synthetic world's vocabulary (imported from
    :mod:`unilm_vl.data.synthetic.vocabulary`), COCO object nouns by super-category, and common attributes and
    actions. Size groups pair antonyms so that no group holds synonyms (``small``/``tiny`` never swap)."""
    groups: List[Tuple[str, Tuple[str, ...]]] = [
        ("colour", tuple(COLOURS) + ("brown", "pink", "grey", "gold", "silver")),
        ("size", tuple(SIZES)),
        ("size", ("big", "small")),
        ("size", ("big", "little")),
        ("size", ("tiny", "huge")),
        ("size", ("tall", "short")),
        ("size", ("long", "short")),
        ("size", ("wide", "narrow")),
        ("size", ("thick", "thin")),
        ("shape", tuple(SHAPES)),
        (
            "material",
            (
                "wooden",
                "metal",
                "plastic",
                "glass",
                "stone",
                "brick",
                "leather",
                "paper",
                "ceramic",
                "cotton",
                "wool",
                "concrete",
            ),
        ),
        ("state", ("open", "closed")),
        ("state", ("empty", "full")),
        ("state", ("wet", "dry")),
        ("state", ("clean", "dirty")),
        ("state", ("old", "new")),
        ("state", ("old", "young")),
        ("state", ("hot", "cold")),
        ("state", ("light", "dark")),
        ("noun", ("man", "woman", "boy", "girl", "child", "baby", "lady")),
        ("noun", ("dog", "cat", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "bird")),
        ("noun", ("car", "bus", "truck", "bicycle", "bike", "motorcycle", "train", "boat", "airplane")),
        ("noun", ("apple", "banana", "sandwich", "pizza", "donut", "cake", "broccoli", "carrot")),
        ("noun", ("chair", "couch", "sofa", "bed", "table", "bench", "desk")),
        ("noun", ("cup", "bowl", "fork", "knife", "spoon", "bottle", "plate", "glass")),
        ("noun", ("tv", "laptop", "phone", "keyboard", "mouse", "remote")),
        ("noun", ("frisbee", "ball", "kite", "skateboard", "surfboard", "ski", "snowboard", "racket", "bat")),
        ("noun", ("umbrella", "backpack", "handbag", "tie", "suitcase", "hat")),
        ("noun", ("book", "clock", "vase", "scissors", "toothbrush", "toilet", "sink", "refrigerator", "oven")),
        ("noun", ("street", "road", "field", "beach", "room", "kitchen", "park", "building", "wall", "floor")),
        ("action", ("sitting", "standing", "lying", "walking", "running", "jumping")),
        (
            "action",
            (
                "riding",
                "chasing",
                "holding",
                "carrying",
                "throwing",
                "catching",
                "eating",
                "drinking",
                "playing",
                "pulling",
                "pushing",
                "watching",
            ),
        ),
        ("action", ("sits", "stands", "lies", "walks", "runs", "jumps")),
        ("action", ("rides", "chases", "holds", "carries", "throws", "catches", "eats", "drinks")),
        ("action", _motion_verbs()),
        ("count", NUMBER_WORDS),
        ("relation", tuple(RELATIONS)),
        (
            "relation",
            (
                "on",
                "under",
                "in",
                "beside",
                "behind",
                "in front of",
                "next to",
                "near",
                "inside",
                "on top of",
                "above",
                "below",
                "over",
                "underneath",
            ),
        ),
    ]
    return groups


def tokenize(text: str) -> List[Tuple[str, int, int]]:
    """``(token, start, end)``: words (letters with inner apostrophes), numbers, every other non-space char."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


_TOKEN_RE = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*|\d+(?:[.,]\d+)*|\S")


def singular(word: str) -> str:
    """A rule-based singular of a (lowercase) plural noun; the word itself when it does not look plural."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def plural(word: str) -> str:
    """A rule-based plural of a noun (its last word for phrases)."""
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR_SINGULARS:
        out = _IRREGULAR_SINGULARS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        out = last + "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        out = last[:-1] + "ies"
    else:
        out = last + "s"
    return f"{head} {out}" if head else out


# ------------------------------------------------------------------------------------------------ lexicon
@dataclass(frozen=True)
class WordGroup:
    """Interchangeable words of one category (co-hyponyms or antonyms) with ``replace`` sampling weights."""

    category: str
    words: Tuple[str, ...]
    weights: Tuple[float, ...]

    @property
    def pos(self) -> str:
        return CATEGORY_POS[self.category]


def load_lexicon_file(path: str) -> List[WordGroup]:
    """Groups of a lexicon file (format in the module docstring). Errors name ``path:line``."""
    groups: List[WordGroup] = []
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"negatives lexicon not found: {path}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].rstrip("\r\n").strip(" ")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if "\t" not in line:
                raise ValueError(f"{where}: expected 'category<TAB>word1,word2,...', got {line!r}")
            category, entries = (part.strip() for part in line.split("\t", 1))
            category = category.lower()
            if category not in CATEGORY_POS:
                raise ValueError(f"{where}: unknown category {category!r}; valid: {', '.join(CATEGORY_POS)}")
            words, weights = [], []
            for entry in entries.split(","):
                entry = entry.strip()
                if not entry:
                    continue
                word, weight = entry, 1.0
                if "=" in entry:
                    word, _, value = entry.rpartition("=")
                    word = word.strip()
                    try:
                        weight = float(value)
                    except ValueError:
                        raise ValueError(f"{where}: weight of {word!r} is not a number: {value!r}") from None
                    if not weight > 0:
                        raise ValueError(f"{where}: weight of {word!r} must be positive, got {weight}")
                word = " ".join(t for t, _, _ in tokenize(word.lower()))
                if not word:
                    raise ValueError(f"{where}: empty word in {entry!r}")
                if word in words:
                    raise ValueError(f"{where}: {word!r} appears twice")
                words.append(word)
                weights.append(weight)
            if not words:
                raise ValueError(f"{where}: category {category!r} lists no words")
            groups.append(WordGroup(category, tuple(words), tuple(weights)))
    return groups


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int
    tag: str
    plural: bool = False
    """plural noun (NNS)"""


@dataclass(frozen=True)
class Analysis:
    """A caption's tokens with part-of-speech tags, noun chunks and lexicon phrases (token ranges ``[i, j)``)."""

    text: str
    tokens: Tuple[Token, ...]
    chunks: Tuple[Tuple[int, int], ...]
    phrases: Tuple[Tuple[int, int], ...]


class Lexicon:
    """Interchangeable word groups plus the caption analyser (rule-based, or an installed spaCy model).

    Picklable (a loaded spaCy pipeline is dropped and reloaded lazily in each worker)."""

    def __init__(self, groups: Sequence[WordGroup], spacy_model: Optional[str] = None):
        self.groups: Tuple[WordGroup, ...] = tuple(groups)
        self.spacy_model = spacy_model
        if spacy_model:
            check_spacy_model(spacy_model)
        self._nlp = None
        self._by_key: Dict[Tuple[str, ...], List[int]] = {}
        self._pos: Dict[str, Set[str]] = {}
        self._phrases: Dict[Tuple[str, ...], str] = {}  # multi-word entry -> pos
        for g, group in enumerate(self.groups):
            for word in group.words:
                key = tuple(word.split())
                self._by_key.setdefault(key, []).append(g)
                if len(key) == 1:
                    self._pos.setdefault(word, set()).add(group.pos)
                else:
                    self._phrases.setdefault(key, group.pos)
        self._max_phrase = max((len(k) for k in self._phrases), default=1)

    @classmethod
    def build(cls, path: Optional[str] = None, spacy_model: Optional[str] = None, builtin: bool = True) -> "Lexicon":
        """The built-in groups (unless ``builtin=False``) plus those of the lexicon file at ``path``."""
        groups = [WordGroup(c, tuple(w), (1.0,) * len(w)) for c, w in _builtin_groups()] if builtin else []
        if path:
            groups += load_lexicon_file(path)
        return cls(groups, spacy_model)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_nlp"] = None
        return state

    # ---- lookups
    def alternatives(self, key: Tuple[str, ...], pos: str) -> Dict[str, float]:
        """Other words of the groups of part of speech ``pos`` holding ``key``, with summed weights."""
        out: Dict[str, float] = {}
        word = " ".join(key)
        for g in self._by_key.get(key, ()):
            group = self.groups[g]
            if group.pos != pos:
                continue
            for other, weight in zip(group.words, group.weights):
                if other != word:
                    out[other] = out.get(other, 0.0) + weight
        return out

    def word_lists(self, categories: Iterable[str]) -> List[Tuple[str, Tuple[str, ...]]]:
        """``(category, words)`` with all groups of each category merged (first occurrence order)."""
        lists: Dict[str, Dict[str, None]] = {}
        for group in self.groups:
            if group.category in categories:
                lists.setdefault(group.category, {}).update(dict.fromkeys(group.words))
        return [(c, tuple(words)) for c, words in lists.items()]

    # ---- analysis
    def analyze(self, text: str) -> Analysis:
        if self.spacy_model:
            return self._analyze_spacy(text)
        return _cached_rule_analysis(self, text)

    def _candidates(self, low: str) -> Tuple[Set[str], bool]:
        """Possible tags of a lowercase token, and whether its noun reading is plural."""
        if not any(c.isalnum() for c in low):
            return {PUNCT}, False
        if low[0].isdigit():
            return {NUM}, False
        if low in _CLOSED_CLASS:
            return {_CLOSED_CLASS[low]}, False
        tags = set(self._pos.get(low, ()))
        if low in COMMON_ADJECTIVES:
            tags.add(ADJ)
        if low in COMMON_ADVERBS:
            tags.add(ADV)
        is_plural = False
        if NOUN not in tags:
            sing = singular(low)
            if sing != low and NOUN in self._pos.get(sing, ()):
                tags.add(NOUN)
                is_plural = True
        if not tags:
            if len(low) > 4 and low.endswith("ing") and low not in _NOT_ING_VERBS:
                tags.add(VERB)
            elif len(low) > 3 and low.endswith("ly") and low not in _NOT_LY_ADVERBS:
                tags.add(ADV)
            elif len(low) > 4 and low.endswith("ed"):
                tags.add(VERB)
        return tags, is_plural

    def _match_phrases(self, lows: Sequence[str]) -> List[Tuple[int, int, str]]:
        """Multi-word lexicon entries in the token sequence, longest first, non-overlapping."""
        out, i = [], 0
        while i < len(lows):
            for n in range(min(self._max_phrase, len(lows) - i), 1, -1):
                pos = self._phrases.get(tuple(lows[i : i + n]))
                if pos is not None:
                    out.append((i, i + n, pos))
                    i += n
                    break
            else:
                i += 1
        return out

    def _rule_analysis(self, text: str) -> Analysis:
        raw = tokenize(text)
        lows = [t.lower() for t, _, _ in raw]
        phrases = self._match_phrases(lows)
        fixed: Dict[int, str] = {k: pos for i, j, pos in phrases for k in range(i, j)}
        cands = [self._candidates(low) for low in lows]
        tags: List[str] = []
        plurals: List[bool] = []
        for k, low in enumerate(lows):
            options, is_plural = cands[k]
            prev = tags[-1] if tags else None
            if k in fixed:
                tag = fixed[k]
                is_plural = False
            elif len(options) == 1:
                tag = next(iter(options))
            elif not options:
                tag = NOUN if prev in (DET, ADJ, NUM) and low.isalpha() else X
                is_plural = tag == NOUN and singular(low) != low
            else:
                nxt = cands[k + 1][0] if k + 1 < len(lows) and k + 1 not in fixed else set()
                nominal_next = bool(nxt & {NOUN, ADJ}) or (
                    k + 1 < len(lows) and not nxt and lows[k + 1].isalpha() and k + 1 not in fixed
                )
                if ADJ in options and NOUN in options:
                    tag = ADJ if nominal_next else NOUN
                elif ADJ in options and nominal_next:
                    tag = ADJ
                elif NOUN in options and (prev in (DET, ADJ, NUM) or VERB not in options):
                    tag = NOUN
                elif VERB in options:
                    tag = VERB
                else:
                    tag = next(t for t in (NUM, ADP, ADJ, NOUN, ADV) if t in options)
            tags.append(tag)
            plurals.append(is_plural and tag == NOUN)
        tokens = tuple(Token(t, s, e, tag, p) for (t, s, e), tag, p in zip(raw, tags, plurals))
        return Analysis(text, tokens, _noun_chunks(tags), tuple((i, j) for i, j, _ in phrases))

    def _analyze_spacy(self, text: str) -> Analysis:
        if self._nlp is None:
            import spacy  # checked by check_spacy_model

            self._nlp = spacy.load(self.spacy_model)
        doc = self._nlp(text)
        known = {DET, ADJ, NOUN, VERB, ADV, ADP, NUM, PUNCT, CCONJ, AUX, PRON}
        mapping = {"PROPN": NOUN, "SCONJ": ADP, "SYM": PUNCT, "SPACE": PUNCT}
        tags = [mapping.get(t.pos_, t.pos_ if t.pos_ in known else X) for t in doc]
        phrases = self._match_phrases([t.lower_ for t in doc])
        for i, j, pos in phrases:
            tags[i:j] = [pos] * (j - i)
        tokens = tuple(
            Token(t.text, t.idx, t.idx + len(t.text), tag, t.tag_ in ("NNS", "NNPS")) for t, tag in zip(doc, tags)
        )
        return Analysis(
            text, tokens, tuple((c.start, c.end) for c in doc.noun_chunks), tuple((i, j) for i, j, _ in phrases)
        )


@functools.lru_cache(maxsize=64)
def _cached_rule_analysis(lexicon: Lexicon, text: str) -> Analysis:
    """The rule-based analysis, cached so the types of one style analyse a caption once."""
    return lexicon._rule_analysis(text)


def _noun_chunks(tags: Sequence[str]) -> Tuple[Tuple[int, int], ...]:
    """``DET? (NUM | ADJ | ADV ADJ)* NOUN+`` runs (maximal, left to right)."""
    chunks, i, n = [], 0, len(tags)
    while i < n:
        j = i + 1 if tags[i] == DET else i
        while j < n and (tags[j] in (NUM, ADJ) or (tags[j] == ADV and j + 1 < n and tags[j + 1] == ADJ)):
            j += 1
        k = j
        while k < n and tags[k] == NOUN:
            k += 1
        if k > j:
            chunks.append((i, k))
            i = k
        else:
            i += 1
    return tuple(chunks)


def check_spacy_model(name: str) -> None:
    """Raise ``ImportError`` with install instructions unless spaCy and the English model ``name`` are installed.
    Nothing is ever downloaded here."""
    if importlib.util.find_spec("spacy") is None:
        raise ImportError(
            f"--spacy-model {name!r} needs spaCy, which is not installed. Install it and the model from spaCy's own "
            f"release with `pip install spacy && python -m spacy download {name}`, or leave --spacy-model unset to "
            f"use the built-in rule-based tagger (this code never downloads a model)."
        )
    import spacy

    if not (os.path.isdir(name) or spacy.util.is_package(name)):
        raise ImportError(
            f"--spacy-model {name!r} is not an installed spaCy model package or a model directory. Install it "
            f"from spaCy's own release with `python -m spacy download {name}`, or leave --spacy-model unset to use "
            f"the built-in rule-based tagger (this code never downloads a model)."
        )


# ------------------------------------------------------------------------------------------------ generators
def _splice(text: str, edits: Sequence[Tuple[int, int, str]]) -> str:
    """Replace the non-overlapping character ranges ``(start, end, new)`` of ``text``."""
    out, last = [], 0
    for start, end, new in sorted(edits):
        out.append(text[last:start])
        out.append(new)
        last = end
    out.append(text[last:])
    return "".join(out)


def _span_text(a: Analysis, span: Tuple[int, int]) -> str:
    return a.text[a.tokens[span[0]].start : a.tokens[span[1] - 1].end]


def _filter_spans(spans: Iterable[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Longest first (earliest on ties), dropping spans overlapping a kept one; returned in text order."""
    kept: List[Tuple[int, int]] = []
    for s, e in sorted(set(spans), key=lambda sp: (sp[0] - sp[1], sp[0])):
        if all(e <= ks or s >= ke for ks, ke in kept):
            kept.append((s, e))
    return sorted(kept)


_VP_RE = re.compile(r"V?R*A*V+")
_VP_CODE = {VERB: "V", ADV: "R", AUX: "A"}


def _verb_phrases(tags: Sequence[str]) -> List[Tuple[int, int]]:
    """Spans matching ``VERB? ADV* AUX* VERB+`` (the longest match at every start)."""
    code = "".join(_VP_CODE.get(t, ".") for t in tags)
    spans = []
    for i in range(len(code)):
        m = _VP_RE.match(code, i)
        if m:
            spans.append((i, m.end()))
    return spans


def negclip_swap(caption: str, rng: random.Random, lexicon: Lexicon) -> Optional[str]:
    """NegCLIP-style swap: for each span kind (noun chunks of more than 2 tokens, verb phrases, singular nouns,
    plural nouns, adverbs, adjectives) take 2 spans (a random 2 when there are more) and, when their texts differ,
    swap them in the raw text; return one of these swaps at random. Keeps the character multiset exactly.

    ``"a black dog chasing a white cat"`` -> ``"a white dog chasing a black cat"`` (adjectives), ``"a black cat
    chasing a white dog"`` (nouns) or ``"a white cat chasing a black dog"`` (chunks)."""
    a = lexicon.analyze(caption)
    toks = a.tokens
    span_sets = [
        [c for c in a.chunks if c[1] - c[0] > 2],
        _verb_phrases([t.tag for t in toks]),
        [(i, i + 1) for i, t in enumerate(toks) if t.tag == NOUN and not t.plural],
        [(i, i + 1) for i, t in enumerate(toks) if t.tag == NOUN and t.plural],
        [(i, i + 1) for i, t in enumerate(toks) if t.tag == ADV],
        [(i, i + 1) for i, t in enumerate(toks) if t.tag == ADJ],
    ]
    swaps = []
    for spans in span_sets:
        spans = _filter_spans(spans)
        if len(spans) < 2:
            continue
        first, second = sorted(rng.sample(spans, 2)) if len(spans) > 2 else spans
        t1, t2 = _span_text(a, first), _span_text(a, second)
        if t1 == t2:
            continue
        s1, e1 = toks[first[0]].start, toks[first[1] - 1].end
        s2, e2 = toks[second[0]].start, toks[second[1] - 1].end
        swaps.append(_splice(caption, [(s1, e1, t2), (s2, e2, t1)]))
    return rng.choice(swaps) if swaps else None


def _weighted_sample(weights: Dict[str, float], k: int, rng: random.Random) -> List[str]:
    """Up to ``k`` keys drawn by weight without replacement."""
    items, w = list(weights), list(weights.values())
    out = []
    while items and len(out) < k:
        i = rng.choices(range(len(items)), weights=w)[0]
        out.append(items.pop(i))
        w.pop(i)
    return out


def _match_case(original: str, new: str) -> str:
    if len(original) > 1 and original.isupper():
        return new.upper()
    if original[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def replace(caption: str, rng: random.Random, lexicon: Lexicon) -> Optional[str]:
    """SugarCrepe-REPLACE style: replace exactly one word or lexicon phrase by another member of a lexicon group
    that holds it, with the same part of speech (co-hyponyms and antonyms: colour, size, shape/noun, material,
    state, action, count, relation). Only captions with at least 2 entities (noun chunks) and at least one
    relation (preposition, lexicon relation phrase or verb) or modifier (adjective or number in a chunk) qualify
    (the reference's scene-graph check, approximated). Up to 2 replacements per element are drawn by weight
    without replacement, then one of all of them at random. Plural nouns are re-pluralised, the case of the first
    letter is kept, and a preceding ``a``/``an`` is fixed (still one contiguous changed span).

    ``"a black dog on a red couch"`` -> e.g. ``"a white dog on a red couch"``, ``"a black cat on a red couch"``,
    ``"a black dog under a red couch"``."""
    a = lexicon.analyze(caption)
    toks = a.tokens
    in_chunk = {k for i, j in a.chunks for k in range(i, j)}
    relations = any(t.tag in (ADP, VERB) for t in toks)
    modifiers = any(t.tag in (ADJ, NUM) and k in in_chunk for k, t in enumerate(toks))
    if len(a.chunks) < 2 or not (relations or modifiers):
        return None
    in_phrase = {k for i, j in a.phrases for k in range(i, j)}
    elements = list(a.phrases) + [
        (k, k + 1) for k, t in enumerate(toks) if k not in in_phrase and t.tag in (NOUN, ADJ, VERB, NUM, ADV, ADP)
    ]
    options = []
    for i, j in sorted(elements):
        tag = toks[i].tag
        key = tuple(t.text.lower() for t in toks[i:j])
        is_plural = j - i == 1 and toks[i].plural
        if is_plural:
            key = (singular(key[0]),)
        for new in _weighted_sample(lexicon.alternatives(key, tag), 2, rng):
            options.append((i, j, plural(new) if is_plural else new))
    if not options:
        return None
    i, j, new = rng.choice(options)
    start, end = toks[i].start, toks[j - 1].end
    new = _match_case(toks[i].text, new)
    if i > 0 and toks[i - 1].text.lower() in ("a", "an") and new[:1].isalpha():
        article = "an" if new[0].lower() in "aeiou" else "a"
        if article != toks[i - 1].text.lower():
            start = toks[i - 1].start
            new = _match_case(toks[i - 1].text, article) + caption[toks[i - 1].end : toks[i].start] + new
    return _splice(caption, [(start, end, new)])


def _join(tokens: Sequence[Token]) -> str:
    """Tokens joined by single spaces, without a space before punctuation."""
    out = ""
    for t in tokens:
        out += t.text if (not out or t.tag == PUNCT) else " " + t.text
    return out


def _strip_edge_punct(text: str) -> str:
    return text.strip(" " + "".join(c for c in set(text) if not c.isalnum() and not c.isspace()))


def ngram_shuffle(caption: str, rng: random.Random, lexicon: Lexicon, n: int = 2) -> Optional[str]:
    """Shuffle consecutive non-overlapping n-grams of the tokens (the last may be shorter). One n-gram: no negative.
    A last n-gram that is a lone punctuation token is taken out (then 2 n-grams: no negative), the rest shuffled,
    and it is put back at a random n-gram boundary. Tokens are joined by spaces, without one before punctuation.
    Up to 10 tries for a result that differs from the caption (edge punctuation ignored), else no negative.

    ``n=2``: ``"a man riding a horse"`` = [a man][riding a][horse] -> e.g. ``"horse a man riding a"``."""
    if n < 1:
        raise ValueError(f"ngram_shuffle needs n >= 1, got {n}")
    toks = lexicon.analyze(caption).tokens
    grams = [list(toks[i : i + n]) for i in range(0, len(toks), n)]
    if len(grams) <= 1:
        return None
    punct = None
    if len(grams[-1]) == 1 and grams[-1][0].tag == PUNCT:
        if len(grams) == 2:
            return None
        punct = grams.pop()
    original = _strip_edge_punct(_join(toks))
    for _ in range(10):
        order = list(grams)
        rng.shuffle(order)
        if punct is not None:
            order.insert(rng.randint(0, len(order)), punct)
        out = _join([t for g in order for t in g])
        if _strip_edge_punct(out) != original:
            return out
    return None


def svlc(caption: str, rng: random.Random, lexicon: Lexicon) -> Optional[str]:
    """Rule-based word-list swap (SVLC): among the lexicon's word lists (:data:`SVLC_CATEGORIES`, all groups of a
    category merged) that have a word in the caption, choose one uniformly, choose one of its present words, and
    replace every occurrence of it with another random word of that list. Matching is per token (case-insensitive,
    case of each occurrence kept), so multi-word list entries never match, as in the reference.

    ``"two red apples on a table"`` -> e.g. ``"two teal apples on a table"`` or ``"three red apples on a table"``."""
    toks = lexicon.analyze(caption).tokens
    lows = [t.text.lower() for t in toks]
    present_lists = []
    for _, words in lexicon.word_lists(SVLC_CATEGORIES):
        present = [w for w in dict.fromkeys(lows) if w in words]
        if present and len(words) > 1:
            present_lists.append((words, present))
    if not present_lists:
        return None
    words, present = rng.choice(present_lists)
    word = rng.choice(present)
    new = rng.choice([w for w in words if w != word])
    return _splice(caption, [(t.start, t.end, _match_case(t.text, new)) for t, low in zip(toks, lows) if low == word])


def given_negative(candidates: Any, rng: random.Random) -> Optional[str]:
    """One of a record's precomputed negatives (a list of strings, or a string holding a JSON / Python list
    literal, or a single caption); ``None`` when there is none."""
    if isinstance(candidates, str):
        text = candidates.strip()
        if text[:1] in "[(":
            candidates = parse_annotation(text, "neg_caption")
        else:
            candidates = [text]
    if not isinstance(candidates, (list, tuple)):
        return None
    valid = [c for c in candidates if isinstance(c, str) and c.strip()]
    return rng.choice(valid) if valid else None


Generator = Callable[[str, random.Random, Lexicon], Optional[str]]

GENERATORS: Dict[str, Generator] = {
    "negclip": negclip_swap,
    "replace": replace,
    "svlc": svlc,
    **{f"ngram_shuffle_{n}": functools.partial(ngram_shuffle, n=n) for n in range(1, 6)},
}
"""Rule-based negative types; ``given`` (record negatives) is handled by :class:`HardNegatives`."""

TYPE_NAMES: Tuple[str, ...] = (*GENERATORS, "given")
STYLES: Dict[str, Tuple[str, ...]] = {
    **{name: (name,) for name in TYPE_NAMES},
    "fsc-clip": ("negclip", "replace", "ngram_shuffle_2"),
}


def parse_style(style: str) -> Tuple[str, ...]:
    """Negative type names of a style or a comma list of styles, in order. Unknown names and repeats raise."""
    types: List[str] = []
    for name in (s.strip() for s in style.split(",")):
        if name not in STYLES:
            raise ValueError(
                f"unknown hard-negative style or type {name!r}; valid: {', '.join(STYLES)} (or a comma list of them)"
            )
        types.extend(STYLES[name])
    repeated = [t for t, c in Counter(types).items() if c > 1]
    if repeated:
        raise ValueError(f"hard-negative style {style!r} repeats the types {repeated}")
    return tuple(types)


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class HardNegatives:
    """Stage: ``sample[out] = [negative of type t, or None]`` for the types of ``style``, from ``sample[field]``.

    Each type draws from its own ``random.Random`` seeded by the sample's pipeline seed (``sample["__seed__"]``)
    and the type name. Counts generated/missing per type in this process and logs them every ``log_every``
    samples (a missing negative is not an error)."""

    style: str
    lexicon: Lexicon
    field: str = "caption"
    out: str = "hard_negatives"
    given_fields: Tuple[str, ...] = ("neg_captions", "neg_caption")
    """``meta`` fields holding precomputed negatives, for the ``given`` type (wds json / tsv column)."""
    log_every: int = 2000

    def __post_init__(self):
        self.types = parse_style(self.style)
        self.generated: Counter = Counter()
        self.missing: Counter = Counter()
        self.samples = 0

    def generate(self, sample: Dict[str, Any]) -> List[Optional[str]]:
        seed = sample.get("__seed__")
        if seed is None:  # outside the pipeline: the caller's seeded `random`
            seed = random.getrandbits(63)
        caption = sample[self.field]
        negatives: List[Optional[str]] = []
        for name in self.types:
            rng = random.Random(derive_seed(seed, "hard_negatives", name))
            if name == "given":
                meta = sample.get("meta") or {}
                name_value = next(((f, meta[f]) for f in self.given_fields if f in meta), None)
                try:
                    neg = given_negative(name_value[1], rng) if name_value is not None else None
                except ValueError as exc:
                    raise BadSample(
                        f"unreadable precomputed negatives: {exc}", sample.get("__where__", "?"), name_value[0]
                    ) from None
            else:
                neg = GENERATORS[name](caption, rng, self.lexicon)
                if neg is not None and neg == caption:
                    neg = None
            negatives.append(neg)
        return negatives

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        negatives = self.generate(sample)
        sample[self.out] = negatives
        for name, neg in zip(self.types, negatives):
            (self.generated if neg is not None else self.missing)[name] += 1
        self.samples += 1
        if self.log_every and self.samples % self.log_every == 0:
            logger.info(
                "hard negatives after %d samples (generated/missing): %s",
                self.samples,
                ", ".join(f"{t} {self.generated[t]}/{self.missing[t]}" for t in self.types),
            )
        return sample


@dataclass
class TokenizeHardNegatives:
    """Stage: ``sample["neg_text"]`` (T x L long, all pad id where a negative is missing) and ``sample["neg_mask"]``
    (T long 0/1) from ``sample[field]``, tokenised like the caption."""

    tokenizer: Any
    context_length: int
    field: str = "hard_negatives"

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        negatives = sample[self.field]
        rows = torch.full((len(negatives), self.context_length), self.tokenizer.pad_id, dtype=torch.long)  # T x L
        present = [t for t, neg in enumerate(negatives) if neg is not None]
        if present:
            rows[present] = self.tokenizer.encode_batch([negatives[t] for t in present], self.context_length)
        sample["neg_text"] = rows
        sample["neg_mask"] = torch.tensor([neg is not None for neg in negatives], dtype=torch.long)  # T
        return sample


@dataclass
class CollateHardNegatives(CollateImageText):
    """:class:`CollateImageText` plus the hard negatives, type-major::

    net_input["neg_text"]: (T*B) x L long, row t*B + b = type t of sample b (all pad id if missing)
    net_input["neg_mask"]: (T*B,) long 0/1
    """

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        batch = super().__call__(samples)
        negs = torch.stack([s["neg_text"] for s in samples])  # B x T x L
        mask = torch.stack([s["neg_mask"] for s in samples])  # B x T
        batch["net_input"]["neg_text"] = negs.transpose(0, 1).reshape(-1, negs.size(-1))  # (T*B) x L
        batch["net_input"]["neg_mask"] = mask.t().reshape(-1)  # T*B
        return batch
