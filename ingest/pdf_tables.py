"""Tables on PDF pages, found from pdfium's character positions, as rows that keep their headers.

    page text ─ looks_tabular? ─ no ─► the page text as it is (no extra cost)
                     │ yes
                     ▼
    characters with boxes ─► words ─► lines ─► cells (split at wide gaps)
      ─► data rows (a label and numbers in columns) ─► blocks of rows ─► columns (numbers'
         right edges) ─► headers (the lines above, over the columns) ─► caption and units

Each row becomes one line that names what its figures are::

    Total net sales | Three Months Ended July 1, 2023: 81,797 | June 25, 2022: 82,959 (in millions)

(a column header that spans several columns is said once per row, where it starts). Why not
pdfplumber: measured on the shared 10-Q filings it takes about 0.19 s a page (pdfminer lays
out every character again) against about 0.01 s here, and its tables there leave out the column
headers ("Three Months Ended / July 1, 2023"), which are the point. Financial statements are
mostly ruled only under their headers, so the layout, not the ruling, tells the columns.

The cheap test :func:`looks_tabular` runs on the page text the parser already has; only a page
with several lines ending in two or more numbers pays for the character pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ingest.tables import TableStyle, header_text, row_line, units_in

# minus sign, en dash and em dash spelled out: a dash alone is how filings write a nil figure
_DASHES = "\u2212\u2013\u2014"
_NUMBER = re.compile(
    rf"\(?[-{_DASHES}]?[$€£]?\s?\d[\d,]*(?:\.\d+)?\)?%?|[-{_DASHES}]{{1,2}}|\$|%|\)"
)
_TOKEN_FIGURE = re.compile(rf"\(?\$?\d[\d,]*(?:\.\d+)?\)?%?|[{_DASHES}]")
_FIGURE_ENDS = frozenset("0123456789)%" + _DASHES)
_SPACED_CLOSE = re.compile(r"\s+([)%])")
_DOLLAR_EDGE = re.compile(r"^\$\s*|\s*\$$")
_YEAR = re.compile(r"(?:19|20)\d\d")
_MIN_ROWS = 2
_MAX_HEADER_LINES = 6
_MAX_CAPTION_LINES = 3
_MAX_CAPTION_CHARS = 160
_MAX_HEADER_CELL = 60


def looks_tabular(page_text: str, min_lines: int = 3) -> bool:
    """Whether the page text has at least ``min_lines`` lines ending in two or more figures
    ("Total net sales $ 81,797 $ 82,959"). Token by token from each line's end, no
    backtracking regular expression: this runs on every page of every PDF."""
    count = 0
    for line in page_text.split("\n"):
        line = line.rstrip()
        if not line or line[-1] not in _FIGURE_ENDS:
            continue
        figures = 0
        for token in reversed(line.split()):
            if token in ("$", "%"):
                continue
            if not _TOKEN_FIGURE.fullmatch(token):
                break
            figures += 1
            if figures >= 2:
                count += 1
                if count >= min_lines:
                    return True
                break
    return False


@dataclass
class _Cell:
    text: str
    x0: float
    x1: float

    @property
    def numeric(self) -> bool:
        return _NUMBER.fullmatch(self.text.strip()) is not None


@dataclass
class _Line:
    top: float
    bottom: float
    cells: list[_Cell] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(c.text for c in self.cells)

    def values(self) -> list[_Cell]:
        return [c for c in self.cells if c.numeric and c.text.strip() not in ("$", "%", ")")]

    @property
    def is_row(self) -> bool:
        values = self.values()
        if not values or all(_YEAR.fullmatch(v.text.strip()) for v in values):
            return False  # nothing, or a header line of years
        labels = [c for c in self.cells if not c.numeric]
        # a label first, then only figures; or figures alone (a total line)
        if labels and (labels[0] is not self.cells[0] or len(labels) > 1):
            return False
        return len(values) >= (1 if labels else 2)


@dataclass(frozen=True)
class Table:
    """One table found on a page: ``header`` (caption, units and column headers) and one line
    per row; ``top``/``bottom`` bound it in PDF points (origin at the page's bottom)."""

    header: str
    rows: list[str]
    top: float
    bottom: float


def _words(textpage: Any) -> list[tuple[str, float, float, float, float]]:
    """(text, left, bottom, right, top) of each run of adjacent visible characters."""
    count = textpage.count_chars()
    if count <= 0:
        return []
    text = textpage.get_text_range(0, count)
    words: list[tuple[str, float, float, float, float]] = []
    chars: list[str] = []
    box = [0.0, 0.0, 0.0, 0.0]
    last_right = 0.0

    def flush() -> None:
        if chars:
            words.append(("".join(chars), box[0], box[1], box[2], box[3]))
            chars.clear()

    for i in range(min(count, len(text))):
        ch = text[i]
        if ch.isspace() or ch in "\x00\x02\ufffe":
            flush()
            continue
        left, bottom, right, top = textpage.get_charbox(i, loose=True)
        if right <= left and top <= bottom:
            flush()
            continue
        height = max(top - bottom, box[3] - box[1] if chars else 0.0, 1.0)
        # Punctuation has small boxes of its own (a comma sits below the line's middle).
        allowed = 0.8 if chars and not chars[-1].isalnum() else 0.35
        if chars and (
            left - last_right > allowed * height
            or left < box[0] - 1
            or (ch.isalnum() and min(top, box[3]) - max(bottom, box[1]) < 0.3 * height)
        ):
            flush()
        if not chars:
            box = [left, bottom, right, top]
        else:
            box = [min(box[0], left), min(box[1], bottom), max(box[2], right), max(box[3], top)]
        chars.append(ch)
        last_right = right
    flush()
    return words


def _lines(words: list[tuple[str, float, float, float, float]]) -> list[_Line]:
    """Words into lines (top to bottom) by vertical centre, then into cells at wide gaps."""
    ordered = sorted(words, key=lambda w: -(w[2] + w[4]) / 2)
    rows: list[list[tuple[str, float, float, float, float]]] = []
    for word in ordered:
        centre = (word[2] + word[4]) / 2
        if rows:
            current = rows[-1]
            bottom = min(w[2] for w in current)
            top = max(w[4] for w in current)
            if bottom <= centre <= top:
                current.append(word)
                continue
        rows.append([word])
    lines: list[_Line] = []
    for row in rows:
        row.sort(key=lambda w: w[1])
        height = max(w[4] - w[2] for w in row)
        line = _Line(top=max(w[4] for w in row), bottom=min(w[2] for w in row))
        for text, left, _, right, _ in row:
            previous = line.cells[-1] if line.cells else None
            gap = left - previous.x1 if previous is not None else 0.0
            if previous is not None and gap < max(4.0, 0.9 * height):
                previous.text += " " + text
                previous.x1 = max(previous.x1, right)
            else:
                line.cells.append(_Cell(text, left, right))
        _merge_signs(line)
        lines.append(line)
    return lines


def _merge_signs(line: _Line) -> None:
    """Keep a lone "$" with the figure after it and a lone "%" or ")" with the one before."""
    cells: list[_Cell] = []
    pending: _Cell | None = None
    for cell in line.cells:
        text = _SPACED_CLOSE.sub(r"\1", cell.text.strip())
        bare = _DOLLAR_EDGE.sub("", text)
        if bare and bare != text and _NUMBER.fullmatch(bare):
            text = bare  # "(3,844) $" or "$ 3,172": the sign says nothing a row needs
        cell = _Cell(text, cell.x0, cell.x1)
        if text == "$":
            pending = cell
            continue
        if text in ("%", ")") and cells and cells[-1].numeric:
            cells[-1] = _Cell(cells[-1].text + text, cells[-1].x0, cell.x1)
            continue
        if pending is not None:
            cell = _Cell(cell.text, cell.x0, cell.x1) if cell.numeric else cell
            pending = None
        cells.append(cell)
    line.cells = cells


def _columns(rows: list[_Line]) -> list[tuple[float, float]]:
    """Column extents (left, right) from the figures' right edges (figures align right)."""
    edges = sorted((c.x1, c.x0) for row in rows for c in row.values())
    columns: list[list[tuple[float, float]]] = []
    for right, left in edges:
        if columns and right - columns[-1][-1][0] <= 8.0:
            columns[-1].append((right, left))
        else:
            columns.append([(right, left)])
    return [(min(left for _, left in col), max(right for right, _ in col)) for col in columns]


def _column_of(cell: _Cell, columns: list[tuple[float, float]]) -> int:
    return min(range(len(columns)), key=lambda i: abs(columns[i][1] - cell.x1))


def _overlaps(cell: _Cell, column: tuple[float, float], slack: float = 3.0) -> bool:
    return cell.x0 <= column[1] + slack and cell.x1 >= column[0] - slack


def _headers(lines: list[_Line], columns: list[tuple[float, float]]) -> list[str]:
    """Each column's header, its header lines' cells above it joined top to bottom. Read from
    the bottom up, a cell widens the columns it names, so that a spanning header centred over
    two columns ("Three Months Ended" over "July 1, 2023" and "June 25, 2022") names both."""
    extents = list(columns)
    names: list[list[str]] = [[] for _ in columns]
    for line in reversed(lines):
        for cell in line.cells:
            hits = [i for i, column in enumerate(extents) if _overlaps(cell, column)]
            for i in hits:
                names[i].insert(0, cell.text.strip())
                extents[i] = (min(extents[i][0], cell.x0), max(extents[i][1], cell.x1))
    return [" ".join(n) for n in names]


def _table(lines: list[_Line], start: int, end: int, style: TableStyle) -> Table | None:
    """The table whose rows are ``lines[start:end]``, with headers and caption from above."""
    body = lines[start:end]
    data = [line for line in body if line.is_row]
    if len(data) < _MIN_ROWS:
        return None
    columns = _columns(data)
    if not columns:
        return None
    figures_left = min(left for left, _ in columns)
    # Header lines: just above the rows, every cell over the figures' columns.
    h = start
    while h > 0 and start - h < _MAX_HEADER_LINES:
        line = lines[h - 1]
        over = [c.x0 >= figures_left - 40 for c in line.cells]
        # a line may start with a label ("ASSETS:  2023  2022") and still head the columns
        if line.is_row or not all(over[1:]) or not (over[0] or len(over) > 1):
            break
        if any(c.numeric and not _YEAR.fullmatch(c.text.strip()) for c in line.cells):
            break  # figures that did not make a row: not a header
        if any(len(c.text) > _MAX_HEADER_CELL for c in line.cells):
            break  # prose above the table
        h -= 1
    # "(In millions, except per share amounts)" may stand among the header lines, centred or
    # beside a column header: it gives the table's unit and names no column.
    header_lines: list[_Line] = []
    units = None
    for line in lines[h:start]:
        stated = [c for c in line.cells if units_in(c.text)]
        if stated:
            units = units or units_in(*(c.text for c in stated))
            line = _Line(line.top, line.bottom, [c for c in line.cells if c not in stated])
        header_lines.append(line)
    headers = _headers(header_lines, columns)
    caption_lines: list[str] = []
    for line in reversed(lines[max(0, h - _MAX_CAPTION_LINES) : h]):
        if line.is_row:
            break
        text = line.text.strip()
        found = units_in(text)
        if found:
            units = units or found
            # "(In millions, except number of shares ...)" says only the unit: the header
            # carries that as "(in millions)"
            if len(text) < 120 and not text.startswith("("):
                caption_lines.insert(0, text)
            continue
        if len(text) > _MAX_CAPTION_CHARS or text.endswith("."):
            break
        if sum(len(c) + 1 for c in caption_lines) + len(text) > _MAX_CAPTION_CHARS:
            break
        caption_lines.insert(0, text)
    if units is None:
        units = units_in(*headers)
    rows: list[str] = []
    group, group_x = "", 0.0
    for line in body:
        if not line.is_row:
            label = line.text.strip()
            group, group_x = (label, line.cells[0].x0) if label.endswith(":") else ("", 0.0)
            continue
        label_cells = [c for c in line.cells if not c.numeric]
        label = label_cells[0].text.strip() if label_cells else ""
        # a group label ("Operating expenses:") names the rows indented under it
        if group and label and label_cells[0].x0 > group_x + 2:
            label = f"{group} {label}"
        elif label_cells:
            group = ""
        values: dict[int, str] = {}
        for cell in line.values():
            column = _column_of(cell, columns)
            values[column] = (
                f"{values[column]} {cell.text.strip()}".strip()
                if column in values
                else cell.text.strip()
            )
        cells = [(headers[i], values.get(i, "")) for i in range(len(columns))]
        rows.append(row_line(label, cells, units, style))
    top = lines[h].top if h < start else body[0].top
    header = header_text(" ".join(caption_lines), headers, units, style)
    return Table(header=header, rows=rows, top=top, bottom=body[-1].bottom)


def find_tables(textpage: Any, style: TableStyle = "labelled") -> list[Table]:
    """The tables on one page (a pypdfium2 ``PdfTextPage``), top to bottom."""
    lines = _lines(_words(textpage))
    tables: list[Table] = []
    i = 0
    while i < len(lines):
        if not lines[i].is_row:
            i += 1
            continue
        # a block: rows, with short label lines ("Operating expenses:") between them
        j = i
        last_row = i
        while j < len(lines):
            line = lines[j]
            if line.is_row:
                last_row = j
            elif not (len(line.cells) == 1 and len(line.text) <= 80 and j - last_row <= 2):
                break
            j += 1
        # label lines just above the first row belong to the block ("ASSETS:", "Net sales:")
        start = i
        while start > 0 and i - start < 2:
            above = lines[start - 1]
            label = above.text.strip()
            if len(above.cells) != 1 or not (label.endswith(":") or len(label.split()) <= 2):
                break
            start -= 1
        table = _table(lines, start, last_row + 1, style)
        if table is not None:
            tables.append(table)
        i = last_row + 1
    return tables
