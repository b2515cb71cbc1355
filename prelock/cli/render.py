"""Table output shared by the commands: rich on a terminal, aligned plain text otherwise."""

from __future__ import annotations

import sys
from typing import Sequence

import click


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: set[int] = frozenset(),
                header: bool = True) -> None:
    """Print rows under headers; columns whose index is in numeric are right-aligned."""
    if sys.stdout.isatty():
        _print_rich(headers, rows, numeric, header)
    else:
        _print_plain(headers, rows, numeric, header)


def _print_rich(headers, rows, numeric, header) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_header=header, pad_edge=False)
    for index, name in enumerate(headers):
        table.add_column(name, justify="right" if index in numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)


def _print_plain(headers, rows, numeric, header) -> None:
    cells = [[str(cell) for cell in row] for row in rows]
    all_rows = ([list(headers)] if header else []) + cells
    widths = [max((len(row[i]) for row in all_rows), default=0) for i in range(len(headers))]
    for row in all_rows:
        parts = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        click.echo("  ".join(parts).rstrip())
