"""Figures in text: what counts as one, and when a passage states an answer's figure."""

from __future__ import annotations

import pytest

from appliance.core.figures import extract_figures, find_figure, missing_figures, table_unit

MSFT = (
    "MICROSOFT CORPORATION INCOME STATEMENTS\n"
    "(In millions, except per share amounts) Three Months Ended March 31,\n"
    "2023 2022\n"
    "Total revenue 52,857 49,360\n"
    "Diluted earnings per share $ 2.45 $ 2.22\n"
    "Revenue increased 7% driven by Intelligent Cloud.\n"
)


def kinds(text: str) -> list[tuple[str, str]]:
    return [(f.kind, f.text) for f in extract_figures(text)]


def test_amounts_percentages_dates_and_identifiers_are_told_apart() -> None:
    assert kinds(
        "Revenue rose 5.7% to $4.98 billion on March 31, 2023 under policy AP-12 [1]."
    ) == [
        ("percent", "5.7%"),
        ("amount", "$4.98 billion"),
        ("date", "March 31, 2023"),
        ("identifier", "AP-12"),
    ]
    assert kinds("In fiscal 2023, 12 sites followed ISO 27001 and filed a 10-Q.") == [
        ("year", "2023"),
        ("number", "12"),
        ("identifier", "ISO 27001"),
        ("identifier", "10-Q"),
    ]


def test_citation_markers_and_list_numbers_are_not_figures() -> None:
    assert kinds("1. Backups are kept [2].\n2. Restores are tested [1, 3].") == []


def test_scale_words_and_table_units() -> None:
    (figure,) = extract_figures("$52.9 billion")
    assert (figure.value, figure.scale, figure.decimals, figure.currency) == (52.9, 1e9, 1, "$")
    assert table_unit(MSFT) == 1e6
    assert table_unit("Total revenue 52,857 49,360") is None


@pytest.mark.parametrize(
    ("sentence", "stated"),
    [
        ("Total revenue was $52,857 million.", True),  # the digits, with the table's unit
        ("Total revenue was 52,857.", True),  # the digits as written
        ("Total revenue was $52.9 billion.", True),  # rescaled, rounded to what is written
        ("Total revenue was about $53 billion.", True),
        ("Total revenue was $52.8 billion.", False),  # rounded wrongly
        ("Total revenue was $4.98 billion.", False),  # absent
        ("Total revenue was 52,857 thousand.", False),  # a different unit
        ("Revenue increased 7%.", True),
        ("Revenue increased 7.0%.", True),
        ("Revenue increased 6.5%.", False),
        ("Revenue increased 7 million.", False),  # a percentage is not an amount
        ("Diluted earnings per share were $2.45.", True),  # per-share figures are not scaled
        ("Diluted earnings per share were €2.45.", False),  # another currency
    ],
)
def test_an_amount_is_found_only_where_the_passage_states_it(sentence: str, stated: bool) -> None:
    (figure,) = [f for f in extract_figures(sentence) if f.kind != "year"]
    assert bool(find_figure(figure, MSFT)) is stated


def test_rescaling_needs_the_unit_in_the_passage() -> None:
    (figure,) = extract_figures("$52.9 billion")
    assert not find_figure(figure, "Total revenue 52,857 49,360")
    assert find_figure(figure, "(in millions) Total revenue 52,857 49,360")


@pytest.mark.parametrize(
    ("sentence", "stated"),
    [
        ("The quarter ended March 31, 2023.", True),
        ("The quarter ended 31 March 2023.", True),
        ("The quarter ended 2023-03-31.", True),
        ("The quarter ended 3/31/2023.", True),
        ("The quarter ended March 2023.", True),
        ("The quarter ended March 30, 2023.", False),
        ("The quarter ended March 31, 2022.", True),  # the header names 2022 too
        ("The quarter ended March 31, 2021.", False),
    ],
)
def test_a_date_matches_in_any_format(sentence: str, stated: bool) -> None:
    (figure,) = extract_figures(sentence)
    assert figure.kind == "date"
    assert bool(find_figure(figure, MSFT)) is stated


def test_a_match_is_a_span_of_the_passage() -> None:
    (figure,) = extract_figures("$52.9 billion")
    (match,) = find_figure(figure, MSFT)
    assert MSFT[match.start : match.end] == "52,857"


def test_missing_figures_counts_for_the_metrics() -> None:
    missing, total = missing_figures("Revenue was $52.9 billion, up 9%, per AP-12.", [MSFT])
    assert total == 3
    assert [f.text for f in missing] == ["9%", "AP-12"]
