"""Caption augmentation of the improved CLIP recipe (clip-rocket, Fini et al. 2023), with no downloads.

clip-rocket builds 1 + A text views per caption: a *weak* global view (stop-words dropped with probability
``remove_stopwords_prob``) and A *strong* views (the same drop, then one EDA operation drawn with weights
identity / synonym replacement / random swap / random deletion = 0 / 0.4 / 0.4 / 0.2). The reference uses NLTK
stop-words, NLTK's word tokenizer and WordNet synonyms, none of which can be downloaded here, so:

- stop-words are the built-in English list below;
- words are split on whitespace (after the optional CLIP-style cleaning: html unescape, whitespace, lowercase);
- synonyms come from a user lexicon file (``word<TAB>syn1,syn2,...`` per line; ``#`` starts a comment). Without a
  lexicon, synonym replacement is an identity op, and a warning says so once.

Every function takes an explicit ``random.Random`` so augmentation replays on resume (the pipeline seeds it from
the sample's identity).
"""

import html
import logging
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

ENGLISH_STOPWORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs them themselves then
there these they this those through to too under until up very was we were what when where which while who whom why
will with would you your yours yourself yourselves
""".split()
)


def clean_caption(text: str) -> str:
    """CLIP-style cleaning: html unescape (twice), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


def load_lexicon(path: str) -> Dict[str, List[str]]:
    """Synonym lexicon from ``word<TAB>syn1,syn2,...`` lines. A missing file raises naming the path."""
    lexicon: Dict[str, List[str]] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{lineno}: expected 'word<TAB>syn1,syn2,...'")
                word, syns = line.split("\t", 1)
                choices = [s.strip() for s in syns.split(",") if s.strip() and s.strip() != word.strip()]
                if choices:
                    lexicon[word.strip().lower()] = choices
    except FileNotFoundError:
        raise FileNotFoundError(f"synonym lexicon not found: {path}") from None
    return lexicon


def remove_stopwords(words: Sequence[str], rng: random.Random, prob: float) -> List[str]:
    """With probability ``prob`` drop every stop-word (keeping the caption if nothing else would remain)."""
    if rng.random() >= prob:
        return list(words)
    kept = [w for w in words if w not in ENGLISH_STOPWORDS]
    return kept or list(words)


def synonym_replacement(
    words: Sequence[str], rng: random.Random, lexicon: Dict[str, List[str]], n: int = 1
) -> List[str]:
    """Replace every occurrence of up to ``n`` distinct non-stop-words that have synonyms by one synonym each."""
    out = list(words)
    candidates = sorted({w for w in out if w not in ENGLISH_STOPWORDS and w in lexicon})
    rng.shuffle(candidates)
    for word in candidates[:n]:
        synonym = rng.choice(lexicon[word])
        out = [synonym if w == word else w for w in out]
    return out


def random_swap(words: Sequence[str], rng: random.Random, n: int = 1) -> List[str]:
    """Swap two random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], rng: random.Random, p: float = 0.1) -> List[str]:
    """Drop each word with probability ``p``; keep one random word if all would go."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.randrange(len(words))]]


@dataclass
class TextAugmentConfig:
    num_augs: int = 2
    """A: strong text views per caption (besides the weak global view)."""
    remove_stopwords_prob: float = 0.8
    op_weights: tuple = (0.0, 0.4, 0.4, 0.2)
    """Weights of identity, synonym replacement, random swap, random deletion (normalised)."""
    text_augment: bool = True
    """Apply one EDA op to the strong views (the stop-word drop happens either way, as in the reference)."""
    clean_before_augment: bool = True
    deletion_prob: float = 0.1
    lexicon_path: Optional[str] = None


@dataclass
class TextViews:
    """Stage: ``sample["captions"] = [weak view, strong view 1..A]`` from ``sample["caption"]``."""

    cfg: TextAugmentConfig = field(default_factory=TextAugmentConfig)

    def __post_init__(self):
        self.lexicon = load_lexicon(self.cfg.lexicon_path) if self.cfg.lexicon_path else {}
        if not self.lexicon and self.cfg.text_augment and self.cfg.op_weights[1] > 0:
            logger.warning("no --synonym-lexicon given: synonym replacement leaves captions unchanged")

    def strong(self, words: List[str], rng: random.Random) -> List[str]:
        words = remove_stopwords(words, rng, self.cfg.remove_stopwords_prob)
        if not self.cfg.text_augment:
            return words
        op = rng.choices(range(4), weights=self.cfg.op_weights)[0]
        if op == 1:
            return synonym_replacement(words, rng, self.lexicon)
        if op == 2:
            return random_swap(words, rng)
        if op == 3:
            return random_deletion(words, rng, self.cfg.deletion_prob)
        return words

    def __call__(self, sample):
        # the pipeline seeds `random` per sample; a private Random drawn from it keeps views reproducible
        rng = random.Random(random.getrandbits(64))
        text = clean_caption(sample["caption"]) if self.cfg.clean_before_augment else sample["caption"]
        words = text.split()
        weak = remove_stopwords(words, rng, self.cfg.remove_stopwords_prob)
        views = [" ".join(weak)] + [" ".join(self.strong(words, rng)) for _ in range(self.cfg.num_augs)]
        sample["captions"] = views
        return sample
