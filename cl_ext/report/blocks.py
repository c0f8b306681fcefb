"""The report's blocks (text, tables, code, figures, sections) and how values are formatted.

Accuracies are fractions in metrics.json; reports show percentages, and forgetting in
percentage points.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cl_ext.report.runs import RunData

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

DPI = 100


def fmt_pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage without the sign: 0.8480 -> '84.80'; None -> '–'."""
    return "–" if value is None else f"{100 * value:.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(value: Any) -> str:
    """Plugin summary values: 4 significant digits, short lists in full, long ones counted."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) <= 4 and all(not isinstance(v, (list, dict)) for v in value):
            return "[" + ", ".join(fmt_value(v) for v in value) + "]"
        return f"({len(value)} values)"
    return str(value)


@dataclass
class Text:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells to emphasise


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Figure:
    """A figure, drawn when first needed; ``panels`` describe the W&B panels showing the same data."""

    name: str
    title: str
    draw: Callable[[], MplFigure]
    caption: str = ""
    panels: list[dict[str, Any]] = field(default_factory=list)
    _png: bytes | None = field(default=None, repr=False)

    @property
    def png(self) -> bytes:
        if self._png is None:
            buffer = io.BytesIO()
            self.draw().savefig(buffer, format="png", dpi=DPI)
            self._png = buffer.getvalue()
        return self._png


Block = Text | Table | Code | Figure


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block]
    runs: list[RunData]
    level: int = 2


@dataclass
class Report:
    title: str
    sections: list[Section]
    runs: list[RunData]
    created: str = field(default_factory=lambda: datetime.now().isoformat(sep=" ", timespec="seconds"))

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


_NUMBER = re.compile(r"^[-+–]?\d[\d.,]*( ?%| s| min \d+ s| h \d+ min)?$|^–$|^\d+ of \d+$|^\d+/\d+$")


def text_columns(table: Table) -> set[int]:
    """Columns holding words rather than numbers: aligned left, numbers right."""
    return {
        j
        for j in range(len(table.columns))
        if j == 0 or any(row[j] and not _NUMBER.match(row[j]) for row in table.rows)
    }
