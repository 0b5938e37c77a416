"""``python -m transfer.report RUNS_DIR [--out DIR]``: one comparison of many runs and the published baselines.

Reads every ``results.json`` under RUNS_DIR (any depth) and writes, to ``--out`` (default RUNS_DIR/report):
``report.md`` (backbones x tasks x protocols, then one section per task with the baselines),
``report.html`` (the same, self-contained: charts inlined) and ``charts/<task>.png``.
``--wandb-report`` also saves a W&B Report with one panel group per task (needs W&B online).
``--suite NAME`` (a suite of ``recipes/suite/``, or a suite YAML file) first lays the runs out as that paper's
table: rows = backbones, columns = the suite's columns, published numbers beside them
(:mod:`transfer.suite_report`), also as ``charts/suite_<name>.png`` and the first section of the W&B Report.

When several runs share task, backbone, weights (their sha256, or their source when there is no file) and protocol,
the newest ``results.json`` is shown and the cell says how many runs there were; runs of one backbone with other
weights are rows of their own, named with the weights' digest. Each run shows its input resolution, and a run that
is not comparable says why in short (random weights, a subset, other splits) and in full in its row.
Published rows are matched to each run by :func:`transfer.compare.assess`:
``published`` rows were measured the same way as at least one run shown, ``context`` rows were not (the
table says how they differ); a run that cannot stand next to published numbers is marked ``(not comparable)``.
"""
from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer import suite_report
from transfer.compare import TABLE_KEY, assess, describe_pretraining, lower_is_better
from transfer.errors import ConfigError, DataError, TransferError
from transfer.io import atomic_path, atomic_write_text
from transfer.protocols import run_protocol_label
from transfer.registry import UnknownNameError
from transfer.results import RESULTS_FILE, read_results
from transfer.suite import SuiteConfig, load_suite
from transfer.suite_report import SuiteTable
from transfer.tables import html_table, markdown_table

log = logging.getLogger("transfer.report")
SUITE = "this suite"
PUBLISHED = "published"
CONTEXT = "context"
NOT_COMPARABLE = "not comparable"


@dataclass
class Column:
    """One protocol and metric of a task: a column of the task's table, a panel of its chart."""

    protocol: str
    metric: str
    lower: bool = False  # a smaller value is better (an error such as depth's test/rms)

    @property
    def title(self) -> str:
        return f"{self.protocol} {self.metric}" + (" (lower is better)" if self.lower else "")


@dataclass
class Entry:
    """A row of a task's table: a backbone run in this suite, or a published baseline."""

    name: str
    kind: str  # SUITE, PUBLISHED (measured as a run shown here) or CONTEXT (measured otherwise)
    detail: str  # weights of a run; protocol, pretraining and setting of a baseline (and how it differs)
    source: str  # results.json of a run; paper/table of a baseline
    values: dict[tuple[str, str], float] = field(default_factory=dict)  # (protocol, metric) -> value
    runs: dict[str, int] = field(default_factory=dict)  # protocol -> number of runs found
    not_comparable: dict[str, str] = field(default_factory=dict)  # protocol -> why that run is not comparable
    marks: dict[str, list[str]] = field(default_factory=dict)  # protocol -> short reasons (random weights, subset)
    resolution: dict[str, Any] = field(default_factory=dict)  # protocol -> input resolution of that run
    # A run row's values may come from several results.json (one per protocol): each protocol's weights and file.
    weights_by: dict[str, str] = field(default_factory=dict)  # protocol -> weights of the run shown
    source_by: dict[str, str] = field(default_factory=dict)  # protocol -> its results.json


@dataclass
class TaskComparison:
    task: str
    columns: list[Column]
    entries: list[Entry]


def find_results(runs_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every results.json under ``runs_dir``, read and checked, oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise DataError(f"runs directory {str(root)!r} does not exist. Pass the run.root of your runs "
                        "(default: runs/), laid out as <root>/<task>/<backbone>-<protocol>/<stamp>/results.json.")
    paths = sorted(root.rglob(RESULTS_FILE), key=lambda p: (p.stat().st_mtime, str(p)))
    if not paths:
        raise DataError(f"no {RESULTS_FILE} under {str(root)!r}; runs write one at "
                        "<run.root>/<task>/<backbone>-<protocol>/<stamp>/results.json when they finish.")
    return [(p, read_results(p)) for p in paths]


def compared_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics a run is compared on: the task's ``primary_metric``, else every test metric (else all)."""
    metrics = results["metrics"]
    chosen = results.get("primary_metric")
    if chosen in metrics:
        return [chosen]
    return sorted(k for k in metrics if k.startswith("test/")) or sorted(metrics)


def build_comparison(found: list[tuple[Path, dict[str, Any]]], *,
                     baselines: str | Path | None = None) -> list[TaskComparison]:
    """Group runs by task; add the task's published rows, each marked published or context for these runs."""
    out = []
    for task in sorted({r["task"] for _, r in found}):
        newest: dict[tuple[str, str, str], tuple[Path, dict[str, Any]]] = {}
        counts: dict[tuple[str, str, str], int] = {}
        for path, r in found:  # oldest first, so the newest run of a backbone, weights and protocol wins
            if r["task"] == task:
                key = (r["backbone"], weights_id(r), run_protocol_label(r))  # frozen and fine-tuned apart
                newest[key] = (path, r)
                counts[key] = counts.get(key, 0) + 1
        weights_of: dict[str, set[str]] = {}
        for backbone, weights, _ in newest:
            weights_of.setdefault(backbone, set()).add(weights)
        columns = sorted({(run_protocol_label(r), m) for _, r in newest.values() for m in compared_metrics(r)})
        entries: dict[tuple[str, str], Entry] = {}
        published: dict[tuple, dict] = {}  # row identity -> {"row", "comparable": {column}, "context": {column: why}}
        for (backbone, weights, protocol), (path, r) in sorted(newest.items(), key=lambda kv: kv[1][0].stat().st_mtime):
            verdict = assess(r, path=baselines)
            name = backbone if len(weights_of[backbone]) == 1 else f"{backbone} [{_short_weights(weights)}]"
            e = entries.setdefault((SUITE, f"{backbone}|{weights}"), Entry(name, SUITE, "", ""))
            e.values.update({(protocol, m): r["metrics"][m] for m in compared_metrics(r)})
            e.runs[protocol] = counts[backbone, weights, protocol]
            e.resolution[protocol] = (r.get("extra") or {}).get("resolution")
            if not verdict["comparable"]:
                e.not_comparable[protocol] = "; ".join(verdict["comparison"]["reasons"])
                e.marks[protocol] = short_reasons(verdict["comparison"]["reasons"])
            e.weights_by[protocol], e.source_by[protocol] = _weights_text(r["weights"]), str(path)
            e.detail, e.source = _per_protocol(e.weights_by), _per_protocol(e.source_by)
            for row in verdict["baselines"]:
                if (protocol, row["metric"]) not in columns:
                    continue
                key = tuple(row[k] for k in ("method", "arch", "pretrain", "protocol", "setting", "conditions",
                                             "metric"))
                seen = published.setdefault(key, {"row": row, "comparable": set(), "context": {}})
                if row["comparable"]:
                    seen["comparable"].add((protocol, row["metric"]))
                else:
                    seen["context"].setdefault((protocol, row["metric"]), f"{backbone}: {row['context']}")
        for seen in published.values():
            row = seen["row"]
            kind = PUBLISHED if seen["comparable"] else CONTEXT
            # A row sits in the columns of the runs it is comparable with; a context row in the first column
            # of its metric, its own protocol named in the detail.
            placed = sorted(seen["comparable"]) or sorted(seen["context"])[:1]
            detail = "; ".join(x for x in (row["protocol"], describe_pretraining(row["pretrain"]), row["setting"],
                                           row["conditions"]) if x)
            if kind == CONTEXT:
                detail += f" — context, differs from {' / '.join(seen['context'][c] for c in placed)}"
            # A context row's name carries its protocol: it may sit in another protocol's column.
            name = f"{row['method']} ({row['arch']})" + (f", {row['protocol']}" if kind == CONTEXT else "")
            e = entries.setdefault((kind, "|".join(str(row[k]) for k in ("method", "arch", "pretrain", "protocol",
                                                                           "setting", "conditions"))),
                                   Entry(name, kind, detail, row["source"]))
            e.values.update({c: row["value"] for c in placed})
        order = {SUITE: 0, PUBLISHED: 1, CONTEXT: 2}
        ordered = sorted(entries.values(), key=lambda e: (order[e.kind], e.name))
        lower = set().union(*(lower_is_better(r) for _, r in newest.values()))
        out.append(TaskComparison(task, [Column(p, m, m in lower) for p, m in columns], ordered))
    return out


def weights_id(results: dict[str, Any]) -> str:
    """What tells a run's weights apart: the file's sha256, else the source (``random``, ``hub:…``)."""
    w = results.get("weights") or {}
    return str(w.get("sha256") or w.get("source") or "unknown")


def _short_weights(weights: str) -> str:
    return f"sha256 {weights[:10]}" if len(weights) == 64 and all(c in "0123456789abcdef" for c in weights) \
        else weights


# Short marks for the reasons a run is not comparable (transfer.compare.run_reasons), by how each reason begins.
SHORT_REASONS = (("backbone.weights=random", "random weights"), ("task.limit_per_split", "subset"),
                 ("task.check_split_sizes=false", "other splits"), ("protocol.", "changed protocol"))


def short_reasons(reasons: list[str]) -> list[str]:
    """``["random weights", "subset"]`` for the reasons a run is not comparable; "see row" for any other."""
    out = [mark for prefix, mark in SHORT_REASONS if any(r.startswith(prefix) for r in reasons)]
    other = any(not r.startswith(tuple(prefix for prefix, _ in SHORT_REASONS)) for r in reasons)
    return out + (["see row"] if other else [])


def _per_protocol(by: dict[str, str]) -> str:
    """One text when every protocol's is the same, else ``"linear: …; knn: …"``, so each value of a row can be
    traced to its own results.json and weights."""
    if len(set(by.values())) <= 1:
        return next(iter(by.values()), "")
    return "; ".join(f"{p}: {text or '—'}" for p, text in sorted(by.items()))


def _weights_text(weights: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in weights.items() if k in ("source", "hub_id", "path") and v)
    return text + (f", sha256 {weights['sha256'][:12]}" if weights.get("sha256") else "")


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _cell(e: Entry, c: Column) -> str:
    v = e.values.get((c.protocol, c.metric))
    n = e.runs.get(c.protocol, 0)
    marks = e.marks.get(c.protocol)
    flag = (f" ({NOT_COMPARABLE}{': ' + ', '.join(marks) if marks else ''})"
            if v is not None and c.protocol in e.not_comparable else "")
    res = e.resolution.get(c.protocol)
    return _fmt(v) + (f" @{res}px" if v is not None and res else "") + \
        (f" (newest of {n})" if v is not None and n > 1 else "") + flag


def overview_rows(tasks: list[TaskComparison]) -> tuple[list[str], list[list[str]]]:
    """Backbones (rows) x task/protocol/metric (columns), this suite's runs only."""
    cols = [(t, c) for t in tasks for c in t.columns]
    head = ["backbone", *(f"{t.task} · {c.title}" for t, c in cols)]
    backbones = sorted({e.name for t in tasks for e in t.entries if e.kind == SUITE})
    rows = []
    for b in backbones:
        row = [b]
        for t, c in cols:
            e = next((e for e in t.entries if e.kind == SUITE and e.name == b), None)
            row.append(_cell(e, c) if e else "—")
        rows.append(row)
    return head, rows


def _detail(e: Entry) -> str:
    notes = [f"{p} not comparable: {why}" for p, why in sorted(e.not_comparable.items())]
    return "; ".join([e.detail, *notes]) if notes else e.detail


def task_rows(t: TaskComparison) -> tuple[list[str], list[list[str]]]:
    head = ["name", "kind", *(c.title for c in t.columns), "weights / setting", "source"]
    return head, [[e.name, e.kind, *(_cell(e, c) for c in t.columns), _detail(e), e.source] for e in t.entries]


def _intro(baselines: str | Path | None) -> str:
    return (f"Values in percent unless the metric says otherwise. '{SUITE}' rows are the runs found; '{PUBLISHED}' "
            f"rows come from {baselines or 'transfer/data/baselines.csv'}, each with its source, and were measured the "
            f"same way as a run shown (task, split, metric, protocol, pretraining and the row's conditions, "
            f"docs/comparison.md); '{CONTEXT}' rows were not, and say how they differ. A run marked "
            f"'({NOT_COMPARABLE})' cannot stand next to published numbers; its reasons are in its row.")


def to_markdown(tasks: list[TaskComparison], charts: dict[str, Path], out_dir: Path, *,
                baselines: str | Path | None = None, suite: SuiteTable | None = None) -> str:
    parts = ["# Transfer comparison", "", _intro(baselines)]
    if suite is not None:
        chart = charts.get(suite_chart_key(suite))
        parts += ["", suite_report.to_markdown(suite, chart.relative_to(out_dir).as_posix() if chart else None)]
    parts += ["", "## Backbones × tasks × protocols", "", markdown_table(*overview_rows(tasks))]
    for t in tasks:
        parts += ["", f"## {t.task}", "", markdown_table(*task_rows(t))]
        if t.task in charts:
            parts += ["", f"![{t.task}]({charts[t.task].relative_to(out_dir).as_posix()})"]
    return "\n".join(parts) + "\n"


def to_html(tasks: list[TaskComparison], charts: dict[str, Path], *, baselines: str | Path | None = None,
            suite: SuiteTable | None = None) -> str:
    """One self-contained page: styles inline and charts as data URIs, so it can be mailed or archived."""
    sections = [suite_report.to_html(suite, charts.get(suite_chart_key(suite)))] if suite is not None else []
    sections.append(f"<h2>Backbones × tasks × protocols</h2>{html_table(*overview_rows(tasks))}")
    for t in tasks:
        img = ""
        if t.task in charts:
            data = base64.b64encode(charts[t.task].read_bytes()).decode()
            img = f'<img alt="{html.escape(t.task)} chart" src="data:image/png;base64,{data}">'
        sections.append(f"<h2>{html.escape(t.task)}</h2>{html_table(*task_rows(t))}{img}")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Transfer comparison</title>"
            f"<style>{style}</style></head><body><h1>Transfer comparison</h1>"
            f"<p>{html.escape(_intro(baselines))}</p>"
            f"{''.join(sections)}</body></html>\n")


def plot_task(t: TaskComparison, path: Path) -> Path:
    """One horizontal bar panel per protocol/metric: this suite's runs coloured, published rows grey; as a PNG."""
    fig = task_figure(t)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def task_figure(t: TaskComparison):
    """The matplotlib ``Figure`` of :func:`plot_task`; its title is wrapped to the figure's width."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state

    panels = [(c, sorted(((e.values[c.protocol, c.metric], e) for e in t.entries
                          if (c.protocol, c.metric) in e.values), key=lambda x: x[0])) for c in t.columns]

    def colour(e: Entry, c: Column) -> str:
        if e.kind == SUITE:
            return "tab:orange" if c.protocol in e.not_comparable else "tab:blue"
        return "0.55" if e.kind == PUBLISHED else "0.85"

    def label(e: Entry, c: Column) -> str:
        if e.kind == SUITE:
            return e.name + (f" ({NOT_COMPARABLE})" if c.protocol in e.not_comparable else "")
        return e.name + (f" ({CONTEXT})" if e.kind == CONTEXT else "")
    tallest = max(len(bars) for _, bars in panels)
    width = 6.5 * len(panels)
    title = (f"{t.task}: runs here (blue; orange: not comparable), published baselines measured the same way "
             "(grey) and context (light grey)")
    lines = wrap_title(title, width, fontsize=10)
    fig = Figure(figsize=(width, 1.2 + 0.35 * tallest + 0.2 * lines.count("\n")), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (c, bars) in zip(axes, panels):
        ys = range(len(bars))
        ax.barh(ys, [v for v, _ in bars], color=[colour(e, c) for _, e in bars])
        ax.set_yticks(list(ys), [label(e, c) for _, e in bars], fontsize=8)
        ax.bar_label(ax.containers[0], fmt="%.1f", fontsize=7, padding=2)
        ax.set_xlabel(c.metric + (" (lower is better)" if c.lower else ""))
        ax.set_title(f"{t.task} · {c.protocol}")
        ax.margins(x=0.12)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(lines, fontsize=10)
    return fig


def wrap_title(text: str, width_in: float, *, fontsize: float) -> str:
    """``text`` broken into lines that fit a figure ``width_in`` inches wide at ``fontsize`` points (a character
    of a sans-serif font is at most about 0.6 em wide; the figure keeps a margin of 0.3 inch)."""
    chars = max(20, int((width_in - 0.3) * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, *, baselines: str | Path | None = None,
                 suite: SuiteConfig | None = None) -> tuple[list[TaskComparison], dict[str, Path]]:
    """Write report.md, report.html and charts/<task>.png; returns the comparison and the chart paths.

    With ``suite``, the suite's table comes first and its chart is ``charts/suite_<name>.png`` (key
    ``suite:<name>`` of the returned charts).
    """
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "report"
    found = find_results(runs_dir)
    tasks = build_comparison(found, baselines=baselines)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    charts = {t.task: plot_task(t, out / "charts" / f"{t.task}.png") for t in tasks if t.columns}
    table = suite_report.build_suite_table(found, suite, baselines=baselines) if suite is not None else None
    if table is not None:
        charts[suite_chart_key(table)] = suite_report.plot(table, out / "charts" / f"suite_{suite.name}.png")
    atomic_write_text(out / "report.md", to_markdown(tasks, charts, out, baselines=baselines, suite=table))
    atomic_write_text(out / "report.html", to_html(tasks, charts, baselines=baselines, suite=table))
    return tasks, charts


def suite_chart_key(table: SuiteTable) -> str:
    return f"suite:{table.suite.name}"


def build_wandb_report(tasks: list[TaskComparison], *, entity: str, project: str, title: str,
                       suite: SuiteTable | None = None):
    """A W&B Report: per task a heading, the baselines as markdown and a panel grid of that task's runs.

    Runs are selected by the flat config keys ``task_name``/``protocol_name`` that ``transfer.run`` logs,
    one run set per protocol, and bars are grouped by ``backbone_name``. ``suite`` puts that table first.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise ConfigError("--wandb-report needs the wandb-workspaces package: pip install wandb-workspaces") from None
    blocks = [wr.P(f"Runs of project {project}, compared with published baselines (transfer/data/baselines.csv).")]
    if suite is not None:
        blocks += suite_report.wandb_blocks(suite, entity=entity, project=project, wr=wr)
    for t in tasks:
        runsets = [wr.Runset(entity=entity, project=project, name=f"{t.task} {p}",
                             filters=f"Config('task_name') = '{t.task}' and Config('protocol_name') = '{p}'")
                   for p in sorted({c.protocol for c in t.columns})]
        panels = [wr.BarPlot(title=f"{c.metric} by backbone", metrics=[c.metric], groupby=wr.Config("backbone_name"),
                             groupby_aggfunc="mean", groupby_rangefunc="minmax") for c in t.columns]
        panels += [wr.WeavePanelSummaryTable(table_name=TABLE_KEY),
                   wr.MarkdownPanel(markdown=markdown_table(*task_rows(t)))]
        blocks += [wr.H2(t.task), wr.PanelGrid(runsets=runsets, panels=panels)]
    return wr.Report(entity=entity, project=project, title=title, blocks=blocks)


def wandb_login_entity(entity: str | None) -> str:
    """The entity to save the report under; fails clearly when W&B is offline or not logged in."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise ConfigError(f"--wandb-report needs W&B online, but WANDB_MODE={mode}. Unset it, log in "
                          "(wandb login, or WANDB_API_KEY), upload offline runs with `wandb sync`, then retry.")
    import wandb

    try:
        api = wandb.Api(timeout=20)
        return entity or os.environ.get("WANDB_ENTITY") or api.default_entity
    except Exception as e:  # noqa: BLE001 - any failure here means: not logged in or not reachable
        raise ConfigError(f"--wandb-report could not reach W&B ({type(e).__name__}: {str(e).splitlines()[0]}). "
                          "Log in with `wandb login` (or set WANDB_API_KEY), check the network, then retry; "
                          "report.md and report.html are written regardless.") from None


def main(argv: list[str] | None = None) -> int:
    from transfer.config import WandbConfig

    parser = argparse.ArgumentParser(prog="python -m transfer.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="folder tree holding results.json files (e.g. runs/)")
    parser.add_argument("--out", help="output folder (default: RUNS_DIR/report)")
    parser.add_argument("--baselines", help="baselines CSV (default: the packaged transfer/data/baselines.csv)")
    parser.add_argument("--wandb-report", action="store_true", help="also save a W&B Report (needs W&B online)")
    parser.add_argument("--suite", help="lay the runs out as this suite's table first (a name of recipes/suite/, "
                                        "e.g. resnet_rs_table5, or a suite YAML file)")
    parser.add_argument("--entity", help="W&B entity for the report (default: WANDB_ENTITY or your default)")
    parser.add_argument("--project", default=WandbConfig().project, help="W&B project holding the runs")
    parser.add_argument("--title", default="ResNet-RS transfer comparison", help="title of the W&B report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        suite = load_suite(args.suite) if args.suite else None
        tasks, charts = write_report(args.runs_dir, args.out, baselines=args.baselines, suite=suite)
        out = Path(args.out) if args.out else Path(args.runs_dir) / "report"
        print(f"report: {out / 'report.md'}\nreport: {out / 'report.html'}")
        for path in charts.values():
            print(f"chart: {path}")
        if args.wandb_report:
            entity = wandb_login_entity(args.entity)
            table = None if suite is None else suite_report.build_suite_table(find_results(args.runs_dir), suite,
                                                                              baselines=args.baselines)
            report = build_wandb_report(tasks, entity=entity, project=args.project, title=args.title, suite=table)
            try:
                report.save()
            except Exception as e:  # noqa: BLE001 - network, permissions, or an API change: say which
                raise TransferError(f"saving the W&B report to {entity}/{args.project} failed "
                                    f"({type(e).__name__}: {e}); the local report is complete.") from None
            print(f"W&B report: {report.url}")
    except (TransferError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
