"""Text extraction, one parser per file suffix.

A parser is a function ``(path) -> ParsedDocument`` registered for one or more suffixes with
:func:`register_parser`; :func:`parser_for` picks one by the path's suffix. A parser raises
:class:`~appliance.core.errors.ParseError` with a short reason an admin can act on ("encrypted PDF
(password required)"). Hostile files can still make a parser hang or allocate without bound,
so the service runs parsers through :class:`ingest.sandbox.ParserSandbox`, never in-process.

Registered here: ``.pdf`` (pypdfium2), ``.docx`` (python-docx), ``.md``/``.markdown``,
``.txt``/``.text``, ``.html``/``.htm`` (BeautifulSoup with lxml), and the images ``.png``,
``.jpg``/``.jpeg``, ``.tif``/``.tiff`` (Pillow, read by OCR). The format libraries are
imported on first use, so importing this module is cheap and does no I/O.

Every parser also takes :class:`ParseOptions`: OCR (:mod:`ingest.ocr`) reads a PDF page whose
text layer is empty or nearly so, and every image; tables (PDF: :mod:`ingest.pdf_tables`,
DOCX and HTML: their table elements) become sections of rows that keep their column headers
(:mod:`ingest.tables`).

Every parser returns sections whose text has ``\\n`` line ends, no trailing spaces and at most
two blank lines in a row; a heading path is the headings above a section joined with " > ".
"""

from __future__ import annotations

import codecs
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance.core.errors import ParseError
from appliance.core.protocols import ParsedDocument, Section
from ingest.ocr import MAX_PAGE_PIXELS, OcrEngine, OcrOptions, image_frames, open_engine
from ingest.tables import TableStyle, grid_table, table_section

if TYPE_CHECKING:
    from bs4 import Tag
    from docx.document import Document as DocxDocument
    from docx.table import Table as DocxTable

ProgressFn = Callable[[int, int], None]
"""Called with (pages done, pages in all) while a long file is OCR'd."""


@dataclass(frozen=True)
class ParseOptions:
    """How the parsers read what is not plain text (built from ``settings.ocr`` and
    ``settings.ingest.tables``)."""

    ocr: OcrOptions = field(default_factory=OcrOptions)
    tables: bool = True
    table_style: TableStyle = "labelled"
    progress: ProgressFn | None = None


DEFAULT_OPTIONS = ParseOptions()


class Parser(Protocol):
    def __call__(self, path: Path, options: ParseOptions = ..., /) -> ParsedDocument: ...


_PARSERS: dict[str, Parser] = {}

EMPTY_REASON = "empty document: no extractable text"

# A DOCX is a zip; these bound what opening one may inflate to (the sandbox's memory limit is
# the second line of defence).
DOCX_MAX_UNCOMPRESSED = 512 * 1024 * 1024
DOCX_MAX_RATIO = 100
_DOCX_RATIO_FLOOR = 1024 * 1024  # members smaller than this may compress as well as they like

TEXT_SNIFF_BYTES = 64 * 1024
MAX_HEADING_CHARS = 200

# --- the registry ----------------------------------------------------------------------------


def register_parser(suffixes: str | Iterable[str], fn: Parser) -> None:
    """Register ``fn`` for one suffix (".pdf") or several. Suffixes are matched lowercase.

    Raises ValueError for a malformed suffix or one that already has a parser; nothing is
    registered then.
    """
    wanted = [suffixes] if isinstance(suffixes, str) else list(suffixes)
    if not wanted:
        raise ValueError("register_parser needs at least one suffix")
    normalised: list[str] = []
    for suffix in wanted:
        if not isinstance(suffix, str) or not re.fullmatch(r"\.[^./\\\s]+", suffix):
            raise ValueError(
                f"a parser suffix is a dot and a name without dots or spaces, like '.pdf'; "
                f"got {suffix!r}"
            )
        key = suffix.lower()
        if key in _PARSERS or key in normalised:
            owner = _PARSERS.get(key, fn)
            raise ValueError(
                f"suffix {key!r} already has a parser ({_describe(owner)}); "
                f"each suffix has exactly one"
            )
        normalised.append(key)
    for key in normalised:
        _PARSERS[key] = fn


def parser_for(path: Path) -> Parser:
    """The parser for ``path``'s suffix; ParseError naming the known suffixes if none."""
    suffix = path.suffix.lower()
    parser = _PARSERS.get(suffix)
    if parser is None:
        known = ", ".join(sorted(_PARSERS))
        what = f"files ending in {suffix!r}" if suffix else "files without a suffix"
        raise ParseError(f"no parser for {what}; supported: {known}")
    return parser


def supported_suffixes() -> frozenset[str]:
    return frozenset(_PARSERS)


def parse_file(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """Parse ``path`` in this process with the registered parser for its suffix."""
    return parser_for(path)(path, options)


def preload_libraries() -> None:
    """Import the format libraries now (a long-lived worker does this once at start, so its
    first parse is not slower than the rest)."""
    import bs4  # noqa: F401
    import docx  # noqa: F401
    import lxml.etree  # noqa: F401
    import PIL.Image  # noqa: F401
    import pypdfium2  # noqa: F401


def _describe(fn: Parser) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --- shared text helpers ---------------------------------------------------------------------

_TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")  # three or more blank lines
_SPACE_RUN = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """``\\n`` line ends, no trailing spaces or NULs, at most two blank lines in a row, no
    leading or trailing blank lines, and no lone surrogates (they cannot be encoded)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUN.sub("\n\n\n", text).strip("\n")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _one_line(text: str) -> str:
    return _SPACE_RUN.sub(" ", text).strip()


def _short(message: object, limit: int = 160) -> str:
    text = _one_line(str(message))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _human_size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MB"
    return f"{n / 1024:.0f} KB"


class _Outline:
    """Collects lines into sections, starting a new one at each heading and tracking the
    heading path by level. Level 0 (a DOCX "Title") heads only the text right after it."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self._stack: list[tuple[int, str]] = []
        self._lines: list[str] = []

    def heading(self, level: int, text: str, raw: str | None = None) -> None:
        """Start a section under heading ``text``; ``raw`` is what the text keeps for it
        (the markdown line, say), the heading text itself by default."""
        title = _one_line(text)
        if not title:
            if raw:
                self.line(raw)
            return
        if len(title) > MAX_HEADING_CHARS:
            title = title[: MAX_HEADING_CHARS - 1] + "…"
        self._flush()
        self._stack = [(lvl, t) for lvl, t in self._stack if 0 < lvl < level]
        self._stack.append((level, title))
        self._lines.append(raw if raw is not None else text)

    def line(self, text: str) -> None:
        self._lines.append(text)

    def table(self, section: Section | None) -> None:
        """A table section (see :mod:`ingest.tables`) under the current heading path."""
        if section is None:
            return
        self._flush()
        path = " > ".join(t for _, t in self._stack) or None
        self.sections.append(Section(text=section.text, heading=path, header=section.header))

    def last_line(self) -> str:
        """The latest line that has text (a table's caption, often)."""
        for line in reversed(self._lines):
            if line.strip():
                return _one_line(line)
        return ""

    def finish(self) -> list[Section]:
        self._flush()
        return self.sections

    def _flush(self) -> None:
        text = clean_text("\n".join(self._lines))
        self._lines = []
        if text.strip():
            path = " > ".join(t for _, t in self._stack) or None
            self.sections.append(Section(text=text, heading=path))


def _document(sections: list[Section], title: str | None, pages: int | None) -> ParsedDocument:
    if not sections:
        raise ParseError(EMPTY_REASON)
    return ParsedDocument(sections=sections, title=title or None, pages=pages)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParseError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ParseError("empty file (0 bytes)")
    return data


def _file_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ParseError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ParseError("empty file (0 bytes)")
    return size


_UTF_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE: its BOM starts the same way
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])


def _unicode_bom(data: bytes) -> str | None:
    for bom, encoding in _UTF_BOMS:
        if data.startswith(bom):
            return encoding
    return None


def _reject_binary(data: bytes) -> None:
    """ParseError unless the first 64 KiB look like text: no NUL, at most 10% control bytes."""
    sample = data[:TEXT_SNIFF_BYTES]
    if b"\x00" in sample:
        raise ParseError("binary content, not text")
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls * 10 > len(sample):
        raise ParseError("binary content, not text")


def decode_text(data: bytes) -> str:
    """Text from bytes: UTF-32/16 with a BOM, UTF-8 (BOM optional), else cp1252 or latin-1.
    ParseError for binary content."""
    encoding = _unicode_bom(data)
    if encoding is not None:
        return data.decode(encoding, errors="replace")
    _reject_binary(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --- PDF -------------------------------------------------------------------------------------

# pdfium marks a hyphen it removed at a line break with \x02 (\ufffe in UCS-2 output).
_PDF_HYPHENS = str.maketrans({"\x02": "-", "\ufffe": "-"})
_CODE_LIKE = re.compile(r"[\w.\-/:#]+")
_FILE_NAME_LIKE = re.compile(r"\.(?:pdf|docx?|rtf|odt|html?|txt|xlsx?|pptx?|indd|tex)$", re.I)
_PLACEHOLDER_TITLES = frozenset({"untitled", "untitled document", "title", "document", "none"})
_MAX_OUTLINE_ENTRIES = 5000


def pdf_title(raw: str | None) -> str | None:
    """The metadata Title when it reads like a title: at least three letters, not a single
    code such as an SEC accession number ("0000320193-22-000070", "aapl-20220625"), not a file
    name ("Microsoft Word - memo.docx") and not a placeholder ("Untitled")."""
    title = _one_line(raw or "")
    if sum(c.isalpha() for c in title) < 3:
        return None
    if _CODE_LIKE.fullmatch(title) and any(c.isdigit() for c in title):
        return None
    if _FILE_NAME_LIKE.search(title) or title.lower() in _PLACEHOLDER_TITLES:
        return None
    return title


def _pdf_load_reason(exc: Exception) -> str:
    import pypdfium2.raw as pdfium_c

    code = getattr(exc, "err_code", None)
    if code == pdfium_c.FPDF_ERR_PASSWORD:
        return "encrypted PDF (password required)"
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return "encrypted PDF (unsupported security handler)"
    if code == pdfium_c.FPDF_ERR_FORMAT:
        return "not a valid PDF: damaged, truncated or not a PDF at all"
    if code == pdfium_c.FPDF_ERR_FILE:
        return "cannot read file: not found or not readable"
    return f"not a valid PDF: {_short(exc)}"


def _pdf_outline_headings(pdf: Any, n_pages: int) -> dict[int, str]:
    """Page index -> heading path from the PDF's bookmarks (the latest one that starts on or
    before the page). Empty when the PDF has no outline or a broken one."""
    import pypdfium2 as pdfium

    starts: list[tuple[int, str]] = []
    stack: list[str] = []
    try:
        for count, bookmark in enumerate(pdf.get_toc(max_depth=8)):
            if count >= _MAX_OUTLINE_ENTRIES:
                break
            del stack[bookmark.level :]
            stack.append(_one_line(bookmark.get_title() or "")[:MAX_HEADING_CHARS])
            dest = bookmark.get_dest()
            index = dest.get_index() if dest is not None else None
            path = " > ".join(t for t in stack if t)
            if index is not None and 0 <= index < n_pages and path:
                starts.append((index, path))
    except pdfium.PdfiumError:
        return {}
    by_page: dict[int, str] = {}
    for index, path in sorted(starts, key=lambda s: s[0]):
        by_page[index] = path
    headings: dict[int, str] = {}
    current: str | None = None
    for index in range(n_pages):
        current = by_page.get(index, current)
        if current is not None:
            headings[index] = current
    return headings


def _letters(text: str) -> int:
    return sum(c.isalnum() for c in text)


class _PageOcr:
    """OCR for the pages of one PDF that lack a text layer: the engine opens on first need; a
    missing engine is remembered as the reason such pages could not be read."""

    def __init__(self, options: ParseOptions) -> None:
        self.options = options
        self.pages = 0
        self.unavailable: str | None = None if options.ocr.enabled else "OCR is off"
        self._engine: OcrEngine | None = None

    def engine(self) -> OcrEngine | None:
        if self._engine is None and self.unavailable is None:
            try:
                self._engine = open_engine(self.options.ocr)
            except ParseError as exc:
                self.unavailable = exc.reason
        return self._engine

    def page(self, page: Any, index: int, n_pages: int) -> tuple[str, float] | None:
        engine = self.engine()
        if engine is None:
            return None
        self.pages += 1
        if self.pages > self.options.ocr.max_pages:
            raise ParseError(
                f"scan too long: more than {self.options.ocr.max_pages} pages to OCR "
                f"(setting ocr.max_pages)"
            )
        width, height = page.get_size()
        scale = self.options.ocr.dpi / 72
        pixels = width * height * scale * scale
        if pixels > MAX_PAGE_PIXELS:
            scale *= (MAX_PAGE_PIXELS / pixels) ** 0.5
        bitmap = page.render(scale=scale, grayscale=True)
        try:
            image = bitmap.to_pil()
            result = engine.recognise(image)
        finally:
            bitmap.close()
        if self.options.progress is not None:
            self.options.progress(index + 1, n_pages)
        return clean_text(result.text), result.confidence


def _pdf_page_sections(
    page: Any, textpage: Any, text: str, number: int, heading: str | None, options: ParseOptions
) -> list[Section]:
    """A page's text, then each table found on it as a section of rows (only pages that look
    tabular pay for the search). The page text stays whole: measured on the 10-Q filings,
    cutting the tables out of it separated each table from the sentence that introduces it
    and lost more evidence than the rows won (see README, Benchmarks)."""
    from ingest.pdf_tables import find_tables, looks_tabular

    sections = [Section(text=text, page=number, heading=heading)]
    if not options.tables or not looks_tabular(text):
        return sections
    for table in find_tables(textpage, options.table_style):
        section = table_section(table.header, table.rows, number, heading)
        if section is not None:
            sections.append(section)
    return sections


def parse_pdf(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """One section per page with text (``page`` is 1-based), plus one per table found on it;
    headings from the bookmarks. A page with fewer than ``ocr.min_text_chars`` letters and
    digits in its text layer is OCR'd (its section records the confidence)."""
    import pypdfium2 as pdfium

    _file_size(path)
    try:
        pdf = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as exc:
        raise ParseError(_pdf_load_reason(exc)) from None
    ocr = _PageOcr(options)
    try:
        n_pages = len(pdf)
        headings = _pdf_outline_headings(pdf, n_pages)
        sections: list[Section] = []
        unreadable = 0
        for index in range(n_pages):
            try:
                page = pdf[index]
            except pdfium.PdfiumError:
                unreadable += 1
                continue
            try:
                textpage = page.get_textpage()
                try:
                    raw = textpage.get_text_bounded()
                    text = clean_text(raw.translate(_PDF_HYPHENS))
                    heading = headings.get(index)
                    if _letters(text) >= options.ocr.min_text_chars:
                        sections += _pdf_page_sections(
                            page, textpage, text, index + 1, heading, options
                        )
                        continue
                finally:
                    textpage.close()
                recognised = ocr.page(page, index, n_pages)
            finally:
                page.close()
            if recognised is not None and recognised[0].strip():
                sections.append(
                    Section(
                        text=recognised[0],
                        page=index + 1,
                        heading=heading,
                        ocr_confidence=recognised[1],
                    )
                )
            elif text.strip():
                sections.append(Section(text=text, page=index + 1, heading=heading))
        title = pdf_title(pdf.get_metadata_dict().get("Title"))
    finally:
        pdf.close()
    if not sections:
        if n_pages and unreadable == n_pages:
            raise ParseError("not a valid PDF: no page could be read")
        if n_pages == 0:
            raise ParseError("empty document: the PDF has no pages")
        if ocr.unavailable is not None:
            raise ParseError(f"no extractable text (scanned PDF?) and no OCR: {ocr.unavailable}")
        raise ParseError("no extractable text, not even by OCR")
    return ParsedDocument(sections=sections, title=title, pages=n_pages)


# --- DOCX ------------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"Heading\s*(\d)")


def check_docx_zip(path: Path) -> None:
    """ParseError unless ``path`` is a zip whose declared sizes are safe to inflate: at most
    512 MB in all and no member over 1 MB that compresses more than 100:1. Headers that
    understate a member's size pass this check, and zipfile's read() inflates the whole member
    before cutting it to the declared size: the sandbox's memory limit is what stops those."""
    _file_size(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise ParseError("not a valid DOCX (zip) file") from None
    except OSError as exc:
        raise ParseError(f"cannot read file: {exc.strerror or exc}") from None
    total = sum(m.file_size for m in members)
    if total > DOCX_MAX_UNCOMPRESSED:
        raise ParseError(f"DOCX zip bomb: {_human_size(total)} uncompressed")
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > _DOCX_RATIO_FLOOR and ratio > DOCX_MAX_RATIO:
            raise ParseError(
                f"DOCX zip bomb: {member.filename!r} expands {ratio:.0f}:1 "
                f"to {_human_size(member.file_size)}"
            )


def _docx_blocks(document: DocxDocument) -> Iterator[Any]:
    """Body paragraphs and tables in document order, including those inside content controls
    (a table of contents, a cover page) that python-docx's own iteration skips."""
    from docx.oxml.ns import qn
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    p_tag, tbl_tag, sdt_tag, content_tag = qn("w:p"), qn("w:tbl"), qn("w:sdt"), qn("w:sdtContent")
    pending = list(reversed(list(document.element.body)))
    while pending:
        element = pending.pop()
        if element.tag == p_tag:
            yield Paragraph(element, document)
        elif element.tag == tbl_tag:
            yield Table(element, document)
        elif element.tag == sdt_tag:
            for content in element.iterchildren(content_tag):
                pending.extend(reversed(list(content)))


def _docx_table_lines(table: DocxTable) -> Iterator[str]:
    """One line per row, cells joined with " | " (a cell spanning columns counts once)."""
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if cell is previous:
                continue
            previous = cell
            parts: list[str] = []
            for item in cell.iter_inner_content():
                if hasattr(item, "rows"):
                    parts.extend(_docx_table_lines(item))
                else:
                    parts.append(item.text)
            cells.append(_one_line(" ".join(parts)))
        if any(cells):
            yield " | ".join(cells)


def _docx_style_name(paragraph: Any) -> str:
    try:
        style = paragraph.style
    except (KeyError, ValueError):
        return ""
    return (getattr(style, "name", None) or "").strip()


def _caption(before: str) -> str:
    """The line before a table when it reads as its caption ("Table 2: Retention periods",
    "Net sales by category (in millions):"): short and not a sentence that ends."""
    if 0 < len(before) <= MAX_HEADING_CHARS and not before.endswith((".", "!", "?")):
        return before
    return ""


def _docx_table_section(table: DocxTable, before: str, style: TableStyle) -> Section | None:
    """A table as rows under its column headers: the first row names the columns (python-docx
    repeats a merged cell in each column it spans); the paragraph before it is its caption
    when short."""
    grid: list[list[str]] = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            parts: list[str] = []
            for item in cell.iter_inner_content():
                parts.extend(_docx_table_lines(item) if hasattr(item, "rows") else [item.text])
            cells.append(_one_line(" ".join(parts)))
        grid.append(cells)
    return grid_table(grid, _caption(before), header_rows=1, style=style)


def parse_docx(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """Sections start at "Title" and "Heading N" paragraphs; each table is a section of rows
    that keep their column headers (" | " rows when ``options.tables`` is off)."""
    check_docx_zip(path)
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from lxml import etree

    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ParseError(f"not a valid DOCX: {_short(exc)}") from None
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"not a valid DOCX: broken XML ({_short(exc)})") from None
    outline = _Outline()
    first_title: str | None = None
    for block in _docx_blocks(document):
        if hasattr(block, "rows"):
            if options.tables:
                outline.table(_docx_table_section(block, outline.last_line(), options.table_style))
            else:
                for line in _docx_table_lines(block):
                    outline.line(line)
            continue
        text = block.text
        style = _docx_style_name(block)
        heading = _DOCX_HEADING.match(style)
        if style == "Title":
            first_title = first_title or _one_line(text) or None
            outline.heading(0, text)
        elif heading is not None and int(heading.group(1)) > 0:
            outline.heading(int(heading.group(1)), text)
        else:
            outline.line(text)
    title = _one_line(document.core_properties.title or "") or first_title
    return _document(outline.finish(), title, None)


# --- Markdown --------------------------------------------------------------------------------

_MD_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_MD_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
_MD_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_MD_NOT_PARAGRAPH = re.compile(r" {0,3}(?:[>|]|[-*+][ \t]|\d{1,9}[.)][ \t])| {4,}|\t")
_FRONT_MATTER_TITLE = re.compile(r"title:[ \t]*(.+)", re.I)


def _md_front_matter(lines: list[str]) -> tuple[int, str | None]:
    """(lines to skip, title) for a leading YAML front matter block."""
    if not lines or lines[0].strip() != "---":
        return 0, None
    for end in range(1, min(len(lines), 200)):
        if lines[end].strip() in ("---", "..."):
            title = None
            for line in lines[1:end]:
                match = _FRONT_MATTER_TITLE.fullmatch(line.strip())
                if match:
                    title = match.group(1).strip().strip("\"'").strip() or None
            return end + 1, title
    return 0, None


def parse_markdown(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """ATX ("## Scope") and setext (underlined) headings start sections; code fences are
    skipped for headings; the text is kept as written. The title comes from front matter."""
    lines = clean_text(decode_text(_read_bytes(path))).split("\n")
    start, title = _md_front_matter(lines)
    outline = _Outline()
    fence: str | None = None
    i = start
    while i < len(lines):
        line = lines[i]
        if fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                fence = None
            outline.line(line)
        elif (match := _MD_FENCE.match(line)) is not None:
            fence = match.group(1)
            outline.line(line)
        elif (match := _MD_ATX.fullmatch(line)) is not None and match.group(2):
            outline.heading(len(match.group(1)), match.group(2), raw=line)
        elif (
            i + 1 < len(lines)
            and line.strip()
            and not _MD_NOT_PARAGRAPH.match(line)
            and not _MD_SETEXT.fullmatch(line)
            and (underline := _MD_SETEXT.fullmatch(lines[i + 1])) is not None
        ):
            level = 1 if underline.group(1).startswith("=") else 2
            outline.heading(level, line, raw=f"{line}\n{lines[i + 1]}")
            i += 1
        else:
            outline.line(line)
        i += 1
    return _document(outline.finish(), title, None)


# --- plain text ------------------------------------------------------------------------------

_TXT_UNDERLINE = re.compile(r"[ \t]*(={3,}|-{3,})[ \t]*")
_TXT_NUMBERED = re.compile(r"(\d{1,3}(?:\.\d{1,3})*)\.?[ \t]+([A-Z][^\n]*)")
_TXT_LIST_ITEM = re.compile(r"[ \t]*(?:\d{1,3}[.)]|[-*+•])[ \t]")
_TXT_MAX_HEADING = 80


def _txt_heading_level(lines: list[str], i: int) -> int | None:
    """The level of ``lines[i]`` if it reads as a heading, else None.

    A heading is short (at most 80 characters), has a blank line (or the file's edge) before
    or after it, and is either ALL CAPS with at least three letters (level 1) or numbered like
    "2. Scope" / "2.3 Retention" (level = how many numbers), without a final period and not
    next to another list item.
    """
    line = lines[i].strip()
    if not line or len(line) > _TXT_MAX_HEADING:
        return None
    before = lines[i - 1].strip() if i > 0 else ""
    after = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if before and after:
        return None
    numbered = _TXT_NUMBERED.fullmatch(line)
    if numbered is not None:
        if line.endswith((".", ",", ";", ":")) or len(line.split()) > 12:
            return None
        neighbours = (lines[i - 1] if i > 0 else "", lines[i + 1] if i + 1 < len(lines) else "")
        if any(_TXT_LIST_ITEM.match(n) for n in neighbours):
            return None
        return numbered.group(1).count(".") + 1
    letters = [c for c in line if c.isalpha()]
    if len(letters) >= 3 and all(c.isupper() for c in letters):
        return 1
    return None


def parse_text(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """Plain text; underlined, ALL CAPS and numbered lines start sections (see
    :func:`_txt_heading_level`)."""
    lines = clean_text(decode_text(_read_bytes(path))).split("\n")
    outline = _Outline()
    i = 0
    while i < len(lines):
        line = lines[i]
        if (
            i + 1 < len(lines)
            and line.strip()
            and len(line.strip()) <= _TXT_MAX_HEADING
            and not _TXT_UNDERLINE.fullmatch(line)
            and (underline := _TXT_UNDERLINE.fullmatch(lines[i + 1])) is not None
        ):
            outline.heading(
                1 if underline.group(1).startswith("=") else 2, line, raw=f"{line}\n{lines[i + 1]}"
            )
            i += 2
            continue
        numbered_or_caps = _txt_heading_level(lines, i)
        if numbered_or_caps is not None:
            outline.heading(numbered_or_caps, line, raw=line)
        else:
            outline.line(line)
        i += 1
    return _document(outline.finish(), None, None)


# --- HTML ------------------------------------------------------------------------------------

_HTML_DROP = ("script", "style", "noscript", "template", "iframe", "svg", "head", "object")
_HTML_CHROME = ("nav", "aside", "footer", "header")
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_HTML_BLOCKS = frozenset(
    {
        *_HTML_HEADINGS,
        *("address", "article", "aside", "blockquote", "body", "caption", "dd", "details"),
        *("dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form"),
        *("header", "hr", "legend", "li", "main", "nav", "ol", "p", "section", "summary"),
        *("table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul", "html"),
    }
)


def _html_container(soup: Any) -> Tag:
    """<main> (or role=main), else a lone <article>, else <body> without the site chrome."""
    main = soup.find("main") or soup.find(attrs={"role": "main"})
    if main is not None:
        return main
    articles = soup.find_all("article")
    if len(articles) == 1:
        return articles[0]
    body = soup.body or soup
    for tag in body.find_all(_HTML_CHROME):
        if not tag.decomposed:
            tag.decompose()
    return body


def _html_table_section(table: Tag, before: str, style: TableStyle) -> Section | None:
    """A <table> as rows under its column headers: the rows of <thead>, else the leading rows
    made only of <th>, name the columns; <caption> (or the line before) is the caption. A
    cell with colspan is repeated in each column it spans."""
    rows = [tr for tr in table.find_all("tr") if tr.find_parent("table") is table]
    grid: list[list[str]] = []
    header_rows = 0
    for tr in rows:
        cells: list[str] = []
        only_th = True
        for cell in tr.find_all(("td", "th"), recursive=False):
            only_th = only_th and cell.name == "th"
            try:
                span = max(1, min(int(str(cell.get("colspan") or 1)), 50))
            except ValueError:
                span = 1
            cells.extend([_one_line(cell.get_text(" "))] * span)
        in_head = tr.find_parent("thead") is not None and tr.find_parent("table") is table
        if (in_head or only_th) and header_rows == len(grid) and cells:
            header_rows += 1
        grid.append(cells)
    caption_tag = table.find("caption")
    caption = _one_line(caption_tag.get_text(" ")) if caption_tag is not None else ""
    return grid_table(grid, caption or _caption(before), header_rows=header_rows, style=style)


def _html_walk(
    root: Tag, outline: _Outline, *, tables: bool = True, style: TableStyle = "labelled"
) -> None:
    """Feed ``root``'s text to ``outline``: a line per block element, a " | " line per table
    row, <pre> kept as is, whitespace elsewhere collapsed. Iterative: deep nesting is fine."""
    from bs4 import NavigableString, Tag
    from bs4.element import PreformattedString

    words: list[str] = []

    def end_line() -> None:
        text = _one_line("".join(words))
        words.clear()
        if text:
            outline.line(text)

    pending: list[tuple[Any, bool]] = [(root, False)]
    while pending:
        node, leaving = pending.pop()
        if leaving:
            end_line()
            continue
        if isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString):  # comments, doctypes, CDATA
                words.append(str(node))
            continue
        if not isinstance(node, Tag):
            continue
        name = node.name
        if name in _HTML_HEADINGS:
            end_line()
            outline.heading(int(name[1]), node.get_text(" "))
        elif name == "table" and tables:
            end_line()
            outline.table(_html_table_section(node, outline.last_line(), style))
        elif name == "tr":
            end_line()
            cells = [
                _one_line(c.get_text(" ")) for c in node.find_all(("td", "th"), recursive=False)
            ]
            if any(cells):
                outline.line(" | ".join(cells))
        elif name == "pre":
            end_line()
            outline.line(node.get_text())
        elif name == "br":
            end_line()
        else:
            if name in _HTML_BLOCKS:
                end_line()
                pending.append((node, True))
            pending.extend((child, False) for child in reversed(node.contents))
    end_line()


def parse_html(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """The main content's text (<main>/<article>, else <body> without nav/aside/header/footer),
    h1..h6 start sections; the title comes from <title>."""
    data = _read_bytes(path)
    if _unicode_bom(data) is None:
        _reject_binary(data)
    import bs4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bs4.XMLParsedAsHTMLWarning)
        warnings.simplefilter("ignore", bs4.MarkupResemblesLocatorWarning)
        soup = bs4.BeautifulSoup(data, "lxml")
    title_tag = soup.find("title")
    title = _one_line(title_tag.get_text()) if title_tag is not None else ""
    for tag in soup.find_all(_HTML_DROP):
        if not tag.decomposed:
            tag.decompose()
    for tag in soup.find_all(hidden=True):
        if not tag.decomposed:
            tag.decompose()
    outline = _Outline()
    _html_walk(_html_container(soup), outline, tables=options.tables, style=options.table_style)
    return _document(outline.finish(), title or None, None)


# --- images ----------------------------------------------------------------------------------


def parse_image(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """An image read by OCR; a multi-page TIFF gives a section per page (``page`` is 1-based
    either way). Each section records the OCR confidence."""
    _file_size(path)
    if not options.ocr.enabled:
        raise ParseError("an image file needs OCR, which is off (setting ocr.engine)")
    engine = open_engine(options.ocr)
    sections: list[Section] = []
    frames = 0
    for number, frames, image in image_frames(path):
        if number > options.ocr.max_pages:
            raise ParseError(
                f"scan too long: more than {options.ocr.max_pages} pages to OCR "
                f"(setting ocr.max_pages)"
            )
        result = engine.recognise(image)
        if options.progress is not None:
            options.progress(number, frames)
        text = clean_text(result.text)
        if text.strip():
            sections.append(Section(text=text, page=number, ocr_confidence=result.confidence))
    if not sections:
        raise ParseError("no text recognised in the image (OCR found none)")
    return ParsedDocument(sections=sections, title=None, pages=frames)


register_parser(".pdf", parse_pdf)
register_parser(".docx", parse_docx)
register_parser((".md", ".markdown"), parse_markdown)
register_parser((".txt", ".text"), parse_text)
register_parser((".html", ".htm"), parse_html)
register_parser((".png", ".jpg", ".jpeg", ".tif", ".tiff"), parse_image)
