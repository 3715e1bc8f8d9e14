"""The claim verifier on hand-written cases, with the packaged embedding model, and its
calibration on the labelled cases shipped in tests/data/claims.jsonl."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.claim_calibration import load_cases, measure, score_cases
from appliance.core.settings import AnswerSettings
from appliance.verification import (
    Verifier,
    finished_sentences,
    passage_segments,
    sentence_spans,
)

CASES = Path(__file__).resolve().parents[1] / "data" / "claims.jsonl"

REVENUE = (
    "MICROSOFT CORPORATION INCOME STATEMENTS\n"
    "(In millions, except per share amounts) Three Months Ended March 31,\n"
    "2023 2022\n"
    "Total revenue 52,857 49,360\n"
    "Net income $ 18,299 $ 16,728\n"
    "Revenue increased 7% driven by growth in Intelligent Cloud."
)
BACKUP = (
    "Backups of the case management system run every night and are kept for 90 days. "
    "Restores are tested every quarter by the IT department. "
    "Backup media are not stored off site."
)


@dataclass(frozen=True)
class P:
    number: int
    text: str


@pytest.fixture(scope="module")
def verifier(real_embedder) -> Verifier:  # type: ignore[no-untyped-def]
    return Verifier([P(1, REVENUE), P(2, BACKUP)], real_embedder.embed)


def test_a_figure_present_in_the_cited_passage_is_supported(verifier: Verifier) -> None:
    claim = verifier.verify("Total revenue was $52,857 million in the quarter [1].")
    assert claim.supported, claim.reason
    assert claim.source == 1
    assert claim.start is not None
    assert claim.end is not None
    assert "52,857" in REVENUE[claim.start : claim.end]


def test_a_figure_absent_from_the_passage_makes_the_sentence_unsupported(
    verifier: Verifier,
) -> None:
    claim = verifier.verify("Microsoft's total revenue was $4.98 billion or 5.7% [1].")
    assert not claim.supported
    assert claim.source is None
    assert claim.reason == "figure $4.98 billion not in passage [1]"


def test_a_rescaled_figure_is_supported_where_the_table_states_its_unit(
    verifier: Verifier,
) -> None:
    claim = verifier.verify("Total revenue was $52.9 billion [1].")
    assert claim.supported, claim.reason
    assert verifier.verify("Total revenue was $52.8 billion [1].").supported is False


def test_a_figure_in_a_different_unit_is_unsupported(verifier: Verifier) -> None:
    claim = verifier.verify("Total revenue was 52,857 thousand dollars [1].")
    assert not claim.supported
    assert "52,857 thousand" in claim.reason


def test_a_date_must_be_the_passage_date(verifier: Verifier) -> None:
    assert verifier.verify(
        "Total revenue was 52,857 for the quarter ended March 31, 2023."
    ).supported
    claim = verifier.verify("Total revenue was 52,857 for the quarter ended June 30, 2023.")
    assert not claim.supported
    assert "June 30, 2023" in claim.reason


def test_a_negated_sentence_is_checked_against_the_passage(verifier: Verifier) -> None:
    assert verifier.verify("Backup media are not stored off site [2].").supported
    negated = verifier.verify("Restores are not tested by the IT department [2].")
    assert not negated.supported
    assert negated.reason.startswith("negation")
    affirmed = verifier.verify("Backup media are stored off site [2].")
    assert not affirmed.supported
    assert affirmed.reason.startswith("negation")


def test_a_sentence_citing_the_wrong_passage_is_unsupported(verifier: Verifier) -> None:
    right = verifier.verify("Backups are kept for 90 days [2].")
    assert right.supported
    assert right.source == 2
    wrong = verifier.verify("Backups are kept for 90 days [1].")
    assert not wrong.supported
    assert wrong.reason.endswith("stated in [2], not in [1]")


def test_a_sentence_citing_nothing_is_checked_against_every_passage(verifier: Verifier) -> None:
    claim = verifier.verify("Restores are tested every quarter by the IT department.")
    assert claim.supported
    assert claim.source == 2
    assert claim.start is not None
    assert claim.end is not None
    assert BACKUP[claim.start : claim.end] == (
        "Restores are tested every quarter by the IT department."
    )


def test_an_invented_cause_is_unsupported(verifier: Verifier) -> None:
    claim = verifier.verify("The COVID-19 pandemic accelerated global economic growth [1].")
    assert not claim.supported


def test_sentences_keep_their_citations_and_decimals() -> None:
    text = "Revenue was $52.9 billion. [1] It rose 7.1% in the U.S. market [2]. Done"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Revenue was $52.9 billion. [1]",
        "It rose 7.1% in the U.S. market [2].",
        "Done",
    ]


def test_a_stream_releases_a_sentence_once_its_citation_can_no_longer_come() -> None:
    assert finished_sentences("Revenue was $52.9 billion. ") == []
    assert finished_sentences("Revenue was $52.9 billion. [") == []
    assert finished_sentences("Revenue was $52.9 billion. [1] It") == [(0, 30)]


def test_table_lines_are_segments_with_their_caption() -> None:
    segments = passage_segments(1, REVENUE)
    row = next(s for s in segments if s.text.startswith("Total revenue"))
    assert row.text == "Total revenue 52,857 49,360"
    assert "In millions" in row.context
    prose = segments[-1]
    assert prose.text == "Revenue increased 7% driven by growth in Intelligent Cloud."
    assert prose.context == ""


@pytest.mark.slow
def test_the_shipped_threshold_holds_on_the_labelled_cases(real_embedder) -> None:  # type: ignore[no-untyped-def]
    cases = load_cases(CASES)
    assert len(cases) >= 100
    assert {c.label for c in cases} == {"supported", "paraphrase", "unsupported"}
    assert len({c.domain for c in cases}) >= 10
    shipped = AnswerSettings()
    rows = score_cases(cases, real_embedder.embed, shipped.support_lexical_weight)
    result = measure(rows, shipped.support_threshold, shipped.support_lexical_weight)
    # the figures printed by benchmarks/claim_calibration.py, with a little room
    assert result.precision >= 0.95, result.line()
    assert result.recall >= 0.88, result.line()


def test_quotes_are_sentences_or_labelled_rows_never_footers() -> None:
    from appliance.answering import _informative

    assert _informative("Total net sales increased 8% compared to the same quarter in 2022.")
    assert _informative("Total net sales | Three Months Ended July 1, 2023: 81,797 | 82,959")
    assert not _informative("Apple Inc. | Q3 2023 Form 10-Q | 17")
    assert not _informative("NOTE 9 — DEBT")
    assert not _informative("Nine Months Ended March 31, 2023")


def test_question_evidence_weighs_its_dates_and_rare_words() -> None:
    text = (
        "Revenue was stable across the year.\n"
        "Total revenue | Three Months Ended March 31, 2023: 52,857 | 2022: 49,360\n"
        "Total revenue | Nine Months Ended March 31, 2023: 157,438 | 2022: 150,160\n"
    )
    v = Verifier([P(1, text)], None)
    best = v.evidence("What was total revenue in the three months ended March 31, 2023?")[0]
    assert "52,857" in best.segment.text
