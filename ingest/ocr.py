"""Optical character recognition of page images: scanned PDF pages and image files.

    page image (PIL) ─► OcrEngine.recognise ─► OcrText(text, confidence 0..1)

Engines register by name with :func:`register_ocr_engine`; :func:`open_engine` builds the one
the options name. Registered here: ``tesseract`` (the ``tesseract`` program through
pytesseract, with the language packs the options list).

Why Tesseract, measured on this machine (2 cores; a letter page of 12 pt Helvetica rendered,
saved as an image-only PDF at 200 dpi and read back at 300 dpi): Tesseract 5.3 read it with
character accuracy 1.000 in about 3 s; rapidocr-onnxruntime 1.4.4 (the pip-only engine whose
wheel carries its PP-OCRv4 models) reached 0.65 at 150 or 200 dpi, dropping two lines of eight
and the spaces between words, in 6 to 10 s with 850 MB resident. onnxtr downloads its models
on first use, which the appliance must never do. Tesseract is a system package
(``tesseract-ocr``, ``tesseract-ocr-eng``; ``install.sh --system`` installs them); without it a
scanned page fails with that fix as its reason, and text PDFs are not affected.

Nothing is fetched at run time: Tesseract reads its language data from the local tessdata
folder only. The parser sandbox runs OCR, so its memory and time limits apply (Tesseract is a
child process and inherits the address-space limit).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from appliance.core.errors import ParseError

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_PAGE_PIXELS = 60_000_000
"""A rendered page larger than this is rendered at a lower resolution (memory bound)."""


@dataclass(frozen=True)
class OcrOptions:
    """What the parsers need to know about OCR (built from ``settings.ocr``)."""

    engine: str = "tesseract"
    """An engine name registered with :func:`register_ocr_engine`, or "off"."""
    languages: tuple[str, ...] = ("eng",)
    dpi: int = 300
    min_text_chars: int = 20
    """A PDF page whose text layer has fewer letters and digits than this is OCR'd."""
    max_pages: int = 500
    """At most this many pages of one file are OCR'd; a longer scan is rejected."""

    @property
    def enabled(self) -> bool:
        return self.engine != "off"


@dataclass(frozen=True)
class OcrText:
    text: str
    confidence: float
    """The engine's mean word confidence, 0..1 (0 when it found no words)."""


class OcrEngine(Protocol):
    def recognise(self, image: Image) -> OcrText: ...


EngineFactory = Callable[[OcrOptions], OcrEngine]

_ENGINES: dict[str, EngineFactory] = {}


def register_ocr_engine(name: str, factory: EngineFactory) -> None:
    """Register an engine under ``name``; ValueError for a duplicate or for "off"."""
    if not name or name == "off" or name in _ENGINES:
        raise ValueError(f"OCR engine name {name!r} is reserved or already registered")
    _ENGINES[name] = factory


def ocr_engines() -> list[str]:
    return sorted(_ENGINES)


def open_engine(options: OcrOptions) -> OcrEngine:
    """The engine the options name, checked to be usable (ParseError saying how to mend it)."""
    factory = _ENGINES.get(options.engine)
    if factory is None:
        raise ParseError(
            f"unknown OCR engine {options.engine!r}; known: {', '.join(ocr_engines())} or off"
        )
    return factory(options)


# --- Tesseract -------------------------------------------------------------------------------

_TESSERACT_FIX = (
    "install it: install.sh --system, or apt-get install tesseract-ocr tesseract-ocr-eng"
)


@dataclass
class TesseractEngine:
    """The ``tesseract`` program via pytesseract, page segmentation mode 3 (automatic)."""

    options: OcrOptions
    _lang: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            import pytesseract
        except ImportError:
            raise ParseError(
                "OCR needs the Python package pytesseract: pip install 'pytesseract==0.3.13'"
            ) from None
        if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
            raise ParseError(
                f"OCR needs the tesseract program, which is not installed; {_TESSERACT_FIX}"
            )
        installed = set(pytesseract.get_languages(config=""))
        missing = [lang for lang in self.options.languages if lang not in installed]
        if missing:
            packs = " ".join(f"tesseract-ocr-{lang}" for lang in missing)
            raise ParseError(
                f"OCR language pack(s) {', '.join(missing)} not installed "
                f"(installed: {', '.join(sorted(installed)) or 'none'}); apt-get install {packs}"
            )
        self._lang = "+".join(self.options.languages)

    def recognise(self, image: Image) -> OcrText:
        import pytesseract

        try:
            data = pytesseract.image_to_data(
                image, lang=self._lang, config="--psm 3", output_type=pytesseract.Output.DICT
            )
        except pytesseract.TesseractError as exc:
            raise ParseError(f"OCR failed: {' '.join(str(exc.message).split())[:160]}") from None
        return _tesseract_text(data)


def _tesseract_text(data: dict[str, list[Any]]) -> OcrText:
    """Words back into lines (one per Tesseract line) and paragraphs (a blank line between
    blocks or paragraphs), with the mean confidence of the words."""
    lines: list[str] = []
    words: list[str] = []
    confidences: list[float] = []
    place: tuple[int, int, int] | None = None
    for i, word in enumerate(data["text"]):
        word = str(word).strip()
        if not word:
            continue
        here = (int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i]))
        if place is not None and here != place:
            lines.append(" ".join(words))
            words = []
            if here[:2] != place[:2]:
                lines.append("")
        place = here
        words.append(word)
        conf = float(data["conf"][i])
        if conf >= 0:
            confidences.append(conf / 100)
    if words:
        lines.append(" ".join(words))
    confidence = sum(confidences) / len(confidences) if confidences else 0.0
    return OcrText("\n".join(lines), round(confidence, 3))


register_ocr_engine("tesseract", TesseractEngine)


# --- images ----------------------------------------------------------------------------------


def image_frames(path: os.PathLike[str] | str) -> Iterator[tuple[int, int, Image]]:
    """(frame number from 1, frames, frame as an 8-bit image) of an image file; a multi-page
    TIFF gives one per page. ParseError for an unreadable or oversized image."""
    from PIL import Image as PILImage
    from PIL import ImageSequence, UnidentifiedImageError

    try:
        with PILImage.open(path) as image:
            frames = int(getattr(image, "n_frames", 1))
            for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
                if frame.width * frame.height > MAX_PAGE_PIXELS:
                    raise ParseError(
                        f"image too large to OCR: {frame.width}x{frame.height} pixels "
                        f"(limit {MAX_PAGE_PIXELS // 1_000_000} megapixels)"
                    )
                yield number, frames, frame.convert("L")
    except UnidentifiedImageError:
        raise ParseError("not a readable image") from None
    except PILImage.DecompressionBombError as exc:
        raise ParseError(f"image too large to OCR: {exc}") from None
    except OSError as exc:
        raise ParseError(f"not a readable image: {' '.join(str(exc).split())[:160]}") from None


def character_accuracy(truth: str, read: str) -> float:
    """1 - (edit distance / length of the truth), whitespace runs counted as one space: how
    the OCR tests and benchmark score a page whose text is known."""
    a = " ".join(truth.split())
    b = " ".join(read.split())
    if not a:
        return 1.0 if not b else 0.0
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return max(0.0, 1 - previous[-1] / len(a))
