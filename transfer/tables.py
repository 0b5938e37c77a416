"""The one markdown-table writer (and its HTML twin for the report page): reports, the run and sweep summaries,
the benchmark sheets and bench scripts.

A cell is written with ``str``; a ``|`` in it is escaped and a line break becomes a space, so a path, an error or a
note can never split a row. ``align=True`` pads every column to its widest cell, for tables read in a terminal.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_row(cells: Iterable[object]) -> str:
    """One row: ``| a | b |``."""
    return "| " + " | ".join(map(_cell, cells)) + " |"


def table_head(head: Sequence[object]) -> str:
    """The header row and its rule (two lines), for a table whose rows are printed as they are measured."""
    return table_row(head) + "\n|" + "---|" * len(head)


def markdown_table(head: Sequence[object], rows: Iterable[Sequence[object]], *, align: bool = False) -> str:
    """``head`` and ``rows`` (one cell per column) as a markdown table, without a trailing newline."""
    if not align:
        return "\n".join([table_head(head), *map(table_row, rows)])
    rows = [[_cell(c) for c in r] for r in rows]
    head = [_cell(c) for c in head]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    pad = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([pad(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(pad, rows)])


def html_table(head: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """``head`` and ``rows`` as an HTML ``<table>``, every cell escaped (the HTML report's tables)."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"
