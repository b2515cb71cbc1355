"""Renderers of `prelock cache` reports: aligned or rich table, terse CSV rows, and JSON.

They only format a Report that prelock.cache.collect built. The table and terse rows
escape undecodable bytes and control characters in paths and process names, so a row
never spans lines. JSON gives a path as text, plus its exact bytes in hex when the
text cannot show them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import unicodedata
from dataclasses import asdict

from prelock.cache import CacheRecord, ProcessRef, Report, SumRow, pluralize
from prelock.units import format_size

TABLE_COLUMNS = ("Name", "Size", "Pages", "Cached", "Percent", "Locked", "Dirty", "Evicted", "Recent", "Processes")
TERSE_COLUMNS = ("name", "size_bytes", "pages", "cached_pages", "percent", "locked_pages", "dirty_pages",
                 "evicted_pages", "recently_evicted_pages", "processes", "error")
_LEFT_ALIGNED = {"Name", "Processes"}

# The Processes cell names the first process and counts the others ("containerd+12"),
# so that a table of basenames (--bname) stays under 100 columns.
PROCESSES_CELL_WIDTH = 15

NOT_AVAILABLE = "-"  # not measured by this backend, or needs root (Locked)
UNKNOWN = "?"        # the kernel hides residency from this caller


def printable(text: str) -> str:
    """Return text safe to print: undecodable bytes and control characters as escapes."""
    decoded = os.fsencode(text).decode("utf-8", "backslashreplace")
    if decoded.isprintable():
        return decoded
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in decoded)


def display_name(path: str, bname: bool) -> str:
    return printable(os.path.basename(path) if bname else path)


def table_rows(report: Report, human: bool, bname: bool) -> list[list[str]]:
    """Return the table cells: one row per file, then the Sum row; the header is TABLE_COLUMNS."""
    rows = [_record_cells(record, human, bname) for record in report.files]
    rows.append(_sum_cells(report.sum, human))
    return rows


def _record_cells(record: CacheRecord, human: bool, bname: bool) -> list[str]:
    residency_cell = UNKNOWN if record.size_bytes is not None else NOT_AVAILABLE
    cached = _count(record.cached_pages, residency_cell)
    percent = residency_cell if record.cached_pages is None else _percent(record.percent)
    return [
        display_name(record.path, bname),
        _size(record.size_bytes, human),
        _count(record.pages),
        cached,
        percent,
        _count(record.locked_pages),
        _count(record.dirty_pages),
        _count(record.evicted_pages),
        _count(record.recently_evicted_pages),
        _processes_cell(record.processes),
    ]


def _sum_cells(total: SumRow, human: bool) -> list[str]:
    return [
        "Sum",
        _size(total.size_bytes, human),
        _count(total.pages),
        _count(total.cached_pages),
        _percent(total.percent),
        _count(total.locked_pages),
        _count(total.dirty_pages),
        _count(total.evicted_pages),
        _count(total.recently_evicted_pages),
        f"{total.processes} {pluralize(total.processes, 'process', 'processes')}",
    ]


def _size(size_bytes: int | None, human: bool) -> str:
    if size_bytes is None:
        return NOT_AVAILABLE
    return format_size(size_bytes) if human else str(size_bytes)


def _count(value: int | None, missing: str = NOT_AVAILABLE) -> str:
    return missing if value is None else str(value)


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.3f}"


def _processes_cell(processes: tuple[ProcessRef, ...]) -> str:
    if not processes:
        return ""
    suffix = f"+{len(processes) - 1}" if len(processes) > 1 else ""
    comm = printable(processes[0].comm)[:PROCESSES_CELL_WIDTH - len(suffix)]
    return comm + suffix


def render_plain_table(report: Report, human: bool = False, bname: bool = False, header: bool = True) -> str:
    """Render the report as aligned text: scope line, header, rows, Sum row, then notes."""
    rows = table_rows(report, human, bname)
    widths = _column_widths(rows)
    lines = [report.scope.description] if header else []
    if header:
        lines.append(_align(list(TABLE_COLUMNS), widths))
    lines.extend(_align(row, widths) for row in rows)
    lines.extend(render_notes(report))
    return "\n".join(lines) + "\n"


def _column_widths(rows: list[list[str]]) -> list[int]:
    return [max(len(row[index]) for row in [list(TABLE_COLUMNS), *rows]) for index in range(len(TABLE_COLUMNS))]


def _align(cells: list[str], widths: list[int]) -> str:
    aligned = [cell.ljust(width) if name in _LEFT_ALIGNED else cell.rjust(width)
               for cell, width, name in zip(cells, widths, TABLE_COLUMNS)]
    return " ".join(aligned).rstrip()


def render_rich_table(report: Report, console, human: bool = False, bname: bool = False,
                      header: bool = True) -> None:
    """Print the report as a rich table, for a terminal; the columns match the plain table."""
    # rich is imported here because only terminal output needs it and it is slow to import.
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = table_rows(report, human, bname)
    widths = _column_widths(rows)
    # SIMPLE_HEAD separates columns with one space, so the cells need no padding.
    table = Table(box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False, padding=0)
    for name, width in zip(TABLE_COLUMNS, widths):
        if name in _LEFT_ALIGNED:
            # Only Name and Processes shrink on a narrow terminal; numbers are never cut.
            table.add_column(name, overflow="fold" if name == "Name" else "ellipsis", ratio=1,
                             min_width=min(width, 16))
        else:
            table.add_column(name, justify="right", no_wrap=True, min_width=width)
    for row in rows[:-1]:
        table.add_row(*(Text(cell) for cell in row))
    table.add_section()
    table.add_row(*(Text(cell, style="bold") for cell in rows[-1]))

    if header:
        console.print(Text(report.scope.description))
    console.print(table)
    for note in render_notes(report):
        console.print(Text(note))


def render_notes(report: Report, max_names: int = 3) -> list[str]:
    """Return one line per distinct error reason, with how many files have it and a few names."""
    by_reason: dict[str, list[str]] = {}
    for record in report.files:
        if record.error is not None:
            by_reason.setdefault(record.error, []).append(printable(record.path))
    lines = []
    for reason, paths in by_reason.items():
        names = ", ".join(paths[:max_names]) + (", ..." if len(paths) > max_names else "")
        lines.append(f"{len(paths)} {pluralize(len(paths), 'file', 'files')} not measured ({reason}): {names}")
    return lines


def render_terse(report: Report, bname: bool = False, header: bool = True) -> str:
    """Render comma-separated rows, quoted where needed, with sizes in bytes and no Sum row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(TERSE_COLUMNS)
    for record in report.files:
        writer.writerow([
            display_name(record.path, bname),
            _blank(record.size_bytes), _blank(record.pages), _blank(record.cached_pages),
            "" if record.percent is None else f"{record.percent:.3f}",
            _blank(record.locked_pages), _blank(record.dirty_pages), _blank(record.evicted_pages),
            _blank(record.recently_evicted_pages),
            ";".join(f"{process.pid}:{printable(process.comm)}" for process in record.processes),
            record.error or "",
        ])
    return out.getvalue()


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)


def report_to_dict(report: Report) -> dict:
    """Return the report as JSON-ready data: sizes in bytes, counts in pages of page_size."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.time_unix_s)),
        "page_size": report.page_size,
        "backend": report.backend,
        "scope": asdict(report.scope),
        "files": [_record_dict(record) for record in report.files],
        "sum": _rounded_percent(asdict(report.sum)),
    }


def path_fields(path: str) -> dict[str, str]:
    """Return the JSON fields of a path: "path", and "path_bytes_hex" when the text is not exact.

    "path" is the name decoded as UTF-8, with U+FFFD for bytes that do not decode.
    "path_bytes_hex" contains the exact bytes of the name, and is present only when the
    name is not valid UTF-8 or contains control characters (such as a newline), which
    line-based tools that read "path" would mangle.
    """
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "replace")
    fields = {"path": text}
    has_control = any(unicodedata.category(char) == "Cc" for char in text)
    if has_control or not _is_utf8(raw):
        fields["path_bytes_hex"] = raw.hex()
    return fields


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _record_dict(record: CacheRecord) -> dict:
    return _rounded_percent({
        **path_fields(record.path),
        "size_bytes": record.size_bytes,
        "pages": record.pages,
        "cached_pages": record.cached_pages,
        "percent": record.percent,
        "locked_pages": record.locked_pages,
        "dirty_pages": record.dirty_pages,
        "evicted_pages": record.evicted_pages,
        "recently_evicted_pages": record.recently_evicted_pages,
        "processes": [{"pid": process.pid, "comm": printable(process.comm)} for process in record.processes],
        "error": record.error,
    })


def _rounded_percent(values: dict) -> dict:
    if values["percent"] is not None:
        values["percent"] = round(values["percent"], 3)
    return values


def render_json(report: Report, indent: int | None = 2) -> str:
    # allow_nan=False makes a NaN or infinity fail here instead of producing invalid JSON.
    return json.dumps(report_to_dict(report), indent=indent, allow_nan=False) + "\n"
