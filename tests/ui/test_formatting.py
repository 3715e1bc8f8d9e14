"""Citation titles: where a passage is, and whether its text was read from a scan."""

from ui.formatting import source_title


def test_a_citation_of_ocr_text_says_so() -> None:
    plain = {"number": 1, "path": "hr/leave.pdf", "page": 3, "ocr_confidence": None}
    scanned = {"number": 2, "path": "trials/protocol.pdf", "page": 1, "ocr_confidence": 0.86}
    assert source_title(plain) == "[1] leave.pdf, page 3"
    assert source_title(scanned) == "[2] protocol.pdf, page 1 (OCR, 86% confidence)"
    assert source_title({"number": 3, "path": "a.md", "heading": "Scope"}) == "[3] a.md, Scope"
