"""How a table is written into the text that is chunked and embedded: one line per row that
names what each figure is, under a header of caption, column names and units.

    header  CONDENSED CONSOLIDATED STATEMENTS OF OPERATIONS (Unaudited) (in millions)
    row     Total net sales | Three Months Ended July 1, 2023: 81,797 |
            June 25, 2022: 82,959 (in millions)          (one line)

A figure torn from its row and column means nothing to the model or the claim verifier; a row
written like this keeps its meaning in any chunk. A header that spans columns ("Three Months
Ended") is said once per row, where it starts. The chunker repeats the header at the top of
every chunk of a table and never splits a row (see :mod:`ingest.chunking`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from appliance.core.protocols import Section

TableStyle = Literal["labelled", "compact"]
"""labelled: every figure says its column (``Total | Q3 2023: 81,797 | Q3 2022: 82,959``);
compact: figures in column order under a header line that names the columns once per chunk
(``Total | 81,797 | 82,959``), which fits about twice the rows in a chunk."""

_UNITS = re.compile(r"\bin (thousands|millions|billions)\b", re.IGNORECASE)


def units_in(*texts: str) -> str | None:
    """ "in millions" (or thousands, billions) where one of the texts states a table unit."""
    for text in texts:
        found = _UNITS.search(text)
        if found:
            return f"in {found.group(1).lower()}"
    return None


def _prefixes(name: str) -> set[str]:
    words = name.split()
    return {" ".join(words[:i]) for i in range(2, len(words))}


def row_line(
    label: str,
    cells: Sequence[tuple[str, str]],
    units: str | None,
    style: TableStyle = "labelled",
) -> str:
    """One row: ``cells`` are (column name, value) in column order, a value empty where the
    row has none. labelled: ``label | header: value | ... (units)``, a value without a header
    written alone, and the part of a header already said in this row ("Three Months Ended")
    not repeated. compact: ``label | value | ...`` with "-" for an empty value."""
    if style == "compact":
        return " | ".join([label, *(value or "-" for _, value in cells)])
    parts = [label] if label else []
    said: set[str] = set()
    for name, value in cells:
        if not value:
            continue
        if not name:
            parts.append(value)
            continue
        shared = max((s for s in said if name.startswith(s + " ")), key=len, default="")
        parts.append(f"{name[len(shared) + 1 :] if shared else name}: {value}")
        said |= _prefixes(name)
    return " | ".join(parts) + (f" ({units})" if units else "")


def header_text(
    caption: str,
    column_names: Sequence[str],
    units: str | None,
    style: TableStyle = "labelled",
) -> str:
    """What every chunk of a table repeats. labelled: its caption and units, or, without a
    caption, its column names and units; short on purpose, since every row names its own
    columns and a long header would crowd the rows out of a chunk. compact: the caption and
    units, then the column names in order (the rows' figures follow that order)."""
    names = [n for n in column_names if n]
    if style == "compact":
        first = caption
        if units and units not in first.lower():
            first = f"{first} ({units})" if first else f"({units})"
        lines = [first] if first else []
        if names:
            lines.append(" | ".join(["", *(n or "-" for n in column_names)]).strip())
        return "\n".join(lines)
    text = caption or " | ".join(names)
    if units and units not in text.lower():
        text = f"{text} ({units})" if text else f"({units})"
    return text


def table_section(
    header: str, rows: Sequence[str], page: int | None, heading: str | None
) -> Section | None:
    """A table as a section (None when it has no rows): its header, then a row per line."""
    body = [" ".join(r.split()) for r in rows if r.strip()]
    if not body:
        return None
    text = "\n".join([header, *body]) if header else "\n".join(body)
    return Section(text=text, page=page, heading=heading, header=header)


def grid_table(
    grid: Sequence[Sequence[str]],
    caption: str,
    header_rows: int,
    page: int | None = None,
    heading: str | None = None,
    style: TableStyle = "labelled",
) -> Section | None:
    """A table given as a grid of cell texts (DOCX, HTML): the first ``header_rows`` rows name
    the columns, the first cell of every other row is its label."""
    grid = [[" ".join(c.split()) for c in row] for row in grid]
    grid = [row for row in grid if any(row)]
    if not grid:
        return None
    header_rows = min(header_rows, len(grid) - 1) if len(grid) > 1 else 0
    width = max(len(row) for row in grid)
    names: list[str] = []
    for col in range(width):
        parts: list[str] = []
        for row in grid[:header_rows]:
            cell = row[col] if col < len(row) else ""
            if cell and (not parts or parts[-1] != cell):
                parts.append(cell)
        names.append(" ".join(parts))
    units = units_in(caption, *names)
    rows = []
    for row in grid[header_rows:]:
        values = list(row[1:]) + [""] * (width - len(row))
        rows.append(row_line(row[0], list(zip(names[1:], values, strict=False)), units, style))
    return table_section(header_text(caption, names[1:], units, style), rows, page, heading)
