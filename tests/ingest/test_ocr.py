"""OCR of scanned PDF pages and image files with the real engine (Tesseract), on pages the
tests render from known text; the shared scanned protocol is indexed and found."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from appliance.core.errors import ParseError
from appliance.core.offline import OfflineViolation
from ingest.ocr import OcrOptions, character_accuracy
from ingest.parsers import ParseOptions, parse_file
from ingest.retrieval import search
from ingest.sandbox import ParserSandbox, _progress_of
from tests.conftest import SHARED
from tests.ingest.fixtures import SCAN_LINES, make_image, make_pdf, make_scanned_pdf

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None,
    reason="Tesseract is not installed (install.sh --system, or apt-get install tesseract-ocr "
    "tesseract-ocr-eng)",
)
SCANNED_PROTOCOL = (
    SHARED / "eval" / "regulated" / "nih-clinical-trial-protocols" / "NCT06155240_Prot_SAP_000.pdf"
)
TRUTH = "\n".join(SCAN_LINES)


@needs_tesseract
def test_a_scanned_pdf_page_is_read_with_its_page_number_and_confidence(tmp_path: Path) -> None:
    doc = parse_file(make_scanned_pdf(tmp_path / "scan.pdf"))
    assert [s.page for s in doc.sections] == [1]
    section = doc.sections[0]
    assert section.ocr_confidence is not None
    assert 0.8 <= section.ocr_confidence <= 1.0
    assert character_accuracy(TRUTH, section.text) >= 0.95


@needs_tesseract
def test_only_pages_without_a_text_layer_are_ocrd(tmp_path: Path) -> None:
    text_pdf = make_pdf(tmp_path / "text.pdf")
    assert all(s.ocr_confidence is None for s in parse_file(text_pdf).sections)
    # a scan with a text page in front: page numbers stay the PDF's own
    import pypdfium2 as pdfium

    merged = pdfium.PdfDocument.new()
    for source in (text_pdf, make_scanned_pdf(tmp_path / "scan.pdf")):
        part = pdfium.PdfDocument(source)
        merged.import_pages(part)
        part.close()
    merged.save(tmp_path / "mixed.pdf")
    merged.close()
    sections = parse_file(tmp_path / "mixed.pdf").sections
    assert [s.page for s in sections] == [1, 2, 3, 4]
    assert [s.ocr_confidence is not None for s in sections] == [False, False, False, True]
    assert "120 participants" in sections[3].text


@needs_tesseract
@pytest.mark.parametrize("name", ["scan.png", "scan.jpg"])
def test_an_image_file_is_read(tmp_path: Path, name: str) -> None:
    doc = parse_file(make_image(tmp_path / name))
    assert doc.pages == 1
    assert [s.page for s in doc.sections] == [1]
    assert character_accuracy(TRUTH, doc.sections[0].text) >= 0.95
    assert doc.sections[0].ocr_confidence is not None


@needs_tesseract
def test_a_multi_page_tiff_gives_a_section_per_page_and_reports_progress(tmp_path: Path) -> None:
    pages = (("Page one holds the retention rules.",), ("Page two holds the disposal rules.",))
    seen: list[tuple[int, int]] = []
    options = ParseOptions(progress=lambda done, total: seen.append((done, total)))
    doc = parse_file(make_image(tmp_path / "fax.tiff", pages), options)
    assert doc.pages == 2
    assert [s.page for s in doc.sections] == [1, 2]
    assert "retention" in doc.sections[0].text
    assert "disposal" in doc.sections[1].text
    assert seen == [(1, 2), (2, 2)]


@needs_tesseract
def test_ocr_is_offline_and_fits_the_sandbox_limits(tmp_path: Path) -> None:
    # The network guard of conftest is on: reaching out anywhere would fail this test.
    with pytest.raises(OfflineViolation, match="the appliance is offline"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    scan = make_scanned_pdf(tmp_path / "scan.pdf", (SCAN_LINES, SCAN_LINES[:2]))
    with ParserSandbox(timeout_s=60, memory_mb=2048, max_text_chars=1_000_000) as sandbox:
        doc = sandbox.parse(scan)
        assert sandbox.progress() is None  # nothing in hand once the parse is done
    assert [s.page for s in doc.sections] == [1, 2]
    assert all(s.ocr_confidence is not None for s in doc.sections)
    assert character_accuracy(TRUTH, doc.sections[0].text) >= 0.95


def test_progress_lines_are_told_from_replies() -> None:
    assert _progress_of(b'{"progress": [3, 40]}') == (3, 40)
    assert _progress_of(b'{"ok": true, "doc": {}}') is None
    assert _progress_of(None) is None


def test_without_ocr_a_scan_fails_with_the_reason(tmp_path: Path) -> None:
    off = ParseOptions(ocr=OcrOptions(engine="off"))
    with pytest.raises(ParseError, match=r"no extractable text \(scanned PDF\?\) and no OCR"):
        parse_file(make_scanned_pdf(tmp_path / "scan.pdf"), off)
    with pytest.raises(ParseError, match="needs OCR, which is off"):
        parse_file(make_image(tmp_path / "scan.png"), off)


def test_a_missing_tesseract_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-tesseract"))
    with pytest.raises(ParseError, match=r"apt-get install tesseract-ocr tesseract-ocr-eng"):
        parse_file(make_scanned_pdf(tmp_path / "scan.pdf"))


@needs_tesseract
def test_a_missing_language_pack_is_named(tmp_path: Path) -> None:
    options = ParseOptions(ocr=OcrOptions(languages=("eng", "zzz")))
    with pytest.raises(ParseError, match=r"language pack\(s\) zzz not installed"):
        parse_file(make_image(tmp_path / "scan.png"), options)


def test_character_accuracy() -> None:
    assert character_accuracy("abc  def", "abc def") == 1.0
    assert character_accuracy("abcdefghij", "abcdefghiX") == pytest.approx(0.9)
    assert character_accuracy("abc", "") == 0.0


@needs_tesseract
def test_the_scanned_protocol_is_indexed_and_found(tmp_path: Path, make_indexer) -> None:  # type: ignore[no-untyped-def]
    if not SCANNED_PROTOCOL.is_file():
        pytest.skip(f"the shared corpus is absent ({SCANNED_PROTOCOL})")
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(
        SCANNED_PROTOCOL, docs / SCANNED_PROTOCOL.name
    )  # links leaving the folder are refused
    make_pdf(docs / "retention.pdf")
    indexer = make_indexer(docs)
    report = indexer.reconcile()
    assert report.failed == 0, report.failures
    hits = search(indexer, "Which yoga breathing practice is taught in week 1 of the protocol?")
    assert hits[0]["path"] == SCANNED_PROTOCOL.name
    assert hits[0]["ocr_confidence"] is not None


@needs_tesseract
def test_status_shows_pages_done_while_a_scan_is_read(tmp_path: Path, make_indexer) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs"
    docs.mkdir()
    make_scanned_pdf(docs / "long scan.pdf", (SCAN_LINES, SCAN_LINES, SCAN_LINES))
    indexer = make_indexer(docs)
    seen: list[dict[str, object]] = []
    worker = threading.Thread(target=indexer.reconcile)
    worker.start()
    while worker.is_alive():
        parsing = indexer.status()["parsing"]
        if parsing is not None and parsing not in seen:
            seen.append(parsing)
        time.sleep(0.05)
    worker.join()
    assert seen, "no progress was reported while three pages were OCR'd"
    assert all(p["path"] == "long scan.pdf" and p["pages"] == 3 for p in seen)
    assert {p["pages_done"] for p in seen} <= {1, 2, 3}
    assert indexer.status()["parsing"] is None
    assert indexer.status()["documents"] == 1


def test_a_state_from_before_ocr_gets_the_confidence_column(tmp_path: Path) -> None:
    import sqlite3

    from ingest.state import IngestState

    path = tmp_path / "ingest.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE chunks (collection TEXT NOT NULL, point_id TEXT NOT NULL, "
        "path TEXT NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, "
        "text_key TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "
        "end_ INTEGER NOT NULL, page INTEGER, heading TEXT, PRIMARY KEY (collection, point_id))"
    )
    old.execute(
        "INSERT INTO chunks VALUES ('c', 'p1', 'a.pdf', 'h', 0, 'live', 'k', 't', 0, 1, 1, NULL)"
    )
    old.commit()
    old.close()
    state = IngestState(path)
    try:
        (row,) = state.live_chunks_of_path("c", "a.pdf")
        assert row.chunk.ocr_confidence is None
    finally:
        state.close()
