"""Tables kept as tables: each row with its column headers, caption and units, in PDF (from
pdfium's character positions), DOCX and HTML; the chunker never splits a row and repeats the
header in every chunk of a table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from appliance.core.protocols import Section
from ingest.chunking import chunk_sections, extracted_text
from ingest.parsers import DEFAULT_OPTIONS, ParseOptions, parse_file
from ingest.pdf_tables import looks_tabular
from ingest.retrieval import retrieve, search
from ingest.tables import grid_table, row_line
from tests.ingest.fixtures import make_pdf, make_table_pdf

TOTAL_ROW = (
    "Net sales: Total net sales | Three Months Ended July 1, 2023: 81,797 | "
    "June 25, 2022: 82,959 (in millions)"
)


def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


def tables_of(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> list[Section]:
    return [s for s in parse_file(path, options).sections if s.header is not None]


# --- PDF -------------------------------------------------------------------------------------


def test_pdf_rows_keep_headers_caption_and_units(tmp_path: Path) -> None:
    sections = parse_file(make_table_pdf(tmp_path / "10q.pdf")).sections
    assert [s.page for s in sections] == [1, 1]
    page, table = sections
    # the page text stays whole (the sentence that introduces a table stays with its figures)
    assert page.header is None
    assert "results of operations" in page.text
    assert "Total net sales 81,797 82,959" in page.text
    # the header is what every chunk of the table repeats: caption and units, kept short
    assert (
        table.header == "CONDENSED CONSOLIDATED STATEMENTS OF OPERATIONS (Unaudited) (in millions)"
    )
    rows = table.text.split("\n")[1:]
    assert rows == [
        "Net sales: Products | Three Months Ended July 1, 2023: 60,584 | "
        "June 25, 2022: 63,355 (in millions)",
        "Net sales: Services | Three Months Ended July 1, 2023: 21,213 | "
        "June 25, 2022: 19,604 (in millions)",
        TOTAL_ROW,
        "Operating income | Three Months Ended July 1, 2023: 22,998 | "
        "June 25, 2022: 23,076 (in millions)",
    ]


def test_pdf_units_beside_the_column_headers_reach_every_row(tmp_path: Path) -> None:
    """A statement laid out with its unit line at the height of a column header line (as
    Microsoft's 10-Q income statements are): the unit names no column, and every row says it."""
    from reportlab.pdfgen import canvas

    path = tmp_path / "income.pdf"
    pdf = canvas.Canvas(str(path), invariant=1)
    pdf.setFont("Helvetica", 10)
    pdf.drawCentredString(306, 740, "INCOME STATEMENTS")
    pdf.drawRightString(436, 720, "Three Months Ended")
    pdf.drawString(16, 708, "(In millions, except per share amounts) (Unaudited)")
    pdf.drawRightString(436, 708, "December 31,")
    pdf.drawRightString(363, 696, "2022")
    pdf.drawRightString(436, 696, "2021")
    y = 680
    for label, now, before in (
        ("Total revenue", "52,747", "51,728"),
        ("Gross margin", "35,259", "34,768"),
        ("Operating income", "20,399", "22,247"),
    ):
        pdf.drawString(16, y, label)
        pdf.drawRightString(363, y, now)
        pdf.drawRightString(436, y, before)
        y -= 14
    pdf.showPage()
    pdf.save()
    (table,) = tables_of(path)
    assert table.header == "INCOME STATEMENTS (in millions)"
    rows = table.text.split("\n")[1:]
    assert len(rows) == 3
    assert all(row.endswith("(in millions)") for row in rows)
    assert rows[0].startswith("Total revenue | ")
    assert "52,747" in rows[0]
    assert "(In millions" not in table.text


def test_pdf_tables_can_be_turned_off(tmp_path: Path) -> None:
    sections = parse_file(make_table_pdf(tmp_path / "10q.pdf"), ParseOptions(tables=False))
    assert len(sections.sections) == 1
    assert "Total net sales 81,797 82,959" in sections.sections[0].text


def test_prose_pages_skip_the_table_search(tmp_path: Path) -> None:
    assert not looks_tabular("Invoices are kept for 7 years.\nDisks are wiped 3 times.")
    assert looks_tabular("a 1 2\nb 3 4\nTotal 4 6")
    assert tables_of(make_pdf(tmp_path / "policy.pdf")) == []


# --- DOCX and HTML ---------------------------------------------------------------------------


def test_docx_rows_keep_headers_caption_and_units(tmp_path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("Net sales by category (in millions):")
    table = document.add_table(rows=3, cols=3)
    grid = [
        ("", "July 1, 2023", "June 25, 2022"),
        ("iPhone", "39,669", "40,665"),
        ("Mac", "6,840", "7,382"),
    ]
    for row, values in zip(table.rows, grid, strict=True):
        for cell, value in zip(row.cells, values, strict=True):
            cell.text = value
    document.add_paragraph("Sales of iPhone fell.")
    document.save(str(tmp_path / "sales.docx"))
    (section,) = tables_of(tmp_path / "sales.docx")
    assert section.header == "Net sales by category (in millions):"
    assert section.text.split("\n")[1:] == [
        "iPhone | July 1, 2023: 39,669 | June 25, 2022: 40,665 (in millions)",
        "Mac | July 1, 2023: 6,840 | June 25, 2022: 7,382 (in millions)",
    ]


def test_html_rows_keep_headers_caption_units_and_spans(tmp_path: Path) -> None:
    page = """<html><body><main><h2>Results</h2><p>Quarterly figures follow.</p>
    <table><caption>Statements of Operations (in thousands)</caption>
      <thead><tr><th></th><th colspan="2">Three Months Ended</th></tr>
             <tr><th></th><th>July 1, 2023</th><th>June 25, 2022</th></tr></thead>
      <tbody><tr><td>Total net sales</td><td>81,797</td><td>82,959</td></tr>
             <tr><td>Gross margin</td><td>36,413</td><td>35,885</td></tr></tbody>
    </table><p>After the table.</p></main></body></html>"""
    path = tmp_path / "results.html"
    path.write_text(page, encoding="utf-8")
    doc = parse_file(path)
    assert [s.heading for s in doc.sections] == ["Results", "Results", "Results"]
    (section,) = [s for s in doc.sections if s.header is not None]
    assert section.header == "Statements of Operations (in thousands)"
    assert section.text.split("\n")[1:] == [
        "Total net sales | Three Months Ended July 1, 2023: 81,797 | "
        "June 25, 2022: 82,959 (in thousands)",
        "Gross margin | Three Months Ended July 1, 2023: 36,413 | "
        "June 25, 2022: 35,885 (in thousands)",
    ]
    assert doc.sections[2].text == "After the table."


def test_row_line_says_a_spanning_header_once() -> None:
    cells = [
        ("Three Months Ended July 1, 2023", "81,797"),
        ("Three Months Ended June 25, 2022", ""),
    ]
    assert row_line("Total", cells, None) == "Total | Three Months Ended July 1, 2023: 81,797"
    assert grid_table([["a", "b"]], "", header_rows=1) is not None  # a lone row is a row


# --- chunking --------------------------------------------------------------------------------


def big_table() -> Section:
    header = "Statement of Operations (in millions)\nQ3 2023 | Q3 2022 (in millions)"
    rows = [
        row_line(
            f"Line item {i}", [("Q3 2023", f"{i},100"), ("Q3 2022", f"{i},200")], "in millions"
        )
        for i in range(40)
    ]
    return Section(text="\n".join([header, *rows]), page=4, header=header)


def test_table_chunks_never_split_a_row_and_repeat_the_header() -> None:
    table = big_table()
    sections = [Section("Intro text before the table.", page=4), table]
    chunks = chunk_sections(sections, word_spans, max_tokens=60, overlap_tokens=8)
    table_chunks = [c for c in chunks if "Line item" in c.text]
    assert len(table_chunks) > 3
    rows = set(table.text.split("\n")[2:])
    seen: list[str] = []
    text = extracted_text(sections)
    for chunk in table_chunks:
        assert chunk.text.startswith(table.header + "\n")
        assert len(word_spans(chunk.text)) <= 60
        body = chunk.text[len(table.header) + 1 :].split("\n")
        assert all(line in rows for line in body)  # whole rows only
        seen += body
        assert chunk.text.endswith(text[chunk.start : chunk.end])
        assert chunk.page == 4
    assert seen == table.text.split("\n")[2:]  # every row once, in order, no overlap


def test_a_row_longer_than_a_chunk_is_the_only_one_cut() -> None:
    header = "Caption\nA | B"
    long_row = "Label | " + " ".join(f"w{i}" for i in range(80))
    table = Section(text=f"{header}\nshort | A: 1\n{long_row}\nlast | A: 2", header=header)
    chunks = chunk_sections([table], word_spans, max_tokens=30, overlap_tokens=4)
    assert all(len(word_spans(c.text)) <= 30 for c in chunks)
    assert chunks[0].text == f"{header}\nshort | A: 1"
    assert chunks[-1].text == f"{header}\nlast | A: 2"
    joined = " ".join(c.text for c in chunks)
    assert all(f"w{i}" in joined.split() for i in range(80))


def test_without_a_caption_the_column_names_head_the_table(tmp_path: Path) -> None:
    page = """<html><body><table>
      <tr><th>Record</th><th>Years kept</th></tr><tr><td>Invoices</td><td>7</td></tr>
    </table></body></html>"""
    path = tmp_path / "retention.html"
    path.write_text(page, encoding="utf-8")
    (section,) = tables_of(path)
    assert section.text == "Years kept\nInvoices | Years kept: 7"


def test_compact_rows_follow_a_column_line_in_every_chunk(tmp_path: Path) -> None:
    sections = parse_file(
        make_table_pdf(tmp_path / "10q.pdf"), ParseOptions(table_style="compact")
    ).sections
    (table,) = [s for s in sections if s.header is not None]
    assert table.header == (
        "CONDENSED CONSOLIDATED STATEMENTS OF OPERATIONS (Unaudited) (in millions)\n"
        "| Three Months Ended July 1, 2023 | Three Months Ended June 25, 2022"
    )
    assert table.text.split("\n")[2:] == [
        "Net sales: Products | 60,584 | 63,355",
        "Net sales: Services | 21,213 | 19,604",
        "Net sales: Total net sales | 81,797 | 82,959",
        "Operating income | 22,998 | 23,076",
    ]
    grid = [["", "2023", "2022"], ["Invoices", "7", ""]]
    section = grid_table(grid, "Kept (in thousands)", header_rows=1, style="compact")
    assert section is not None
    assert section.text == "Kept (in thousands)\n| 2023 | 2022\nInvoices | 7 | -"


# --- table rows in the index and in retrieval ------------------------------------------------

PROSE = " ".join(
    f"Paragraph {i}: net sales and gross margin were discussed at length by management, "
    "with sales trends, margin pressure and the outlook for sales in every region."
    for i in range(12)
)
RESULTS_PAGE = f"""<html><body><main><h2>Results</h2><p>{PROSE}</p>
<table><caption>Statements of Operations (in millions)</caption>
  <thead><tr><th></th><th>July 1, 2023</th><th>June 25, 2022</th></tr></thead>
  <tbody><tr><td>Total net sales</td><td>81,797</td><td>82,959</td></tr>
         <tr><td>Gross margin</td><td>36,413</td><td>35,885</td></tr></tbody>
</table><p>{PROSE}</p></main></body></html>"""


def test_table_chunks_are_marked_and_only_they_are(tmp_path: Path) -> None:
    table = big_table()
    chunks = chunk_sections(
        [Section("Intro text before the table.", page=4), table],
        word_spans,
        max_tokens=60,
        overlap_tokens=8,
    )
    assert [c.table for c in chunks] == ["Line item" in c.text for c in chunks]
    assert any(c.table for c in chunks)
    assert not chunks[0].table


def test_search_returns_table_rows_beside_the_prose(make_indexer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Prose that repeats the question's words outranks the rows that hold the figures; the
    table pass of retrieval still puts the rows whose labels name the question's line items
    in the top k, after the best chunk, and the mark survives a rename (chunks reused from
    the state, not parsed again)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.html").write_text(RESULTS_PAGE, encoding="utf-8")
    indexer = make_indexer(docs)
    indexer.reconcile()
    question = "What were total net sales and gross margin?"
    hits = search(indexer, question, 3)
    assert len(hits) == 3
    assert "81,797" not in hits[0]["text"] or "Total net sales |" in hits[0]["text"]
    assert any("Total net sales | July 1, 2023: 81,797" in h["text"] for h in hits[1:])
    texts = {h["text"] for h in search(indexer, question, 10, mode="dense")}
    assert sum("81,797" in t for t in texts) >= 1
    (docs / "results.html").rename(docs / "renamed.html")
    indexer.reconcile()
    rows = indexer.state.live_chunks_of_path(indexer.collection, "renamed.html")
    assert any(r.chunk.table for r in rows)
    assert not all(r.chunk.table for r in rows)
    again = search(indexer, question, 3)
    assert any("Total net sales |" in h["text"] for h in again[1:])


class CountingStore:
    """The indexer's real store, counting the queries it answers and their filters."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.filters: list[Any] = []

    def query(self, *args: Any, **kwargs: Any) -> Any:
        self.filters.append(kwargs.get("where"))
        return self.store.query(*args, **kwargs)


def test_only_questions_for_figures_query_the_table_rows(make_indexer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A question that asks why gets the main list alone (its answer is narrative); one that
    asks for figures also queries the table rows, and their labels decide which row comes."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.html").write_text(RESULTS_PAGE, encoding="utf-8")
    indexer = make_indexer(docs)
    indexer.reconcile()
    store = CountingStore(indexer.store)
    why = "Why did net sales and gross margin change?"
    hits = retrieve(store, indexer.embedder, indexer.sparse, why, 3)
    assert store.filters == [None]
    assert len(hits) == 3
    assert all(h.payload.get("kind") == "text" for h in hits)
    store.filters.clear()
    hits = retrieve(store, indexer.embedder, indexer.sparse, "What was the gross margin?", 3)
    assert store.filters == [None, {"kind": ["table"]}]
    rows = [h for h in hits if h.payload.get("kind") == "table"]
    assert rows
    assert "Gross margin | July 1, 2023: 36,413" in str(rows[0].payload["text"])


def test_a_document_of_rows_alone_still_answers_every_question(
    make_indexer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Where the candidates are all table rows, they stand for the text."""
    docs = tmp_path / "docs"
    docs.mkdir()
    table = RESULTS_PAGE[RESULTS_PAGE.index("<table>") : RESULTS_PAGE.index("</table>") + 8]
    (docs / "rows.html").write_text(f"<html><body>{table}</body></html>", encoding="utf-8")
    indexer = make_indexer(docs)
    indexer.reconcile()
    for question in ("Why did gross margin change?", "What was the gross margin?"):
        hits = retrieve(indexer.store, indexer.embedder, indexer.sparse, question, 3)
        assert hits
        assert all(h.payload.get("kind") == "table" for h in hits)


def test_a_state_written_before_table_marks_reads_as_text(tmp_path: Path) -> None:
    import sqlite3

    from ingest.state import IngestState

    path = tmp_path / "ingest.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE chunks (collection TEXT NOT NULL, point_id TEXT NOT NULL, "
        "path TEXT NOT NULL, sha256 TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, "
        "text_key TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "
        "end_ INTEGER NOT NULL, page INTEGER, heading TEXT, ocr_confidence REAL, "
        "PRIMARY KEY (collection, point_id))"
    )
    old.execute(
        "INSERT INTO chunks VALUES ('c', 'p1', 'a.pdf', 'h', 0, 'live', 'k', 't', 0, 1, 1, NULL, "
        "NULL)"
    )
    old.commit()
    old.close()
    state = IngestState(path)
    try:
        (row,) = state.live_chunks_of_path("c", "a.pdf")
        assert row.chunk.table is False
    finally:
        state.close()
