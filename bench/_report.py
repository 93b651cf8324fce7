"""One table for every benchmark: figure, baseline measured in the same run, ratio, target.

``ratio`` is always figure ÷ baseline; the target says which way is good (≤ for times and
memory, ≥ for rates).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Row:
    benchmark: str
    measure: str
    figure: float
    baseline: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.figure / self.baseline if self.baseline else float("inf")


def at_most(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f"≤ {limit:g}×", lambda ratio: ratio <= limit


def at_least(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f"≥ {limit:g}×", lambda ratio: ratio >= limit


def row(benchmark: str, measure: str, figure: float, baseline: float, unit: str,
        target: tuple[str, Callable[[float], bool]] | None = None, note: str = "") -> Row:
    """A row whose target applies to the ratio."""
    ratio = figure / baseline if baseline else float("inf")
    label, check = target if target is not None else ("", None)
    return Row(benchmark, measure, figure, baseline, unit, label, None if check is None else check(ratio), note)


def _number(value: float, unit: str) -> str:
    if unit in {"s", "ms"}:
        text = f"{value:.2f}" if value < 100 else f"{value:.0f}"
    elif value >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
    return f"{text} {unit}".rstrip()


def format_table(rows: Sequence[Row]) -> str:
    header = ("benchmark", "measure", "figure", "baseline", "ratio", "target", "met")
    lines = [header]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        lines.append((r.benchmark, r.measure, _number(r.figure, r.unit), _number(r.baseline, r.unit),
                      f"{r.ratio:.2f}×", r.target, met))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 3, 4}
    out = []
    for index, line in enumerate(lines):
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    notes = [f"  {r.benchmark} / {r.measure}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["notes:", *notes] if notes else []))


# Every row printed in this process, so that ``python -m bench all`` can end with one table.
REPORTED: list[Row] = []


def print_table(rows: Sequence[Row]) -> None:
    REPORTED.extend(rows)
    print(format_table(rows), flush=True)


def load_line() -> str:
    """The machine's load when the run ends: figures on a busy 2-core box are noisy."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPUs"


def best(values: Sequence[float]) -> float:
    return min(values)


def spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return ""
    return f"min {min(values):.2f}, median {statistics.median(values):.2f}, max {max(values):.2f}"
