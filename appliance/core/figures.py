"""Figures in text: amounts, percentages, dates, counts and identifiers, normalised so a figure
in an answer can be looked up in a passage.

    text ─► identifiers (AP-12, ISO 27001, 10-Q) ─► dates (March 31, 2023; 2023-03-31; 3/31/2023)
         ─► numbers (with currency sign, thousands separators, decimals, %, scale word)

A number found in a passage can be read two ways when the passage states a table unit ("in
millions", "(in thousands, except per share amounts)"): as written and multiplied by that unit.
An answer's number matches a passage's number when the passage's value, expressed in the
answer's scale and rounded to the precision the answer wrote, equals the answer's value:
"$52.9 billion" matches "52,857" only in a passage that says "in millions"; "6%" matches
"5.7%", "5.8%" does not match "5.75%" only if rounding says so. A number without a scale word
also matches the same digits written anywhere (answers often drop the unit). Percentages only
match percentages, and two different currency signs never match.

Pure and fast: regular expressions, no model. Shared by the claim verifier and the evaluation
metrics (``unsupported_number_rate``, ``evidence_recall``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["amount", "percent", "number", "date", "year", "identifier"]

SCALES: dict[str, float] = {
    "thousand": 1e3,
    "thousands": 1e3,
    "k": 1e3,
    "million": 1e6,
    "millions": 1e6,
    "mn": 1e6,
    "m": 1e6,
    "mm": 1e6,
    "billion": 1e9,
    "billions": 1e9,
    "bn": 1e9,
    "b": 1e9,
    "trillion": 1e12,
    "trillions": 1e12,
    "tn": 1e12,
}
MONTHS = {
    name: i
    for i, names in enumerate(
        (
            ("january", "jan"),
            ("february", "feb"),
            ("march", "mar"),
            ("april", "apr"),
            ("may",),
            ("june", "jun"),
            ("july", "jul"),
            ("august", "aug"),
            ("september", "sep", "sept"),
            ("october", "oct"),
            ("november", "nov"),
            ("december", "dec"),
        ),
        1,
    )
    for name in names
}
_MONTH = r"(?P<{}>" + "|".join(sorted(MONTHS, key=len, reverse=True)) + r")\.?"
_CURRENCY = r"(?P<cur>[$€£¥]|US\$|USD|EUR|GBP|CHF|JPY)"
# A table unit: "(in millions)", "in thousands, except per share", "(Dollars in billions)".
_TABLE_UNIT = re.compile(
    r"\bin\s+(?P<scale>thousands|millions|billions)\b|\b(?P<scale2>thousands|millions|billions)"
    r"\s+of\s+(?:dollars|euros|pounds|usd|eur)\b",
    re.IGNORECASE,
)
_DATES = [
    # March 31, 2023 / Mar. 31 2023
    re.compile(
        r"\b"
        + _MONTH.format("month")
        + r"\s+(?P<day>[0-3]?\d)(?:st|nd|rd|th)?,?\s+(?P<year>(?:19|20)\d\d)\b",
        re.IGNORECASE,
    ),
    # 31 March 2023
    re.compile(
        r"\b(?P<day>[0-3]?\d)(?:st|nd|rd|th)?\s+"
        + _MONTH.format("month")
        + r",?\s+(?P<year>(?:19|20)\d\d)\b",
        re.IGNORECASE,
    ),
    # 2023-03-31
    re.compile(r"\b(?P<year>(?:19|20)\d\d)-(?P<mnum>[01]?\d)-(?P<day>[0-3]?\d)\b"),
    # 3/31/2023 (US order; an impossible month falls back to day/month)
    re.compile(r"\b(?P<mnum>[0-3]?\d)/(?P<day>[0-3]?\d)/(?P<year>(?:19|20)\d\d)\b"),
    # March 2023
    re.compile(r"\b" + _MONTH.format("month") + r",?\s+(?P<year>(?:19|20)\d\d)\b", re.IGNORECASE),
    # March 31 / 31 March (no year)
    re.compile(
        r"\b" + _MONTH.format("month") + r"\s+(?P<day>[0-3]?\d)(?:st|nd|rd|th)?\b(?!\s*%)",
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?P<day>[0-3]?\d)(?:st|nd|rd|th)?\s+" + _MONTH.format("month") + r"\b", re.IGNORECASE
    ),
]
# Codes mixing letters and digits: AP-12, HR-1, ISO 27001, 10-Q, Q3, SOC 2, A320neo, RFC-9110.
_IDENTIFIER = re.compile(
    r"\b(?:[A-Z][A-Za-z]{0,9}[-/ ]?\d(?:[\w/-]|\.(?=\w))*|\d+[-/]?[A-Z][A-Za-z]{0,3}\b)(?![\w-])"
)
_IDENTIFIER_PREFIXES = frozenset({"ISO", "IEC", "EN", "SOC", "RFC", "NIST", "SP", "CFR", "USC"})
_NUMBER = re.compile(
    r"(?<![\w.])(?:"
    + _CURRENCY
    + r"\s?)?(?P<neg>[-\u2212(])?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<pct>\s?%|\s+(?:percent|per cent|percentage points?|pp)\b)?"
    r"(?:\s?(?P<scale>thousands?|millions?|billions?|trillions?|mn|bn|tn|mm|[kmb])\b)?",
    re.IGNORECASE,
)
_QUARTER = re.compile(r"\bQ([1-4])\b")
_ORDINAL_QUARTER = {"1": "first", "2": "second", "3": "third", "4": "fourth"}


@dataclass(frozen=True)
class Figure:
    """One figure as written, with where it is and what it is worth."""

    text: str
    start: int
    end: int
    kind: Kind
    value: float | None = None
    """The number as written, without its scale (52.9 for "$52.9 billion")."""
    decimals: int = 0
    """Digits written after the decimal point: the precision an answer may round to."""
    scale: float = 1.0
    """The multiplier of a scale word next to the number (1e9 for "billion")."""
    currency: str | None = None
    date: tuple[int | None, int | None, int | None] | None = None
    """(year, month, day) of a date; None where not written."""
    key: str = ""
    """Identifiers: the normalised code (upper case, without separators)."""

    @property
    def absolute(self) -> float | None:
        return None if self.value is None else self.value * self.scale


@dataclass(frozen=True)
class FigureMatch:
    """Where a passage states a figure of the answer."""

    start: int
    end: int


def table_unit(text: str) -> float | None:
    """The scale a passage's tables are stated in ("in millions" -> 1e6), if it says one."""
    match = _TABLE_UNIT.search(text)
    if not match:
        return None
    word = (match.group("scale") or match.group("scale2")).lower()
    return SCALES[word]


def _currency(raw: str | None) -> str | None:
    if not raw:
        return None
    raw = raw.upper()
    return {"US$": "$", "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}.get(raw, raw)


def _date_figure(match: re.Match[str]) -> Figure | None:
    groups = match.groupdict()
    year = int(groups["year"]) if groups.get("year") else None
    month: int | None
    if groups.get("month"):
        month = MONTHS[groups["month"].lower().rstrip(".")]
    elif groups.get("mnum"):
        month = int(groups["mnum"])
    else:
        month = None
    day = int(groups["day"]) if groups.get("day") else None
    if month is not None and month > 12 and day is not None and day <= 12:
        month, day = day, month
    if month is not None and not 1 <= month <= 12:
        return None
    if day is not None and not 1 <= day <= 31:
        return None
    return Figure(match.group(0), match.start(), match.end(), "date", date=(year, month, day))


def extract_figures(text: str) -> list[Figure]:
    """Every figure in ``text``, in order of appearance. Citation markers ("[1]") are not
    figures; neither are list numbers ("1." at the start of a line)."""
    taken = [False] * len(text)

    def free(start: int, end: int) -> bool:
        return not any(taken[start:end])

    def take(start: int, end: int) -> None:
        for i in range(start, end):
            taken[i] = True

    for match in re.finditer(r"\[\d{1,3}(?:\s*,\s*\d{1,3})*\]", text):
        take(match.start(), match.end())
    for match in re.finditer(r"(?m)^\s*\d{1,2}[.)]\s", text):
        take(match.start(), match.end())
    found: list[Figure] = []
    for pattern in _DATES:
        for match in pattern.finditer(text):
            if free(match.start(), match.end()):
                figure = _date_figure(match)
                if figure is not None:
                    found.append(figure)
                    take(match.start(), match.end())
    for match in _IDENTIFIER.finditer(text):
        raw = match.group(0)
        head = re.match(r"[A-Za-z]+", raw)
        if " " in raw and (head is None or head.group(0).upper() not in _IDENTIFIER_PREFIXES):
            continue  # "March 31" or "Note 4" is prose, not a code; "ISO 27001" is a code
        letters = re.sub(r"[^A-Za-z]", "", raw).lower()
        if letters in SCALES or letters in MONTHS or (head and head.group(0).lower() in MONTHS):
            continue  # "5M" is an amount, "Mar 31" a date
        if re.fullmatch(r"\d+(?:st|nd|rd|th|s)", raw, re.IGNORECASE):
            continue  # ordinals and decades are numbers
        if not free(match.start(), match.end()):
            continue
        key = re.sub(r"[^A-Z0-9]", "", raw.upper())
        found.append(Figure(raw, match.start(), match.end(), "identifier", key=key))
        take(match.start(), match.end())
    for match in _NUMBER.finditer(text):
        start, end = match.start(), match.end()
        while end > start and text[end - 1].isspace():
            end -= 1
        if not free(start, end):
            continue
        digits = match.group("num")
        value = float(digits.replace(",", ""))
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        scale_word = (match.group("scale") or "").lower()
        kind: Kind
        if match.group("pct"):
            kind = "percent"
        elif match.group("cur"):
            kind = "amount"
        elif (
            not scale_word
            and decimals == 0
            and "," not in digits
            and 1900 <= value <= 2100
            and len(digits) == 4
        ):
            kind = "year"
        else:
            kind = "number"
        # a lone "m"/"b"/"k" is a scale only right after digits ("$5m"), not a word ("5 km")
        if scale_word in {"m", "b", "k"} and text[match.start("scale") - 1].isspace():
            scale_word = ""
            end = match.end("num") + (len(match.group("pct")) if match.group("pct") else 0)
        found.append(
            Figure(
                text[start:end],
                start,
                end,
                kind,
                value=value,
                decimals=decimals,
                scale=SCALES.get(scale_word, 1.0),
                currency=_currency(match.group("cur")),
            )
        )
        take(start, end)
    found.sort(key=lambda f: f.start)
    return found


def _rounds_to(passage_value: float, figure: Figure, scale: float) -> bool:
    """Whether ``passage_value`` (absolute), expressed in ``scale``, rounds to the figure's
    value at the precision the figure was written with."""
    assert figure.value is not None
    expressed = passage_value / scale
    tolerance = 0.5 * 10 ** (-figure.decimals) + 1e-9 * max(1.0, abs(expressed))
    # half-way cases round either way: 52.85 written as 52.9 or 52.8 are both honest
    return abs(abs(expressed) - abs(figure.value)) <= tolerance


def _number_matches(figure: Figure, other: Figure, unit: float | None) -> bool:
    if other.value is None or figure.value is None:
        return False
    if (figure.kind == "percent") != (other.kind == "percent"):
        return False
    if figure.currency and other.currency and figure.currency != other.currency:
        return False
    readings = [other.value * other.scale]
    if unit is not None and other.scale == 1.0 and other.kind != "percent":
        readings.append(other.value * unit)
    if any(_rounds_to(r, figure, figure.scale) for r in readings):
        return True
    # the same digits without the scale ("52,857" for "$52,857 million" in a table), or an
    # answer that dropped the passage's scale word
    if figure.scale == 1.0:
        return _rounds_to(other.value, figure, 1.0)
    # the very digits with a scale word added, where the passage states no unit (its table
    # header may sit in a chunk that was not retrieved); rescaling and rounding need the unit
    return unit is None and other.scale == 1.0 and _same_digits(figure, other)


def _same_digits(figure: Figure, other: Figure) -> bool:
    assert figure.value is not None
    assert other.value is not None
    significant = len(re.sub(r"[^0-9]", "", f"{figure.value:.{figure.decimals}f}").lstrip("0"))
    return significant >= 4 and figure.value == other.value and figure.decimals == other.decimals


def _date_matches(figure: Figure, other: Figure, passage: str) -> bool:
    assert figure.date is not None
    year, month, day = figure.date
    if other.kind == "year":
        return month is None and day is None and other.value == year
    if other.date is None:
        return False
    o_year, o_month, o_day = other.date
    # "March 31" in a passage that names the year elsewhere, and a table header ("Three Months
    # Ended March 31, 2023 2022") that dates two columns, state "March 31, 2022"
    if year is not None and year != o_year:
        elsewhere = o_year is None and re.search(rf"\b{year}\b", passage)
        columns = re.match(rf"[\s\d,]{{0,20}}\b{year}\b", passage[other.end :])
        if not (elsewhere or columns):
            return False
    if month is not None and month != o_month:
        return False
    return day is None or day == o_day


def find_figure(
    figure: Figure, passage: str, *, figures: Sequence[Figure] | None = None
) -> list[FigureMatch]:
    """Where ``passage`` states ``figure`` (empty: nowhere). ``figures`` are the passage's own,
    when already extracted."""
    others = extract_figures(passage) if figures is None else figures
    found: list[FigureMatch] = []
    if figure.kind == "identifier":
        for other in others:
            if other.kind == "identifier" and other.key == figure.key:
                found.append(FigureMatch(other.start, other.end))
        if not found:
            quarter = _QUARTER.fullmatch(figure.text)
            pattern = (
                rf"\b{_ORDINAL_QUARTER[quarter.group(1)]}\s+(?:fiscal\s+)?quarter\b"
                if quarter
                else r"(?<![A-Za-z0-9])"
                + r"[-/ ]?".join(re.escape(c) for c in figure.key)
                + r"(?![A-Za-z0-9])"
            )
            found += [
                FigureMatch(m.start(), m.end())
                for m in re.finditer(pattern, passage, re.IGNORECASE)
            ]
        return found
    if figure.kind == "date":
        return [FigureMatch(o.start, o.end) for o in others if _date_matches(figure, o, passage)]
    if figure.kind == "year":
        for other in others:
            if (other.kind == "year" and other.value == figure.value) or (
                other.date is not None
                and other.date[0] is not None
                and other.date[0] == figure.value
            ):
                found.append(FigureMatch(other.start, other.end))
        return found
    unit = table_unit(passage)
    return [
        FigureMatch(o.start, o.end)
        for o in others
        if o.kind in ("amount", "percent", "number", "year") and _number_matches(figure, o, unit)
    ]


def missing_figures(text: str, passages: Iterable[str]) -> tuple[list[Figure], int]:
    """The figures of ``text`` that none of ``passages`` states, and how many figures ``text``
    has. For metrics: ``unsupported_number_rate`` (answer against cited passages) and
    ``evidence_recall`` (gold answer against retrieved passages)."""
    figures = extract_figures(text)
    texts = list(passages)
    extracted = [(p, extract_figures(p)) for p in texts]
    missing = [f for f in figures if not any(find_figure(f, p, figures=fs) for p, fs in extracted)]
    return missing, len(figures)
