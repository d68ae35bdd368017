"""Robust image decoding and the one counting handler every stage reports bad samples to.

``decode_image`` turns bytes into an RGB ``PIL.Image`` whatever the file holds: grayscale, CMYK, palette or
alpha PNG (composited on white, not on black), 16-bit, and EXIF-rotated photos (the pixels are rotated so the
image looks as a viewer shows it). Anything undecodable raises :class:`BadSample`.

``BadSampleCounter`` counts skipped samples by reason, logs a summary every ``log_every`` skips, and raises
:class:`TooManyBadSamples` naming the last bad file and column once the bad fraction passes ``max_bad_fraction``
(after ``min_samples`` have been seen, so one early bad row does not stop a run).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from typing import Optional

from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

# A decompression bomb is a bad sample, not a crash; raise its warning to an error so it is counted.
warnings.simplefilter("error", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadSample(Exception):
    """A sample that cannot be used; carries where it came from so the skip can name it."""

    def __init__(self, reason: str, source: str = "?", field: str = "?"):
        super().__init__(f"{reason} ({source}, field {field!r})")
        self.reason, self.source, self.field = reason, source, field

    def __reduce__(self):  # keep reason, source and field when a loader worker sends it to the main process
        return type(self), (self.reason, self.source, self.field)


class TooManyBadSamples(RuntimeError):
    pass


def decode_image(data: bytes, source: str = "?", field: str = "image", defer_jpeg: bool = False) -> Image.Image:
    """Decode image bytes to an upright RGB image. Raises :class:`BadSample` on any failure.

    With ``defer_jpeg``, a JPEG without an EXIF rotation comes back opened but not decoded (its header is read,
    ``size`` is known; its bytes are :func:`deferred_bytes`): the transform decodes it, possibly at a reduced DCT
    scale, or finishes it with :func:`finish_image`. Any other image is decoded here as without the flag."""
    if not data:
        raise BadSample("empty image", source, field)
    try:
        img = Image.open(io.BytesIO(data))
        if defer_jpeg and img.format == "JPEG" and img.getexif().get(_ORIENTATION, 1) == 1:
            img.encoded_bytes = data  # for a decoder other than Pillow's (see deferred_bytes)
            return img
        img.load()  # force the full decode so a truncated file fails here
        img = ImageOps.exif_transpose(img, in_place=True) or img  # in place: no copy of an upright image
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ) as exc:
        raise BadSample(f"undecodable image: {type(exc).__name__}: {exc}", source, field) from None
    return to_rgb(img)


_ORIENTATION = 0x0112
"""The EXIF orientation tag (1 = upright)."""


def is_deferred(img: Image.Image) -> bool:
    """Whether ``img`` is a JPEG that :func:`decode_image` opened without decoding (``defer_jpeg``)."""
    return getattr(img, "format", None) == "JPEG" and bool(getattr(img, "tile", None))


def deferred_bytes(img: Image.Image) -> bytes:
    """The encoded bytes of an image :func:`decode_image` deferred, for decoding it with another library."""
    return img.encoded_bytes


def finish_image(img: Image.Image, source: str = "?", field: str = "image") -> Image.Image:
    """Decode a deferred image (after an optional ``draft``) to RGB; :class:`BadSample` on a corrupt file. An image
    that is already decoded comes back as :func:`to_rgb` makes it."""
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadSample(f"undecodable image: {type(exc).__name__}: {exc}", source, field) from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: rescale to 8 bits instead of PIL's clipping conversion.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = (arr / hi * 255.0) if hi > 0 else arr
        return Image.fromarray(arr.astype("uint8"), mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Read and decode an image file; a missing file raises ``FileNotFoundError`` naming the path."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    return decode_image(data, source=path)


class BadSampleCounter:
    """Counts good and bad samples of one stream; see the module docstring. ``quiet`` counts without logging (a
    look-ahead such as the iterator's first batch, whose skips the real stream logs again)."""

    def __init__(
        self,
        name: str = "data",
        log_every: int = 100,
        max_bad_fraction: float = 0.1,
        min_samples: int = 100,
        quiet: bool = False,
    ):
        self.name, self.log_every, self.quiet = name, log_every, quiet
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.good = 0
        self.bad = 0
        self.reasons: Counter = Counter()
        self.last: Optional[BadSample] = None

    def ok(self) -> None:
        self.good += 1

    def skip(self, exc: BadSample) -> None:
        self.bad += 1
        self.reasons[exc.reason.split(":")[0]] += 1
        self.last = exc
        if not self.quiet and (self.bad == 1 or self.bad % self.log_every == 0):
            logger.warning(
                "%s: skipped %d bad samples of %d seen (%s); last: %s",
                self.name,
                self.bad,
                self.seen,
                dict(self.reasons),
                exc,
            )
        self.check()

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def check(self) -> None:
        if self.seen >= self.min_samples and self.bad > self.max_bad_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.name}: {self.bad} of {self.seen} samples were bad (more than {self.max_bad_fraction:.1%}); "
                f"last bad sample: {self.last}. Fix the data or raise --max-bad-fraction."
            )

    def state(self) -> dict:
        return {"good": self.good, "bad": self.bad, "reasons": dict(self.reasons)}

    def load_state(self, state: dict) -> None:
        """Continue the counts of :meth:`state` (a resumed epoch keeps its bad fraction)."""
        self.good, self.bad = int(state.get("good", 0)), int(state.get("bad", 0))
        self.reasons = Counter(state.get("reasons", {}))
