"""The benchmark's table: each figure's median and min..max over the runs, next to its baseline's."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

TARGET = re.compile(r"([≥≤])\s*([\d,.]+)\s*(x|\w+)?")
"""A target: `≥0.8x` (a ratio to the baseline), `≤50 ms`, `≥10,000` (in the row's unit)."""


@dataclass
class Row:
    """One measured figure and the baseline measured beside it in the same runs."""

    name: str
    unit: str
    baseline: str = ""
    target: str = ""
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    note: str = ""
    worst: bool = False
    """Judge the target on the worst run instead of the median: a bound that must hold every time."""

    def ratio(self) -> str:
        if not self.samples or not self.baseline_samples:
            return ""
        base = statistics.median(self.baseline_samples)
        return f"{statistics.median(self.samples) / base:.2f}x" if base else ""

    def verdict(self) -> str:
        """`pass` or `FAIL` against the target; "" without a target or samples."""
        found = TARGET.fullmatch(self.target.strip())
        if not found or not self.samples:
            return ""
        sign, bound = found[1], float(found[2].replace(",", ""))
        if found[3] == "x":
            value = float(self.ratio().rstrip("x") or "nan")
        elif self.worst:
            value = min(self.samples) if sign == "≥" else max(self.samples)
        else:
            value = statistics.median(self.samples)
        met = value >= bound if sign == "≥" else value <= bound
        return "pass" if met else "FAIL"


def number(value: float) -> str:
    """Three significant figures or so, without scientific notation."""
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if size >= 0.1 or value == 0 else f"{value:.3f}"


def spread(samples: list[float]) -> tuple[str, str]:
    if not samples:
        return "", ""
    return number(statistics.median(samples)), f"{number(min(samples))}..{number(max(samples))}"


HEADER: tuple[str, ...] = ("measurement", "unit", "median", "min..max", "baseline (same run)", "median", "min..max")
HEADER += ("ratio", "target", "met")


def cells(row: Row) -> tuple[str, ...]:
    if not row.samples:
        return (row.name, row.unit, "skipped", "", "(see notes)" if row.note else "", "", "", "", row.target, "")
    return (
        row.name,
        row.unit,
        *spread(row.samples),
        row.baseline,
        *spread(row.baseline_samples),
        row.ratio(),
        row.target,
        row.verdict(),
    )


def table(sections: dict[str, list[Row]]) -> str:
    """One table, a title line before each section's rows, then the rows' notes."""
    rows = [row for section in sections.values() for row in section]
    widths = [max(len(line[column]) for line in [HEADER, *map(cells, rows)]) for column in range(len(HEADER))]
    text = [_line(HEADER, widths), "  ".join("-" * width for width in widths)]
    for title, section in sections.items():
        text += [title, *(_line(cells(row), widths) for row in section)]
    notes = [f"  {row.name}: {row.note.strip()}" for row in rows if row.note]
    return "\n".join(text + (["", "notes:", *notes] if notes else []))


def _line(values: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)).rstrip()
