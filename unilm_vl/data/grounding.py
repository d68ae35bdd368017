"""Kosmos-2 grounding vocabulary, box <-> patch-index codec, and parsing of grounded text.

A box is a normalised ``(x0, y0, x1, y1)`` in ``[0, 1]`` (upper-left, lower-right corner) of the square model view.
The image is cut into a ``P x P`` grid (``P = num_bins``, 32 in the release; cell size ``c = 1/P``), cells numbered
row-major (``index = row * P + col``). A box is written as two tokens, the cell of its upper-left corner and the cell
of its lower-right corner::

    <phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object>
    <phrase> two dogs</phrase><object><patch_index_a><patch_index_b></delimiter_of_multi_objects/><patch_index_c>...

Vocabulary (``build_kosmos2_dictionary``; ids for the released ``dict.txt`` and ``P = 32``)::

    <s> <pad> </s> <unk>            0 1 2 3
    dict.txt lines                  4 .. 64000       (sentencepiece id + 1)
    <mask>                          64001
    GROUNDING_SPECIALS              64002 .. 64012   (<image> 64003, <phrase> 64007, <object> 64009, <grounding> 64012)
    <patch_index_0000> .. _1023>    64013 .. 65036   (total 65037, never padded to a multiple)

Codec: :func:`box_to_patch_indices` (``mode="release"``: the released training encoder; ``mode="hf"``: HF
transformers' encoder, made the exact inverse of the decoder on every grid) and :func:`patch_indices_to_box` (the
decoder shared by the release demo, its evaluations and HF). :func:`box_to_pixels` maps a decoded box to pixels of
the original image, in float, for every evaluation and drawing. Parsing: :func:`parse_grounded_text` (the output of HF
``Kosmos2Processor.post_process_generation``) and :func:`decode_bbox_from_caption` (the flat rows of the release
``decode_string.py``); both find ``<object>`` chunks with :func:`find_grounded_objects`.

No fairseq import at module level: only :func:`build_kosmos2_dictionary` and :func:`build_kosmos2_tokenizer` need it.
"""

import math
import numbers
import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

Box = Tuple[float, float, float, float]
"""Normalised ``(x0, y0, x1, y1)``."""

Entity = Tuple[str, Tuple[int, int], List[Box]]
"""``(phrase, (start, end), boxes)``: ``start:end`` indexes the cleaned text (end exclusive)."""

DEFAULT_NUM_BINS = 32
"""Grid cells per side in the released checkpoint (its inference script defaults to 16: always pass it)."""

MASK_TOKEN = "<mask>"
GROUNDING_SPECIALS = (
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
)
"""Tag tokens in the released dictionary order (after ``<mask>``, before the patch-index tokens)."""

IMAGE_END = "</image>"
PHRASE_START, PHRASE_END = "<phrase>", "</phrase>"
OBJECT_START, OBJECT_END = "<object>", "</object>"
BOX_DELIMITER = "</delimiter_of_multi_objects/>"
GROUNDING = "<grounding>"

BOX_ENCODER_MODES = ("release", "hf")
RELEASE_X1_CLAMP = 0.99999
"""The released encoder clamps lower-right coordinates to this before binning, so 1.0 falls in the last cell."""

_PATCH_PAIR = r"<patch_index_\d+><patch_index_\d+>"
OBJECT_PATTERN = re.compile(
    r"(?:("
    + re.escape(PHRASE_START)
    + r"([^<]+)"
    + re.escape(PHRASE_END)
    + r"))?"
    + re.escape(OBJECT_START)
    + r"((?:"
    + _PATCH_PAIR
    + re.escape(BOX_DELIMITER)
    + r")*"
    + _PATCH_PAIR
    + r")"
    + re.escape(OBJECT_END)
)
"""An ``<object>`` chunk, optionally right after ``<phrase>name</phrase>`` (no gap; the name holds no ``<``).
Groups: 1 the whole phrase markup, 2 the name, 3 the patch-index pairs. Same language as the release regex."""

_PATCH_INDEX_RE = re.compile(r"<patch_index_(\d+)>")
_TAG_RE = re.compile(r"<.*?>")
"""What cleaning removes: anything from a ``<`` to the next ``>`` on the same line (HF's rule, so ``</s>`` goes too)."""


# ---- vocabulary ----------------------------------------------------------------------------------------------


def _check_num_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return int(num_bins)


def patch_index_token(k: int) -> str:
    """``<patch_index_%04d>`` of cell ``k`` (``patch_index_token(44) == "<patch_index_0044>"``)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"a patch index is a non-negative integer, got {k!r}")
    return f"<patch_index_{int(k):04d}>"


def kosmos2_added_symbols(num_bins: int = DEFAULT_NUM_BINS) -> List[str]:
    """Symbols appended after ``dict.txt``, in order: ``<mask>``, :data:`GROUNDING_SPECIALS`, then
    ``<patch_index_0000>`` .. ``<patch_index_{P*P-1}>``."""
    num_bins = _check_num_bins(num_bins)
    return [MASK_TOKEN, *GROUNDING_SPECIALS, *(patch_index_token(k) for k in range(num_bins * num_bins))]


def build_kosmos2_dictionary(
    dict_path: Optional[str], num_bins: int = DEFAULT_NUM_BINS, spm_model_path: Optional[str] = None
):
    """fairseq ``Dictionary`` of Kosmos-2: ``dict_path`` (the released ``dict.txt``) + :func:`kosmos2_added_symbols`.
    Without ``dict_path`` the ``dict.txt`` part is derived from ``spm_model_path``
    (:func:`unilm_vl.data.tokenizers.fairseq_dictionary_from_spm`, the released ``dict.txt`` for the released model).

    The dictionary is not padded to a multiple (the release trained with ``--required-batch-size-multiple 1``; any
    ``madeupwordNNNN`` padding would change the vocabulary size). With the released file and ``num_bins=32`` it has
    65037 symbols. Raises ``FileNotFoundError`` naming ``dict_path`` when it does not exist.
    """
    from unilm_vl.data.tokenizers import fairseq_dictionary_from_spm, load_fairseq_dictionary

    if dict_path is None and spm_model_path is not None:
        dictionary = fairseq_dictionary_from_spm(spm_model_path)
    else:
        dictionary = load_fairseq_dictionary(dict_path)
    for symbol in kosmos2_added_symbols(num_bins):
        dictionary.add_symbol(symbol)
    return dictionary


def build_kosmos2_tokenizer(
    spm_model_path: str,
    dict_path: Optional[str],
    num_bins: int = DEFAULT_NUM_BINS,
    context_length: Optional[int] = None,
):
    """:class:`~unilm_vl.data.tokenizers.SentencePieceDictTokenizer` over the same vocabulary as
    :func:`build_kosmos2_dictionary` (``dict_path`` None: derived from the sentencepiece model). Use
    ``encode(text, split_symbols=True)`` for text holding tags (``"<grounding>An image of"`` ->
    ``[64012, 712, 1648, 9]``)."""
    from unilm_vl.data.tokenizers import SentencePieceDictTokenizer

    tokenizer = SentencePieceDictTokenizer(spm_model_path, dict_path, context_length=context_length)
    tokenizer.add_symbols(kosmos2_added_symbols(num_bins))
    return tokenizer


# ---- box <-> patch indices -----------------------------------------------------------------------------------


def _check_box(box: Sequence[float], strict: bool) -> Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"a box is four numbers (x0, y0, x1, y1), got {box!r}") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):  # also rejects NaN
        raise ValueError(f"box coordinates must be normalised to [0, 1], got {box!r}")
    if strict and not (x1 > x0 and y1 > y0):
        raise ValueError(f"box needs x1 > x0 and y1 > y0 for the hf encoder, got {box!r}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box needs x1 >= x0 and y1 >= y0, got {box!r}")
    return x0, y0, x1, y1


def _cell_start(k: int, cell: float) -> float:
    """Left/top edge of cell ``k`` as the decoder computes it (``k * cell``)."""
    return k * cell


def _cell_end(k: int, cell: float) -> float:
    """Right/bottom edge of cell ``k`` as the decoder computes it (``k * cell + cell``)."""
    return k * cell + cell


def _hf_first_cell(x0: float, num_bins: int) -> int:
    """HF's ``floor(x0 * P)``, corrected to the decoder's float grid: the last cell whose start is ``<= x0``."""
    cell = 1.0 / num_bins
    k = math.floor(x0 * num_bins)
    while k > 0 and _cell_start(k, cell) > x0:
        k -= 1
    while _cell_start(k + 1, cell) <= x0:
        k += 1
    return k


def _hf_last_cell(x1: float, num_bins: int) -> int:
    """HF's ``ceil(x1 * P - 1)``, corrected to the decoder's float grid: the first cell whose end is ``>= x1``
    (at most the last cell)."""
    cell = 1.0 / num_bins
    k = math.ceil(x1 * num_bins - 1)
    while k > 0 and _cell_end(k - 1, cell) >= x1:
        k -= 1
    while k < num_bins - 1 and _cell_end(k, cell) < x1:
        k += 1
    return k


def box_to_patch_indices(
    box: Sequence[float], num_bins: int = DEFAULT_NUM_BINS, mode: str = "release"
) -> Tuple[int, int]:
    """``(ul, lr)`` cell indices of the normalised box ``(x0, y0, x1, y1)`` on a ``P x P`` grid, row-major
    (``index = row * P + col``; the row comes from the y coordinates, the column from the x ones).

    * ``mode="release"`` (the released training encoder ``get_box_coords_index``, verbatim in float):
      ``col = floor(x0 / c)`` for the upper-left cell and ``col = floor(min(x1, 0.99999) / c)`` for the lower-right
      one, ``c = 1.0 / P``, same for the rows. Accepts degenerate boxes (``x1 == x0``). Training data of the
      released checkpoint used it. It is not the inverse of the decoder (``(0, 0) -> (0, 0, 1/32, 1/32) -> (0, 33)``).
    * ``mode="hf"`` (HF transformers ``coordinate_to_patch_index``): ``col = floor(x0 * P)`` and
      ``col = ceil(x1 * P - 1)``, same for the rows, each corrected to the decoder's own float grid: the upper-left
      column is the last one whose start ``k * c`` is ``<= x0``, the lower-right column the first one whose end
      ``k * c + c`` is ``>= x1`` (clamped to the grid). Needs ``x1 > x0`` and ``y1 > y0``.

    What ``hf`` mode guarantees:

    1. **Inverse of the decoder on every grid**: ``box_to_patch_indices(patch_indices_to_box(ul, lr, P), P, "hf")
       == (ul, lr)`` for every ``P`` and every pair whose lower-right cell is not left of or above the upper-left
       one (tested on every such pair for P = 20, 24, 32, 40). HF's uncorrected formula fails this for some cells
       when ``P`` is not a power of two (its float ``x * P`` lands a hair above or below the integer), e.g. on
       P = 24.
    2. **Bit-for-bit HF when P is a power of two** (the released 32): there ``x * P`` and the grid values
       ``k / P`` are exact in binary, so the correction never moves a cell and the result is HF's for every box
       (tested on all decoded pairs and random boxes at P = 32). The one exception is a box with ``x1 * P`` or
       ``y1 * P`` at most 2^-54, for which HF's float ``x1 * P - 1`` rounds to -1, a column outside the grid; here
       it is column 0.

    The two modes disagree when ``x1 * P`` or ``y1 * P`` is an integer below ``P``, i.e. the right or bottom edge
    lies exactly on a grid line: ``release`` puts that edge in the cell to its right/below, ``hf`` in the cell it
    closes. Example (P=32): ``(0.25, 0.25, 0.5, 0.5)`` -> ``release (264, 528)``, ``hf (264, 495)``
    (``0.5 * 32 = 16``: release column/row 16, hf column/row 15). Both give ``(195, 784)`` / ``(195, 751)`` for
    ``(0.1, 0.2, 0.5, 0.75)`` and ``(0, 1023)`` for ``(0, 0, 1, 1)``.

    Raises ``ValueError`` (naming the box) for coordinates outside ``[0, 1]``, ``x1 < x0`` or ``y1 < y0`` (``<=`` in
    ``hf`` mode), and, in ``release`` mode, a zero-width box on the right or bottom border (``x0 == 1``), whose
    upper-left cell would fall off the grid.
    """
    num_bins = _check_num_bins(num_bins)
    if mode not in BOX_ENCODER_MODES:
        raise ValueError(f"mode must be one of {BOX_ENCODER_MODES}, got {mode!r}")
    x0, y0, x1, y1 = _check_box(box, strict=mode == "hf")
    if mode == "release":
        cell = 1.0 / num_bins
        ul_col, ul_row = math.floor(x0 / cell), math.floor(y0 / cell)
        lr_col = math.floor(min(x1, RELEASE_X1_CLAMP) / cell)
        lr_row = math.floor(min(y1, RELEASE_X1_CLAMP) / cell)
    else:
        ul_col, ul_row = _hf_first_cell(x0, num_bins), _hf_first_cell(y0, num_bins)
        lr_col, lr_row = _hf_last_cell(x1, num_bins), _hf_last_cell(y1, num_bins)
    if ul_col >= num_bins or ul_row >= num_bins:
        raise ValueError(f"box {box!r} has its upper-left corner on the right or bottom border, outside every cell")
    return ul_row * num_bins + ul_col, lr_row * num_bins + lr_col


def patch_indices_to_box(ul: int, lr: int, num_bins: int = DEFAULT_NUM_BINS) -> Box:
    """Normalised box decoded from the cell pair ``(ul, lr)`` (the decoder of the release and of HF).

    With ``c = 1.0 / P``: in general the box joins the cell centres,
    ``(ul_col c + c/2, ul_row c + c/2, lr_col c + c/2, lr_row c + c/2)``; when the two cells are the same, or
    share a column or a row, it spans the cell edges instead, ``(ul_col c, ul_row c, lr_col c + c, lr_row c + c)``,
    so the box never has zero width or height. The float expressions are the release's and HF's
    (``get_box_coords_from_index`` / ``patch_index_to_coordinate``), so the result is theirs bit for bit on every
    grid. Examples (P=32): ``(44, 863)`` -> ``(0.390625, 0.046875, 0.984375, 0.828125)``; ``(33, 33)`` ->
    ``(1/32, 1/32, 1/16, 1/16)``; ``(0, 31)`` -> ``(0, 0, 1, 1/32)``.

    Raises ``ValueError`` when an index is outside ``[0, P*P)``. A pair with ``lr`` left of or above ``ul`` is
    decoded as is (``x1 < x0``), as the release does.
    """
    num_bins = _check_num_bins(num_bins)
    for name, value in (("ul", ul), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < num_bins**2:
            raise ValueError(f"patch index {name}={value!r} is outside [0, {num_bins**2}) for num_bins={num_bins}")
    cell = 1.0 / num_bins
    ul_row, ul_col = divmod(int(ul), num_bins)
    lr_row, lr_col = divmod(int(lr), num_bins)
    if ul == lr or ul_col == lr_col or ul_row == lr_row:
        return (_cell_start(ul_col, cell), _cell_start(ul_row, cell), _cell_end(lr_col, cell), _cell_end(lr_row, cell))
    half = cell / 2
    return ul_col * cell + half, ul_row * cell + half, lr_col * cell + half, lr_row * cell + half


IMAGE_VIEWS = ("squash", "crop")
"""How the model saw the image: ``squash`` = the whole image resized to a square (the release's inference),
``crop`` = the central ``min(W, H)`` square (resize + centre crop, the training view)."""


def box_to_pixels(box: Sequence[float], width: float, height: float, view: str = "squash") -> Box:
    """A normalised box of the model's view -> pixel ``(x0, y0, x1, y1)`` on the original ``width x height`` image,
    in float: ``squash``: ``(x0 W, y0 H, x1 W, y1 H)``, as the Kosmos-2 evaluation scripts scale
    (``refexp_evaluate.py``, ``flickr_entities_evaluate.py``); ``crop``: through the central ``min(W, H)`` square.

    The one conversion used wherever a box goes to pixels (RefCOCO and Flickr30k Entities scoring, drawing), never
    truncated to int: truncation shrinks and shifts small boxes by up to a pixel, enough to move an IoU across 0.5.
    Raises ``ValueError`` for another ``view``.
    """
    x0, y0, x1, y1 = box
    if view == "squash":
        left, top, sx, sy = 0.0, 0.0, float(width), float(height)
    elif view == "crop":
        side = float(min(width, height))
        left, top, sx, sy = (width - side) / 2, (height - side) / 2, side, side
    else:
        raise ValueError(f"view must be one of {IMAGE_VIEWS}, got {view!r}")
    return left + x0 * sx, top + y0 * sy, left + x1 * sx, top + y1 * sy


# ---- serialising and parsing ---------------------------------------------------------------------------------


def format_object(pairs: Sequence[Tuple[int, int]]) -> str:
    """The ``<object>`` chunk of one or more ``(ul, lr)`` pairs, without spaces, in the given order::

    <object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/><patch_index_0005>...</object>
    """
    if not pairs:
        raise ValueError("an <object> chunk needs at least one (ul, lr) pair")
    boxes = BOX_DELIMITER.join(patch_index_token(ul) + patch_index_token(lr) for ul, lr in pairs)
    return OBJECT_START + boxes + OBJECT_END


def object_patch_pairs(chunk: str) -> List[Tuple[int, int]]:
    """``(ul, lr)`` pairs of one object chunk, ``<object>`` / ``</object>`` optional::

        "<object><patch_index_0000><patch_index_0527></delimiter_of_multi_objects/><patch_index_0016>
        <patch_index_1023></object>" -> [(0, 527), (16, 1023)]

    Raises ``ValueError`` when the chunk is not a sequence of delimiter-separated patch-index pairs.
    """
    body = chunk
    if body.startswith(OBJECT_START) and body.endswith(OBJECT_END):
        body = body[len(OBJECT_START) : -len(OBJECT_END)]
    pairs = []
    for pair in body.split(BOX_DELIMITER):
        indices = _PATCH_INDEX_RE.findall(pair)
        if len(indices) != 2 or _PATCH_INDEX_RE.sub("", pair):
            raise ValueError(f"not an object chunk of patch-index pairs: {chunk!r}")
        pairs.append((int(indices[0]), int(indices[1])))
    return pairs


def object_boxes(chunk: str, num_bins: int = DEFAULT_NUM_BINS) -> List[Box]:
    """Decoded boxes of one object chunk (:func:`object_patch_pairs` then :func:`patch_indices_to_box`)."""
    return [patch_indices_to_box(ul, lr, num_bins) for ul, lr in object_patch_pairs(chunk)]


class GroundedObject(NamedTuple):
    """One ``<object>`` chunk found in raw text."""

    name: Optional[str]
    """The phrase text between ``<phrase>`` and ``</phrase>`` (spaces kept), or ``None`` for an unnamed object."""
    name_span: Tuple[int, int]
    """Raw-text span of ``name``; for an unnamed object the empty span at the start of ``<object>``."""
    index_strings: List[Tuple[str, str]]
    """The digit strings of each pair as written (``("0900", "1023")``)."""

    @property
    def pairs(self) -> List[Tuple[int, int]]:
        """``(ul, lr)`` pairs as integers."""
        return [(int(ul), int(lr)) for ul, lr in self.index_strings]


def find_grounded_objects(text: str) -> List[GroundedObject]:
    """Every :data:`OBJECT_PATTERN` match in ``text``, left to right. A phrase names its object only when
    ``</phrase>`` is directly followed by ``<object>`` and the phrase holds no ``<``; otherwise the object is
    unnamed (``"<phrase>a dog</phrase> <object>..."`` has an unnamed object)."""
    found = []
    for match in OBJECT_PATTERN.finditer(text):
        pairs = [tuple(_PATCH_INDEX_RE.findall(pair)) for pair in match.group(3).split(BOX_DELIMITER)]
        if match.group(1):
            found.append(GroundedObject(match.group(2), match.span(2), pairs))
        else:
            found.append(GroundedObject(None, (match.start(), match.start()), pairs))
    return found


def decode_bbox_from_caption(text: str, num_bins: int = DEFAULT_NUM_BINS) -> List[list]:
    """Flat ``[name, x0, y0, x1, y1]`` rows, one per box, as the release's ``decode_string.py`` returns them.

    Names keep their spaces (``' a snowman'``); a phrase with several boxes repeats its name; an unnamed object is
    named by its digit strings as written, ``'<0900><1023>'``.
    """
    rows = []
    for obj in find_grounded_objects(text):
        for (ul_str, lr_str), (ul, lr) in zip(obj.index_strings, obj.pairs):
            name = obj.name if obj.name is not None else f"<{ul_str}><{lr_str}>"
            rows.append([name, *patch_indices_to_box(ul, lr, num_bins)])
    return rows


def _clean_length(raw_prefix: str) -> int:
    return len(_TAG_RE.sub("", raw_prefix))


def parse_grounded_text(text: str, num_bins: int = DEFAULT_NUM_BINS) -> Tuple[str, List[Entity]]:
    """``(clean_text, entities)`` of generated text, the result of HF ``post_process_generation``::

        '<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>.'
        -> ('An image of a snowman.', [('a snowman', (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)])])

    Steps: keep what follows the last ``</image>``; the clean text drops every ``<...>`` tag and is stripped; each
    entity is ``(phrase, (start, end), boxes)`` with the phrase stripped and ``clean_text[start:end] == phrase``.
    A named phrase is one entity holding all its boxes (decoded with :func:`patch_indices_to_box`); an unnamed
    object gives one entity per box, named ``'<patch_index_900><patch_index_1023>'`` (integers, no zero padding)
    with the empty span where the object stood (after stripping that span may point just past the text's end).

    Unlike HF, a patch index outside ``[0, P*P)`` raises ``ValueError`` instead of decoding to a box off the image.
    """
    caption = text.split(IMAGE_END)[-1]
    cleaned = _TAG_RE.sub("", caption)
    leading = len(cleaned) - len(cleaned.lstrip())
    entities: List[Entity] = []
    for obj in find_grounded_objects(caption):
        start, end = (_clean_length(caption[:offset]) - leading for offset in obj.name_span)
        if obj.name is not None:
            name = obj.name
            start += len(name) - len(name.lstrip())
            end -= len(name) - len(name.rstrip())
            boxes = [patch_indices_to_box(ul, lr, num_bins) for ul, lr in obj.pairs]
            entities.append((name.strip(), (start, end), boxes))
        else:
            for ul, lr in obj.pairs:
                entities.append(
                    (f"<patch_index_{ul}><patch_index_{lr}>", (start, end), [patch_indices_to_box(ul, lr, num_bins)])
                )
    return cleaned.strip(), entities
