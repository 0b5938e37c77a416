"""A suite's runs laid out as the paper's table: rows = backbones, columns = the suite's columns.

``python -m transfer.report RUNS --suite NAME`` puts this table first in report.md / report.html, draws it as
``charts/suite_<name>.png`` and, with ``--wandb-report``, as the first section of the W&B Report. Beside the
runs stand the published rows of ``baselines.csv`` for each column's task, protocol and metric (a fine-tune
column also shows the from-scratch rows): a published cell is plain when it was measured the same way as a
run shown in that column (:func:`transfer.compare.assess`), and marked ``†`` otherwise (another head, another
pretraining, or no run in the column to compare with); the task's own section of the report says how.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.baselines import Baseline, baselines_for
from transfer.compare import assess, baseline_protocol, describe_pretraining, lower_is_better
from transfer.io import atomic_path
from transfer.protocols import run_protocol_label
from transfer.suite import SuiteColumn, SuiteConfig
from transfer.tables import html_table, markdown_table

RUN, PUBLISHED = "this suite", "published"
CONTEXT_MARK = "†"
NOT_COMPARABLE_MARK = "*"


@dataclass
class SuiteCell:
    value: float | None = None
    runs: int = 0  # runs found for this backbone and column (the newest is shown)
    failed: bool = False  # the newest run of the column failed (status: failed)
    not_comparable: str = ""  # why a run cannot stand next to published numbers
    context: bool = False  # a published value not measured as a run of the column (or no run to compare)


@dataclass
class SuiteRow:
    name: str
    kind: str  # RUN or PUBLISHED
    detail: str
    source: str
    cells: dict[str, SuiteCell] = field(default_factory=dict)  # column id -> cell


@dataclass
class SuiteTable:
    suite: SuiteConfig
    columns: list[SuiteColumn]
    lower: set[str]  # column ids whose metric is better when lower
    rows: list[SuiteRow]


def shown_in(col: SuiteColumn, b: Baseline) -> bool:
    """Whether published row ``b`` (of the column's task and metric) belongs in column ``col``.

    A column shows the rows of its protocol (``eval`` as ``supervised``), a fine-tune column also the rows trained
    from scratch, and a ``frozen`` column the rows measured on a frozen backbone, which the baselines file
    writes as ``finetune`` with the condition ``freeze_backbone=true``; no other column shows those.
    """
    frozen_row = ("freeze_backbone", "true") in b.conditions
    if col.protocol == "frozen":
        return frozen_row
    from transfer.config import task_adapter
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    schema = TASKS.get(task_adapter(col.task)).protocols.get(col.protocol)
    protocols = {p for pre in ("imagenet1k_supervised", "none") if (p := baseline_protocol(col.protocol, pre, schema))}
    return b.protocol in protocols and not frozen_row


def build_suite_table(found: list[tuple[Path, dict[str, Any]]], suite: SuiteConfig, *,
                      baselines: str | Path | None = None) -> SuiteTable:
    """The table of ``suite`` from the runs ``found`` (oldest first, as :func:`transfer.report.find_results`)."""
    rows: dict[tuple[str, ...], SuiteRow] = {}
    weights: dict[str, set[str]] = {}  # backbone -> weight sources of its runs shown
    details: dict[tuple, dict[str, None]] = {}  # published row -> its pretraining and settings, in order
    sources: dict[tuple, dict[str, None]] = {}
    lower: set[str] = set()
    for col in suite.columns:
        newest: dict[str, tuple[Path, dict]] = {}
        counts: dict[str, int] = {}
        for path, r in found:
            if (r["task"], run_protocol_label(r)) == (col.task, col.protocol):  # a frozen run is not finetune's
                newest[r["backbone"]] = (path, r)
                counts[r["backbone"]] = counts.get(r["backbone"], 0) + 1
        matched: set[tuple] = set()  # published rows measured the same way as a run of this column
        for backbone, (_, r) in newest.items():
            row = rows.setdefault((RUN, backbone), SuiteRow(backbone, RUN, "", ""))
            cell = row.cells[col.id] = SuiteCell(runs=counts[backbone], failed=r.get("status") == "failed")
            weights.setdefault(backbone, set()).add(str((r.get("weights") or {}).get("source") or "unknown"))
            if col.metric not in r["metrics"]:
                continue
            verdict = assess(r, path=baselines)
            cell.value = r["metrics"][col.metric]
            cell.not_comparable = "; ".join(verdict["comparison"]["reasons"])
            matched |= {_identity(x) for x in verdict["baselines"] if x["comparable"]}
            if col.metric in lower_is_better(r):
                lower.add(col.id)
        for b in baselines_for(col.task, metric=col.metric, path=baselines):
            if not shown_in(col, b):
                continue
            # One row per method, arch and pretraining across the columns (a second row only where a column has
            # two numbers of it, e.g. two training lengths), as the papers' tables have them.
            n = 0
            while (key := (PUBLISHED, b.method, b.arch, b.pretrain, str(n))) in rows and col.id in rows[key].cells:
                n += 1
            row = rows.setdefault(key, SuiteRow(f"{b.method} ({b.arch})", PUBLISHED, "", ""))
            identity = (b.method, b.arch, b.pretrain, b.protocol, b.setting, b.conditions_text, b.metric)
            row.cells[col.id] = SuiteCell(value=b.value, context=identity not in matched)
            details.setdefault(key, {}).setdefault(describe_pretraining(b.pretrain), None)
            details[key].setdefault("; ".join(x for x in (b.protocol, b.setting, b.conditions_text) if x), None)
            sources.setdefault(key, {}).setdefault(b.source, None)
    for key, row in rows.items():
        if key[0] == RUN:
            row.detail = "weights: " + ", ".join(sorted(weights[key[1]]))
        else:
            row.detail, row.source = " | ".join(details[key]), "; ".join(sources[key])
    # Runs first, then published rows measured as some run shown, then the rest.
    ordered = sorted(rows.values(), key=lambda r: (r.kind != RUN, r.kind == PUBLISHED and
                                                   all(c.context for c in r.cells.values()), r.name))
    return SuiteTable(suite, list(suite.columns), lower, ordered)


def _identity(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in ("method", "arch", "pretrain", "protocol", "setting", "conditions", "metric"))


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"


def cell_text(cell: SuiteCell | None) -> str:
    if cell is None:
        return "—"
    if cell.value is None:
        return "failed" if cell.failed else "—"
    text = _fmt(cell.value)
    if cell.runs > 1:
        text += f" (newest of {cell.runs})"
    if cell.not_comparable:
        text += f" {NOT_COMPARABLE_MARK}"
    if cell.context:
        text += f" {CONTEXT_MARK}"
    return text


def column_title(table: SuiteTable, col: SuiteColumn) -> str:
    return f"{col.title} ({col.metric}{', lower is better' if col.id in table.lower else ''})"


def rows_of(table: SuiteTable) -> tuple[list[str], list[list[str]]]:
    head = ["backbone / published", "kind", *(column_title(table, c) for c in table.columns), "weights / setting",
            "source"]
    body = [[r.name, r.kind, *(cell_text(r.cells.get(c.id)) for c in table.columns), r.detail, r.source]
            for r in table.rows]
    return head, body


def notes(table: SuiteTable) -> list[str]:
    """The footnotes under the table: where it comes from, what the marks mean, and each run's reasons."""
    s = table.suite
    out = [f"Suite `{s.name}` ({s.path}): {s.title}. Layout: {s.source}.",
           f"Rows: each backbone's newest run of a column ('{RUN}'), then the published numbers of each column's "
           "task, protocol and metric from baselines.csv, one row per method, arch and pretraining. "
           f"{CONTEXT_MARK}: a published value not measured the same way as a run shown in its column, or with no "
           "run to compare (the task's section below says how it differs). "
           f"{NOT_COMPARABLE_MARK}: a run that cannot stand next to published numbers (reasons below). '—': no run; "
           "'failed': the newest run failed."]
    for r in table.rows:
        for col in table.columns:
            cell = r.cells.get(col.id)
            if cell is not None and cell.not_comparable:
                out.append(f"{NOT_COMPARABLE_MARK} {r.name}, {col.title}: {cell.not_comparable}.")
    return out


def to_markdown(table: SuiteTable, chart: str | None) -> str:
    parts = [f"## {table.suite.title or table.suite.name}", "", markdown_table(*rows_of(table)), ""]
    parts += [f"- {n}" for n in notes(table)]
    if chart:
        parts += ["", f"![suite {table.suite.name}]({chart})"]
    return "\n".join(parts) + "\n"


def to_html(table: SuiteTable, chart: Path | None) -> str:
    import base64


    img = ""
    if chart is not None:
        data = base64.b64encode(chart.read_bytes()).decode()
        img = f'<img alt="suite {html.escape(table.suite.name)} chart" src="data:image/png;base64,{data}">'
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(table))
    return (f"<h2>{html.escape(table.suite.title or table.suite.name)}</h2>{html_table(*rows_of(table))}"
            f"<ul>{items}</ul>{img}")


def plot(table: SuiteTable, path: Path) -> Path:
    """One bar panel per column: runs blue (orange when not comparable), published grey (light grey: †)."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state

    cols = [c for c in table.columns if any((cell := r.cells.get(c.id)) and cell.value is not None
                                            for r in table.rows)]
    if not cols:
        cols = table.columns[:1]
    per_row = min(5, len(cols))
    n_rows = -(-len(cols) // per_row)
    tallest = max(1, max(sum(1 for r in table.rows if (x := r.cells.get(c.id)) and x.value is not None)
                         for c in cols))
    fig = Figure(figsize=(4.2 * per_row, n_rows * (1.4 + 0.3 * tallest)), layout="constrained")
    axes = fig.subplots(n_rows, per_row, squeeze=False).ravel()
    for ax in axes[len(cols):]:
        ax.set_axis_off()
    for ax, col in zip(axes, cols):
        bars = [(r, r.cells[col.id]) for r in table.rows if col.id in r.cells and r.cells[col.id].value is not None]

        def colour(row: SuiteRow, cell: SuiteCell) -> str:
            if row.kind == RUN:
                return "tab:orange" if cell.not_comparable else "tab:blue"
            return "0.85" if cell.context else "0.55"
        ys = range(len(bars))
        ax.barh(list(ys), [c.value for _, c in bars], color=[colour(r, c) for r, c in bars])
        ax.set_yticks(list(ys), [r.name + (f" {CONTEXT_MARK}" if c.context else "") for r, c in bars], fontsize=7)
        if bars:
            ax.bar_label(ax.containers[0], fmt="%.3g", fontsize=6, padding=2)
        ax.invert_yaxis()
        ax.set_title(col.title, fontsize=9)
        ax.set_xlabel(col.metric + (" (lower is better)" if col.id in table.lower else ""), fontsize=8)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{table.suite.title or table.suite.name}: runs (blue; orange: not comparable), published "
                 f"(grey; light grey {CONTEXT_MARK}: measured otherwise)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def wandb_blocks(table: SuiteTable, *, entity: str, project: str, wr) -> list:
    """The suite's section of a W&B Report: the table as markdown and one bar plot per column by backbone.

    Each column's run set selects its runs by the flat config keys ``task_name`` / ``protocol_name`` that
    ``transfer.run`` logs; bars are grouped by ``backbone_name``.
    """

    runsets = [wr.Runset(entity=entity, project=project, name=c.id,
                         filters=f"Config('task_name') = '{c.task}' and Config('protocol_name') = '{c.protocol}'")
               for c in table.columns]
    panels = [wr.BarPlot(title=column_title(table, c), metrics=[c.metric], groupby=wr.Config("backbone_name"),
                         groupby_aggfunc="mean", groupby_rangefunc="minmax") for c in table.columns]
    return [wr.H1(table.suite.title or table.suite.name),
            wr.MarkdownBlock(markdown_table(*rows_of(table)) + "\n\n" + "\n".join(f"- {n}" for n in notes(table))),
            wr.PanelGrid(runsets=runsets, panels=panels)]
