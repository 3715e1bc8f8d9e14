"""The identity line prepended to every chunk, and the file-name terms of the sparse text."""

from __future__ import annotations

import pytest

from appliance.core.protocols import ParsedDocument, Section
from ingest import identity
from ingest.identity import MAX_IDENTITY_WORDS, file_name_terms, identity_line

COVER = """UNITED STATES
Table of Contents
(Mark One)
\u2612 QUARTERLY REPORT PURSUANT TO SECTION 13 OF THE ACT
Registrant:
Filing Office
For the quarterly period ended March 31, 2024
Northwind Traders, Inc.
(Exact name of registrant as specified in its charter)
Page 1 of 40
continued from the previous form and not a title at all"""

BODY = (
    "Northwind Traders, Inc. sells tea. Revenue of Northwind Traders grew. "
    "Northwind Traders expects more growth; Northwind Traders, Inc. hired staff."
)


def _doc(first: str = COVER, *, title: str | None = None, pages: int = 4) -> ParsedDocument:
    sections = [Section(text=first, page=1)]
    sections += [Section(text=f"{BODY}\nPage {n}", page=n) for n in range(2, pages + 1)]
    return ParsedDocument(sections=sections, title=title, pages=pages)


def _parts(line: str) -> list[str]:
    return line.split(" | ")


def test_organisation_and_period_lines_are_picked() -> None:
    parts = _parts(identity_line(_doc()))
    assert "Northwind Traders, Inc." in parts
    assert "For the quarterly period ended March 31, 2024" in parts


def test_form_boilerplate_is_skipped() -> None:
    line = identity_line(_doc())
    for boilerplate in (
        "Table of Contents",
        "(Mark One)",
        "QUARTERLY REPORT PURSUANT",  # a check-box line
        "Registrant:",  # a field label without a value
        "(Exact name",  # a parenthesised caption
        "Page 1 of 40",
        "continued from",  # the rest of a wrapped sentence
    ):
        assert boilerplate not in line


def test_parts_keep_document_order() -> None:
    parts = _parts(identity_line(_doc()))
    assert parts.index("For the quarterly period ended March 31, 2024") < parts.index(
        "Northwind Traders, Inc."
    )


def test_word_budget_is_respected() -> None:
    many = "\n".join(
        f"Agency number {n} of the Board of Trade, March {n}, 2024" for n in range(1, 30)
    )
    line = identity_line(_doc(f"Annual Report\n{many}", title="A long report title " * 10))
    assert len(line.replace(" | ", " ").split()) <= MAX_IDENTITY_WORDS


def test_issuer_wins_over_an_office_it_is_filed_with(monkeypatch: pytest.MonkeyPatch) -> None:
    # With room for one organisation only, the one the document keeps mentioning is kept.
    first = "Securities Regulation Commission\nNorthwind Traders, Inc.\nQuarterly Report"
    monkeypatch.setattr(identity, "MAX_IDENTITY_WORDS", 4)
    line = identity_line(_doc(first))
    assert "Northwind Traders, Inc." in line
    assert "Commission" not in line


def test_metadata_title_comes_first_and_placeholders_are_ignored() -> None:
    assert _parts(identity_line(_doc(title="Quarterly Report of Northwind")))[0] == (
        "Quarterly Report of Northwind"
    )
    assert not identity_line(_doc(title="Untitled")).startswith("Untitled")


def test_running_footer_names_the_document_without_its_page_number() -> None:
    pages = [
        Section(
            text=f"Statement {n}\nfigures\nNorthwind Traders, Inc. | Q1 2024 Form 10-Q | {n}",
            page=n,
        )
        for n in range(1, 7)
    ]
    line = identity_line(ParsedDocument(sections=pages, pages=6))
    assert "Northwind Traders, Inc. | Q1 2024 Form 10-Q" in line
    assert "10-Q | 3" not in line


def test_same_name_twice_is_said_once() -> None:
    first = "Northwind Traders, Inc.\nNORTHWIND TRADERS, INC.\nFor the year ended December 31, 2023"
    assert identity_line(_doc(first)).lower().count("northwind") == 1


def test_a_list_of_one_shape_contributes_its_first_line() -> None:
    notes = "\n".join(f"{n}.000% Notes due 20{30 + n} Stock Exchange LLC" for n in range(1, 8))
    line = identity_line(_doc(f"Northwind Traders, Inc.\n{notes}"))
    assert line.count("Notes due") <= 1


def test_heading_marks_and_bullets_are_dropped() -> None:
    line = identity_line(_doc("# Board Minutes, March 3, 2024\n\u2022 Sponsor: Fabrikam Trust"))
    assert _parts(line) == ["Board Minutes, March 3, 2024", "Sponsor: Fabrikam Trust"]


def test_empty_document_has_no_identity() -> None:
    assert identity_line(ParsedDocument(sections=[])) == ""


def test_identity_depends_on_content_only() -> None:
    # Same content: same identity line, hence the same dense text and vectors after a rename.
    assert identity_line(_doc()) == identity_line(_doc())


@pytest.mark.parametrize(
    ("path", "terms"),
    [
        ("2023 Q3 AAPL.pdf", "2023 Q3 AAPL"),
        ("filings/acme_10-q.2024.pdf", "filings acme 10 q 2024"),
        ("a/b/Board-minutes_March.docx", "a b Board minutes March"),
        ("notes.txt", "notes"),
    ],
)
def test_file_name_terms(path: str, terms: str) -> None:
    assert file_name_terms(path) == terms
