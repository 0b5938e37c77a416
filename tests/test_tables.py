"""The one markdown-table writer (transfer.tables)."""
from __future__ import annotations

from transfer.tables import markdown_table, table_head, table_row


def test_a_cell_holding_a_bar_or_a_line_break_stays_in_its_column():
    text = markdown_table(["a", "b"], [["x|y", "two\nlines"], [1, 2.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | two lines |", "| 1 | 2.5 |"]


def test_aligned_columns_are_padded_to_the_widest_cell():
    lines = markdown_table(["task", "top1"], [["digits", "97.50"], ["x", ""]], align=True).splitlines()
    assert lines == ["| task   | top1  |", "|--------|-------|", "| digits | 97.50 |", "| x      |       |"]
    assert len({len(line) for line in lines}) == 1


def test_streamed_rows_match_the_whole_table():
    rows = [["1", "a"], ["2", "b"]]
    assert "\n".join([table_head(["n", "v"]), *map(table_row, rows)]) == markdown_table(["n", "v"], rows)
