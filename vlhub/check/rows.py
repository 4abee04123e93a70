"""A check's rows, its table, and the files it writes (``check.json``, ``check.md``)."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException

OK, FAIL, UNTESTED, INFO = "ok", "FAIL", "untested here", "info"


@dataclass
class Row:
    """One line of the table: what was checked, its outcome, and what was measured."""

    section: str  # correctness | speed | environment
    name: str
    status: str  # ok | FAIL | untested here | info
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # the numbers behind ``detail``, for check.json
    seconds: float = 0.0


def run_row(section: str, name: str, check: Callable[[], tuple[str, str, dict[str, Any]]]) -> Row:
    """``check()``'s row, timed; an exception is this row's failure, with its one-line reason, and the
    check goes on with the next row."""
    start = time.perf_counter()
    try:
        status, detail, values = check()
    except Exception as raised:  # any failure of the machine or the library is a row, not a crash
        error = raised
        while isinstance(error, InstantiationException) and error.__cause__ is not None:
            error = error.__cause__  # the component's own error, not Hydra's wrapper
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        status, detail = FAIL, f"{type(error).__name__}: {reason}"[:300]
        values = {"traceback": traceback.format_exception(raised)}  # in check.json, for a bug report
    return Row(section, name, status, detail, values, round(time.perf_counter() - start, 2))


def format_table(rows: list[Row]) -> str:
    headers = ("section", "check", "status", "time", "detail")
    cells = [(r.section, r.name, r.status, f"{r.seconds:.1f}s", r.detail) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers[:4])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers[:4], widths)) + "  " + headers[4]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell[:4], widths)) + "  " + cell[4] for cell in cells]
    return "\n".join(lines)


def format_markdown(rows: list[Row], header: dict[str, Any]) -> str:
    lines = [f"# vlhub check: {'ok' if passed(rows) else 'FAILED'}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "| section | check | status | time | detail |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.section} | {r.name} | {r.status} | {r.seconds:.1f}s | {r.detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def passed(rows: list[Row]) -> bool:
    return all(r.status != FAIL for r in rows)


def failed_names(rows: list[Row]) -> list[str]:
    return [r.name for r in rows if r.status == FAIL]


def write_report(folder: Path, rows: list[Row], header: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    report = {**header, "ok": passed(rows), "failed": failed_names(rows), "rows": [asdict(r) for r in rows]}
    (folder / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "check.md").write_text(format_markdown(rows, header))
