"""Generators for real test documents, written into a test's tmp_path (nothing checked in)."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

PDF_PAGES = (
    ("Chapter 1: Scope", "This policy covers customer records held on site."),
    ("Chapter 2: Retention", "Invoices are kept for seven years after the fiscal year ends."),
    ("Chapter 3: Disposal", "Paper records are shredded; disks are degaussed before disposal."),
)


def make_pdf(
    path: Path,
    pages: Sequence[tuple[str, str]] = PDF_PAGES,
    *,
    title: str | None = "Records Retention Policy",
    encrypt: str | None = None,
    outline: bool = False,
) -> Path:
    """A PDF with one page per ``(heading, body)``: a bold heading line and a body line.
    ``outline`` adds a bookmark per page named after its heading."""
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), encrypt=encrypt, invariant=1)
    if title is not None:
        pdf.setTitle(title)
    for number, (heading, body) in enumerate(pages):
        if outline:
            key = f"page{number}"
            pdf.bookmarkPage(key)
            pdf.addOutlineEntry(heading, key, level=0)
        pdf.setFont("Helvetica-Bold", 16)
        pdf.drawString(72, 720, heading)
        pdf.setFont("Helvetica", 11)
        pdf.drawString(72, 690, body)
        pdf.showPage()
    pdf.save()
    return path


def make_blank_pdf(path: Path, n_pages: int = 2) -> Path:
    """A PDF whose pages hold only drawings (what a scan looks like to a text extractor)."""
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path))
    for _ in range(n_pages):
        pdf.rect(72, 72, 300, 400, fill=1)
        pdf.showPage()
    pdf.save()
    return path


def make_docx(path: Path, *, core_title: str | None = "Records Policy (v2)") -> Path:
    """Title, Heading 1/2 paragraphs, body paragraphs and a table between two paragraphs."""
    import docx

    document = docx.Document()
    if core_title is not None:
        document.core_properties.title = core_title
    document.add_heading("Records Policy", level=0)
    document.add_paragraph("How the company keeps and disposes of records.")
    document.add_heading("Policy", level=1)
    document.add_paragraph("All departments follow this policy.")
    document.add_heading("Retention", level=2)
    document.add_paragraph("Records are kept as the table shows.")
    table = document.add_table(rows=3, cols=2)
    for row, (kind, years) in zip(
        table.rows, [("Record", "Years"), ("Invoices", "7"), ("Emails", "2")], strict=True
    ):
        row.cells[0].text = kind
        row.cells[1].text = years
    document.add_paragraph("Exceptions need written approval.")
    document.add_heading("Disposal", level=2)
    document.add_paragraph("Shred paper records.")
    document.add_heading("Appendix", level=1)
    document.add_paragraph("Contacts for questions.")
    document.save(str(path))
    return path


HTML_PAGE = """<!DOCTYPE html>
<html>
<head>
  <title>Records Policy | Example Corp</title>
  <style>body { color: red; } .secret-style { display: none }</style>
  <script>var trackingSecret = "script text must not appear";</script>
</head>
<body>
  <header><a href="/">Example Corp home</a></header>
  <nav><ul><li>Navigation link one</li><li>Navigation link two</li></ul></nav>
  <main>
    <h1>Records Policy</h1>
    <p>How the company   keeps
       records.</p>
    <h2>Retention</h2>
    <p>Invoices are kept for <b>seven</b> years.</p>
    <table>
      <tr><th>Record</th><th>Years</th></tr>
      <tr><td>Invoices</td><td>7</td></tr>
    </table>
    <!-- a comment that must not appear -->
    <noscript>Enable JavaScript to see this</noscript>
    <h2>Disposal</h2>
    <p>Shred paper records.<br>Degauss disks.</p>
    <script>document.write("inline script in main")</script>
  </main>
  <aside>Related: sidebar text</aside>
  <footer>Copyright footer text</footer>
</body>
</html>
"""


def make_html(path: Path, html: str = HTML_PAGE) -> Path:
    path.write_text(html, encoding="utf-8")
    return path


def make_zip_bomb(path: Path, *, member_mb: int, member: str = "word/document.xml") -> Path:
    """A zip with one member of ``member_mb`` MB of zeros, streamed so it never sits in memory;
    on disk it is a few hundred KB to a few MB."""
    chunk = bytes(1 << 20)
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open(member, "w", force_zip64=True) as out,
    ):
        for _ in range(member_mb):
            out.write(chunk)
    return path


def make_large_text(path: Path, mb: int) -> Path:
    """``mb`` MB of plain ASCII prose (a real text file, not sparse zeros)."""
    line = b"The quick brown fox jumps over the lazy dog near the records office.\n"
    block = line * ((1 << 20) // len(line) + 1)
    with path.open("wb") as out:
        for _ in range(mb):
            out.write(block[: 1 << 20])
    return path


# --- scans and tables (OCR and table tests) --------------------------------------------------

SCAN_LINES = (
    "Clinical Study Protocol",
    "The study enrolls 120 participants aged 18 to 65 years.",
    "Participants receive 50 mg of the study drug twice daily for 12 weeks.",
    "The primary endpoint is the change in systolic blood pressure at week 12.",
    "Adverse events are recorded at every visit and reported within 24 hours.",
    "Blood samples are stored at minus 80 degrees Celsius for five years.",
)


def render_text_page(lines: Sequence[str], dpi: int = 200) -> object:
    """A letter page of 12 pt Helvetica lines as a grayscale PIL image, as a scanner at
    ``dpi`` would give it."""
    import io

    import pypdfium2 as pdfium
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, invariant=1)
    y = 720
    for line in lines:
        pdf.setFont("Helvetica", 12)
        pdf.drawString(72, y, line)
        y -= 20
    pdf.save()
    document = pdfium.PdfDocument(buffer.getvalue())
    try:
        return document[0].render(scale=dpi / 72).to_pil().convert("L")
    finally:
        document.close()


def make_scanned_pdf(
    path: Path, pages: Sequence[Sequence[str]] = (SCAN_LINES,), dpi: int = 200
) -> Path:
    """An image-only PDF: each page a picture of text, with no text layer."""
    images = [render_text_page(lines, dpi) for lines in pages]
    first, *rest = images
    first.save(path, format="PDF", resolution=dpi, save_all=True, append_images=rest)  # type: ignore[attr-defined]
    return path


def make_image(path: Path, pages: Sequence[Sequence[str]] = (SCAN_LINES,)) -> Path:
    """A PNG or JPEG (one page) or a TIFF (one frame per page) of rendered text."""
    images = [render_text_page(lines) for lines in pages]
    first, *rest = images
    if rest:
        first.save(path, save_all=True, append_images=rest, compression="tiff_deflate")  # type: ignore[attr-defined]
    else:
        first.save(path)  # type: ignore[attr-defined]
    return path


# A quarterly statement laid out as filings do: caption, units, a spanning column header over
# dated columns, group labels and right-aligned figures.
TABLE_ROWS = (
    ("Net sales:", None, None, 0),
    ("Products", "60,584", "63,355", 8),
    ("Services", "21,213", "19,604", 8),
    ("Total net sales", "81,797", "82,959", 16),
    ("Operating income", "22,998", "23,076", 0),
)


def make_table_pdf(
    path: Path, rows: Sequence[tuple[str, str | None, str | None, int]] = TABLE_ROWS
) -> Path:
    """A page of prose, then a statement table like a 10-Q's, then more prose."""
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), invariant=1)
    pdf.setFont("Helvetica", 10)
    pdf.drawString(72, 740, "The following table shows the results of operations for the quarter.")
    pdf.drawCentredString(306, 710, "CONDENSED CONSOLIDATED STATEMENTS OF OPERATIONS (Unaudited)")
    pdf.drawCentredString(306, 698, "(In millions)")
    pdf.drawCentredString(400, 676, "Three Months Ended")
    pdf.drawRightString(380, 664, "July 1, 2023")
    pdf.drawRightString(460, 664, "June 25, 2022")
    y = 648
    for label, now, before, indent in rows:
        pdf.drawString(72 + indent, y, label)
        if now is not None:
            pdf.drawRightString(380, y, now)
        if before is not None:
            pdf.drawRightString(460, y, before)
        y -= 14
    pdf.drawString(72, y - 20, "Net sales fell in the quarter, mainly because of lower Mac sales.")
    pdf.showPage()
    pdf.save()
    return path
