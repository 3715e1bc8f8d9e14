"""The parser registry and each format's parser, on real generated files."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from appliance.core.errors import ParseError
from appliance.core.protocols import ParsedDocument, Section
from ingest import parsers
from ingest.ocr import OcrOptions
from ingest.parsers import (
    DEFAULT_OPTIONS,
    ParseOptions,
    parse_file,
    parser_for,
    pdf_title,
    register_parser,
    supported_suffixes,
)
from tests.ingest.fixtures import (
    PDF_PAGES,
    make_blank_pdf,
    make_docx,
    make_html,
    make_pdf,
    make_zip_bomb,
)

NO_TABLES = ParseOptions(tables=False)  # tables as plain " | " lines, as before tables were kept


def text_of(doc: ParsedDocument) -> str:
    return "\n\n".join(s.text for s in doc.sections)


def by_heading(doc: ParsedDocument) -> dict[str | None, str]:
    return {s.heading: s.text for s in doc.sections}


# --- the registry ----------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are undone afterwards."""
    monkeypatch.setattr(parsers, "_PARSERS", dict(parsers._PARSERS))


def fake_parser(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    return ParsedDocument(sections=[Section(text=path.read_text())])


def test_builtin_suffixes() -> None:
    assert supported_suffixes() == {
        ".pdf",
        ".docx",
        ".md",
        ".markdown",
        ".txt",
        ".text",
        ".html",
        ".htm",
        ".png",
        ".jpg",
        ".jpeg",
        ".tif",
        ".tiff",
    }


@pytest.mark.usefixtures("registry")
def test_register_and_pick_by_suffix_case_insensitively(tmp_path: Path) -> None:
    register_parser([".csv", ".TSV"], fake_parser)
    (tmp_path / "a.CSV").write_text("x,y")
    assert parser_for(tmp_path / "a.CSV") is fake_parser
    assert parser_for(Path("b.tsv")) is fake_parser
    assert parse_file(tmp_path / "a.CSV").sections[0].text == "x,y"
    assert {".csv", ".tsv"} <= supported_suffixes()


@pytest.mark.usefixtures("registry")
def test_duplicate_registration_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"'\.pdf' already has a parser \(ingest\.parsers\.parse_pdf"
    ):
        register_parser(".pdf", fake_parser)
    with pytest.raises(ValueError, match="already has a parser"):
        register_parser(".PDF", fake_parser)
    with pytest.raises(ValueError, match="already has a parser"):
        register_parser([".new", ".new"], fake_parser)
    # A rejected call registers nothing, not even its valid suffixes.
    with pytest.raises(ValueError, match="already has a parser"):
        register_parser([".fresh", ".txt"], fake_parser)
    assert ".fresh" not in supported_suffixes()
    assert ".new" not in supported_suffixes()


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("bad", ["pdf", ".", ".tar.gz", ". x", "", ".a/b"])
def test_malformed_suffix_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"like '\.pdf'"):
        register_parser(bad, fake_parser)


def test_register_needs_a_suffix() -> None:
    with pytest.raises(ValueError, match="at least one suffix"):
        register_parser([], fake_parser)


def test_unknown_suffix_lists_the_known_ones() -> None:
    with pytest.raises(ParseError, match=r"no parser for files ending in '\.xlsx'") as info:
        parser_for(Path("budget.xlsx"))
    assert ".docx, .htm, .html, .jpeg, .jpg, .markdown, .md, .pdf, .png" in info.value.reason
    with pytest.raises(ParseError, match=r"files without a suffix; supported: \.docx"):
        parser_for(Path("README"))


# --- PDF -------------------------------------------------------------------------------------


def test_pdf_one_section_per_page_with_title(tmp_path: Path) -> None:
    doc = parse_file(make_pdf(tmp_path / "policy.pdf"))
    assert doc.pages == 3
    assert doc.title == "Records Retention Policy"
    assert [s.page for s in doc.sections] == [1, 2, 3]
    for section, (heading, body) in zip(doc.sections, PDF_PAGES, strict=True):
        assert section.text == f"{heading}\n{body}"
        assert section.heading is None
    assert "\r" not in text_of(doc)


def test_pdf_headings_from_bookmarks(tmp_path: Path) -> None:
    doc = parse_file(make_pdf(tmp_path / "outlined.pdf", outline=True))
    assert [s.heading for s in doc.sections] == [h for h, _ in PDF_PAGES]


def test_pdf_blank_pages_are_skipped_but_counted(tmp_path: Path) -> None:
    pages = [("Cover", "Intro text."), ("", ""), ("Last", "Closing text.")]
    doc = parse_file(make_pdf(tmp_path / "gap.pdf", pages))
    assert doc.pages == 3
    assert [s.page for s in doc.sections] == [1, 3]


def test_pdf_without_text_and_without_ocr_says_so(tmp_path: Path) -> None:
    off = ParseOptions(ocr=OcrOptions(engine="off"))
    with pytest.raises(ParseError, match=r"no extractable text \(scanned PDF\?\) and no OCR"):
        parse_file(make_blank_pdf(tmp_path / "scan.pdf"), off)


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="Tesseract is not installed")
def test_pdf_of_drawings_only_has_no_text_even_by_ocr(tmp_path: Path) -> None:
    with pytest.raises(ParseError, match=r"^no extractable text, not even by OCR$"):
        parse_file(make_blank_pdf(tmp_path / "scan.pdf"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Records Retention Policy", "Records Retention Policy"),
        (
            "Form 10-Q for Microsoft Corp filed 10/24/2022",
            "Form 10-Q for Microsoft Corp filed 10/24/2022",
        ),
        ("  Annual\n report  ", "Annual report"),
        ("0000320193-22-000070", None),  # an SEC accession number
        ("aapl-20220625", None),
        ("DOC-2023-0042", None),
        ("Microsoft Word - memo.docx", None),
        ("Untitled", None),
        ("A1", None),
        ("", None),
        (None, None),
    ],
)
def test_pdf_title_must_look_like_a_title(raw: str | None, expected: str | None) -> None:
    assert pdf_title(raw) == expected


def test_pdf_code_like_title_is_dropped(tmp_path: Path) -> None:
    doc = parse_file(make_pdf(tmp_path / "sec.pdf", title="0000320193-22-000070"))
    assert doc.title is None


# --- DOCX ------------------------------------------------------------------------------------


def test_docx_heading_paths_and_table_in_order(tmp_path: Path) -> None:
    doc = parse_file(make_docx(tmp_path / "policy.docx"), NO_TABLES)
    assert doc.title == "Records Policy (v2)"
    assert doc.pages is None
    assert [s.heading for s in doc.sections] == [
        "Records Policy",
        "Policy",
        "Policy > Retention",
        "Policy > Disposal",
        "Appendix",
    ]
    sections = by_heading(doc)
    assert sections["Records Policy"] == (
        "Records Policy\nHow the company keeps and disposes of records."
    )
    assert sections["Policy > Retention"] == (
        "Retention\n"
        "Records are kept as the table shows.\n"
        "Record | Years\n"
        "Invoices | 7\n"
        "Emails | 2\n"
        "Exceptions need written approval."
    )
    assert sections["Appendix"] == "Appendix\nContacts for questions."


def test_docx_title_falls_back_to_the_title_paragraph(tmp_path: Path) -> None:
    doc = parse_file(make_docx(tmp_path / "untitled.docx", core_title=None))
    assert doc.title == "Records Policy"


def test_docx_merged_cells_count_once(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    table = document.add_table(rows=2, cols=3)
    merged = table.cell(0, 0).merge(table.cell(0, 1))
    merged.text = "Region"
    table.cell(0, 2).text = "Total"
    for col, value in enumerate(["North", "South", "12"]):
        table.cell(1, col).text = value
    document.save(str(tmp_path / "merged.docx"))
    doc = parse_file(tmp_path / "merged.docx", NO_TABLES)
    assert text_of(doc) == "Region | Total\nNorth | South | 12"


def test_docx_zip_bomb_by_size(docx_bomb: Path) -> None:
    with pytest.raises(ParseError, match=r"^DOCX zip bomb: 600 MB uncompressed$"):
        parse_file(docx_bomb)


def test_docx_zip_bomb_by_ratio(tmp_path: Path) -> None:
    bomb = make_zip_bomb(tmp_path / "ratio.docx", member_mb=20)
    with pytest.raises(
        ParseError, match=r"DOCX zip bomb: 'word/document.xml' expands \d+:1 to 20 MB"
    ):
        parse_file(bomb)


def test_docx_that_is_a_zip_but_not_a_docx(tmp_path: Path) -> None:
    path = tmp_path / "other.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "not a word document")
    with pytest.raises(ParseError, match=r"^not a valid DOCX: "):
        parse_file(path)


@pytest.fixture(scope="module")
def docx_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.docx", member_mb=600)


# --- Markdown --------------------------------------------------------------------------------

MARKDOWN = """\
---
title: "Operations Handbook"
owner: ops
---
Preamble before any heading.

# Handbook

Intro paragraph.

## Backups
Nightly at 02:00.

```bash
# not a heading: a shell comment
echo done
```

Setext Section
--------------

Under the setext heading.

Another Top
===========

### Deep #

Deep text.
"""


def test_markdown_heading_paths_front_matter_and_fences(tmp_path: Path) -> None:
    path = tmp_path / "handbook.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    doc = parse_file(path)
    assert doc.title == "Operations Handbook"
    assert [s.heading for s in doc.sections] == [
        None,
        "Handbook",
        "Handbook > Backups",
        "Handbook > Setext Section",
        "Another Top",
        "Another Top > Deep",
    ]
    sections = by_heading(doc)
    assert sections[None] == "Preamble before any heading."
    assert "# not a heading: a shell comment" in sections["Handbook > Backups"]
    assert sections["Handbook > Backups"].startswith("## Backups\nNightly at 02:00.")
    assert sections["Handbook > Setext Section"] == (
        "Setext Section\n--------------\n\nUnder the setext heading."
    )
    assert "title:" not in text_of(doc)


def test_markdown_thematic_break_and_list_are_not_headings(tmp_path: Path) -> None:
    path = tmp_path / "notes.markdown"
    path.write_text("Some text.\n\n---\n\n- item one\n---\n\n#hashtag is not a heading\n")
    doc = parse_file(path)
    assert [s.heading for s in doc.sections] == [None]


# --- plain text ------------------------------------------------------------------------------

PLAIN = """\
RECORDS POLICY

This document describes how records are kept.
It has several parts.

1. Introduction
Why we keep records.

1.1 Scope

Applies to all staff.

Steps to follow:

1. Collect the files
2. Label the boxes

Retention Rules
===============
Seven years for invoices.
KEEP THE ORIGINALS
in the archive room.



Questions go to the records office.
"""


def test_text_heading_heuristics(tmp_path: Path) -> None:
    path = tmp_path / "policy.txt"
    path.write_text(PLAIN, encoding="utf-8")
    doc = parse_file(path)
    assert doc.title is None
    assert [s.heading for s in doc.sections] == [
        "RECORDS POLICY",
        "1. Introduction",
        "1. Introduction > 1.1 Scope",
        "Retention Rules",
    ]
    sections = by_heading(doc)
    # Numbered list items are not headings; they stay in the Scope section.
    assert "1. Collect the files\n2. Label the boxes" in sections["1. Introduction > 1.1 Scope"]
    # Three blank lines become two; an ALL CAPS word inside a paragraph is not a heading.
    assert sections["Retention Rules"] == (
        "Retention Rules\n===============\nSeven years for invoices.\nKEEP THE ORIGINALS\n"
        "in the archive room.\n\n\nQuestions go to the records office."
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("Café déjà vu".encode("utf-8-sig"), "Café déjà vu"),
        ("Café “quoted” \u2013 dash".encode("cp1252"), "Café “quoted” \u2013 dash"),
        ("Grüße".encode("utf-16"), "Grüße"),
        (b"windows\r\nline\r\nends\r\n", "windows\nline\nends"),
        (b"\xe9t\xe9 \x81", "été \x81"),  # not cp1252 either: latin-1
    ],
)
def test_text_decoding(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "note.txt"
    path.write_bytes(data)
    assert text_of(parse_file(path)) == expected


# --- HTML ------------------------------------------------------------------------------------


def test_html_main_content_with_heading_paths(tmp_path: Path) -> None:
    doc = parse_file(make_html(tmp_path / "policy.html"), NO_TABLES)
    assert doc.title == "Records Policy | Example Corp"
    assert [s.heading for s in doc.sections] == [
        "Records Policy",
        "Records Policy > Retention",
        "Records Policy > Disposal",
    ]
    sections = by_heading(doc)
    assert sections["Records Policy"] == "Records Policy\nHow the company keeps records."
    assert sections["Records Policy > Retention"] == (
        "Retention\nInvoices are kept for seven years.\nRecord | Years\nInvoices | 7"
    )
    assert sections["Records Policy > Disposal"] == "Disposal\nShred paper records.\nDegauss disks."
    text = text_of(doc)
    for absent in ("script", "color", "Navigation", "sidebar", "footer", "comment", "home", "Java"):
        assert absent not in text


def test_html_without_main_drops_site_chrome(tmp_path: Path) -> None:
    page = (
        "<html><head><title>Plain</title></head><body>"
        "<header>Site header</header><nav>Menu</nav>"
        "<div><h3>Only</h3><p>Body text.</p><div hidden>Hidden text</div></div>"
        "<footer>Footer</footer></body></html>"
    )
    doc = parse_file(make_html(tmp_path / "plain.htm", page))
    assert doc.sections == [Section(text="Only\nBody text.", heading="Only")]
    assert doc.title == "Plain"


def test_html_deep_nesting_does_not_recurse(tmp_path: Path) -> None:
    page = "<html><body>" + "<span>" * 5000 + "deep text" + "</span>" * 5000 + "</body></html>"
    doc = parse_file(make_html(tmp_path / "deep.html", page))
    assert text_of(doc) == "deep text"


# --- hostile and odd files -------------------------------------------------------------------


def test_corrupt_pdf(tmp_path: Path) -> None:
    path = tmp_path / "random.pdf"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(ParseError, match=r"^not a valid PDF: damaged, truncated or not a PDF"):
        parse_file(path)


def test_truncated_pdf(tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "whole.pdf").read_bytes()
    path = tmp_path / "half.pdf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParseError, match=r"^not a valid PDF: damaged, truncated"):
        parse_file(path)


def test_encrypted_pdf(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "locked.pdf", encrypt="secret")
    with pytest.raises(ParseError, match=r"^encrypted PDF \(password required\)$"):
        parse_file(path)


@pytest.mark.parametrize("suffix", [".txt", ".md", ".html"])
def test_binary_content_in_a_text_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(4096))
    with pytest.raises(ParseError, match=r"^binary content, not text$"):
        parse_file(path)


def test_control_characters_without_nul_are_binary(tmp_path: Path) -> None:
    path = tmp_path / "control.txt"
    path.write_bytes(bytes(range(1, 9)) * 100 + b"some text")
    with pytest.raises(ParseError, match="binary content"):
        parse_file(path)


def test_binary_docx(tmp_path: Path) -> None:
    path = tmp_path / "garbage.docx"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ParseError, match=r"^not a valid DOCX \(zip\) file$"):
        parse_file(path)


@pytest.mark.parametrize("suffix", sorted(supported_suffixes()))
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ParseError, match=r"^empty file \(0 bytes\)$"):
        parse_file(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("blank.txt", " \n\n\t \n"),
        ("blank.md", "\n\n"),
        (
            "blank.html",
            "<html><head><title>T</title><script>x()</script></head><body> </body></html>",
        ),
    ],
)
def test_whitespace_only_is_an_empty_document(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ParseError, match=r"^empty document: no extractable text$"):
        parse_file(path)


@pytest.mark.parametrize(
    "name", ["line\nbreak.pdf", "résumé \u2013 2023 ✓.pdf", "  spaced name .pdf"]
)
def test_odd_file_names(tmp_path: Path, name: str) -> None:
    doc = parse_file(make_pdf(tmp_path / name))
    assert doc.pages == 3


def test_odd_names_for_every_format(tmp_path: Path) -> None:
    docx_path = make_docx(tmp_path / "ünïcødé\nname with spaces.docx")
    html_path = make_html(tmp_path / "page \u2603.html")
    assert parse_file(docx_path).title == "Records Policy (v2)"
    assert parse_file(html_path).sections


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParseError, match=r"^cannot read file: "):
        parse_file(tmp_path / "gone.txt")
    with pytest.raises(ParseError, match=r"^cannot read file: "):
        parse_file(tmp_path / "gone.pdf")
