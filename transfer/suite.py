"""Named suites: every task of a published transfer table, for one or more backbones, in one command.

A suite recipe (``recipes/suite/<name>.yaml``, or any YAML file of the same form) lists the columns of a
paper's table; each column is one run per backbone: a task, the protocol it is run under, the metric the
table shows, and optionally a data folder and overrides of its own::

    python -m transfer.run suite=resnet_rs_table5 -m backbone=rs50,simclr_r50,resnet50 suite.data_root=/data
    python -m transfer.report runs/ --suite resnet_rs_table5

Command-line keys:

- ``suite=NAME`` (or ``suite=path/to/suite.yaml``) picks the recipe;
- ``suite.data_root=DIR``: a column's relative ``data_dir`` is looked up under it;
- ``suite.only=[id,...]`` / ``suite.skip=[id,...]``: a subset of the columns (column ids or task names);
- ``suite.<id or task>.<key>=value``: an override for those columns only (``suite.nyu_depth.task.crop=[32,48]``);
- any other ``key=value`` applies to every run, and with ``-m`` comma-separated values sweep as usual.

Every run is composed and validated before the first one starts, so a wrong path for the last column fails
at once. A run that fails while running does not stop the suite: the failures are listed at the end (exit
status 1). A suite is a set of runs, not one run's configuration, so it is read here rather than composed
into :class:`transfer.config.RunConfig`; each run is then an ordinary ``python -m transfer.run`` run.
"""
from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer.config import RECIPES_DIR, SUITE_KEY, compose, recipe_names, task_adapter, validate
from transfer.errors import ConfigError, TransferError
from transfer.registry import UnknownNameError

log = logging.getLogger("transfer.suite")
ID = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# Keys a suite sets per column: a command-line value for them would silently replace every column's.
PER_COLUMN = ("task", "protocol")


@dataclass
class SuiteColumn:
    """One column of the table: ``task`` run under ``protocol`` for each backbone, shown as ``metric``."""

    id: str
    task: str
    protocol: str
    metric: str  # split/name, a key the task's adapter declares
    title: str = ""
    data_dir: str | None = None  # absolute, or relative to the suite's data_root; null: the task's default
    overrides: list[str] = field(default_factory=list)  # key=value for this column's runs

    def __post_init__(self) -> None:
        self.title = self.title or f"{self.task} {self.protocol}"


@dataclass
class SuiteConfig:
    name: str
    columns: list[SuiteColumn]
    title: str = ""
    source: str = ""  # where the table's layout comes from
    data_root: str | None = None
    path: str = ""  # the recipe file it was read from


def suite_dir() -> Path:
    return RECIPES_DIR / "suite"


def suite_names() -> list[str]:
    return recipe_names("suite")


def load_suite(name: str) -> SuiteConfig:
    """The suite recipe ``name`` (a name under ``recipes/suite/`` or a path to a YAML file), checked.

    Raises :class:`UnknownNameError` for an unknown name, :class:`ConfigError` for a malformed recipe: a task
    without a recipe, a protocol or metric its adapter does not offer, a duplicate column id.
    """
    path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) or "/" in name else suite_dir() / f"{name}.yaml"
    if not path.is_file():
        if path.parent == suite_dir():
            raise UnknownNameError("suite", name, suite_names(),
                                   hint=f"Suites live in {suite_dir()}; suite=path/to/file.yaml reads your own.")
        raise ConfigError(f"suite={name!r}: no such file. Pass a suite name ({', '.join(suite_names())}) or the "
                          "path of a suite YAML file (see recipes/suite/ for the format).")
    try:
        raw = OmegaConf.load(path)
        schema = OmegaConf.structured(SuiteConfig(name="", columns=[]))
        suite: SuiteConfig = OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except (OmegaConfBaseException, ValueError, OSError) as e:
        raise ConfigError(f"suite recipe {str(path)!r} is not valid: {str(e).splitlines()[0]} (keys: name, title, "
                          f"source, data_root, columns: [{{id, task, protocol, metric, title, data_dir, overrides}}])"
                          ) from None
    suite.path = str(path)
    check_suite(suite)
    return suite


def check_suite(suite: SuiteConfig) -> None:
    """Every column names a task with a recipe, a protocol and a metric its adapter offers; ids are unique."""
    from transfer.tasks import TASKS, load_adapters

    where = f"suite recipe {suite.path or suite.name!r}"
    if not suite.columns:
        raise ConfigError(f"{where} has no columns.")
    load_adapters()
    tasks = recipe_names("task")
    seen: set[str] = set()
    for col in suite.columns:
        if not ID.match(col.id) or col.id in seen:
            raise ConfigError(f"{where}: column id {col.id!r} must be unique and lower-case (letters, digits, _).")
        seen.add(col.id)
        if col.task not in tasks:
            raise UnknownNameError("task", col.task, tasks, hint=f"(column {col.id!r} of {where})")
        adapter = TASKS.get(task_adapter(col.task))
        if col.protocol not in adapter.protocols:
            raise ConfigError(f"{where}, column {col.id!r}: protocol {col.protocol!r} does not apply to task "
                              f"{col.task!r}; valid: {', '.join(adapter.protocols)}.")
        if adapter.metrics and col.metric not in adapter.metrics:
            raise ConfigError(f"{where}, column {col.id!r}: task {col.task!r} reports no metric {col.metric!r}; "
                              f"its metrics: {', '.join(adapter.metrics)}.")
        for ov in col.overrides:
            key = ov.partition("=")[0].lstrip("+~")
            if "=" not in ov or key in (*PER_COLUMN, "backbone"):
                raise ConfigError(f"{where}, column {col.id!r}: override {ov!r} must be key=value and may not set "
                                  f"{', '.join((*PER_COLUMN, 'backbone'))} (the column and the command line do).")


@dataclass
class SuiteRequest:
    """What the command line asked of a suite: the recipe, the columns chosen, and the overrides."""

    suite: SuiteConfig
    columns: list[SuiteColumn]
    common: list[str]  # for every run (may hold -m sweeps)
    per_column: dict[str, list[str]]  # column id -> overrides from suite.<id or task>.<key>=value


def requested(overrides: list[str]) -> bool:
    """Whether the command line asks for a suite (``suite=NAME``, or a ``suite.*`` key that needs one)."""
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    return any(k == SUITE_KEY or k.startswith(SUITE_KEY + ".") for k in keys)


def _list_value(override: str) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(override).value()
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors have several types; all mean a bad value
        raise ConfigError(f"could not read {override!r}: {e}. Write a list, e.g. suite.only=[cifar100_linear]."
                          ) from None
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def parse_request(overrides: list[str]) -> SuiteRequest:
    """Split the command line into the suite, its ``suite.*`` keys and the overrides of every run."""
    names = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == SUITE_KEY]
    if len(names) != 1 or not names[0] or "," in names[0]:
        raise ConfigError(f"name one suite: suite=NAME (one of {', '.join(suite_names())}) or suite=path.yaml; "
                          f"got {names}.")
    suite = load_suite(names[0])
    ids = {c.id for c in suite.columns}
    tasks = {c.task for c in suite.columns}
    common, per_column, only, skip = [], {}, None, []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        bare = key.lstrip("+~")
        if bare == SUITE_KEY:
            continue
        if bare in PER_COLUMN and sep:
            raise ConfigError(f"{ov!r}: suite {suite.name!r} sets task and protocol for each column. Pick columns "
                              f"with suite.only=[...] (ids: {', '.join(c.id for c in suite.columns)}).")
        if not bare.startswith(SUITE_KEY + "."):
            common.append(ov)
            continue
        rest = bare[len(SUITE_KEY) + 1:]
        if rest == "data_root":
            suite.data_root = value or None
        elif rest in ("only", "skip"):
            chosen = _list_value(f"{rest}={value}")
            unknown = sorted(set(chosen) - ids - tasks)
            if unknown:
                raise ConfigError(f"suite.{rest}={value}: {unknown} name no column of suite {suite.name!r}; column "
                                  f"ids: {', '.join(sorted(ids))} (task names select all their columns).")
            if rest == "only":
                only = chosen
            else:
                skip = chosen
        else:
            target, _, sub = rest.partition(".")
            if target not in ids | tasks or not sub or not sep:
                raise ConfigError(f"{ov!r}: suite.<column id or task>.<key>=value sets a key for some columns "
                                  f"(ids: {', '.join(sorted(ids))}; tasks: {', '.join(sorted(tasks))}); other suite "
                                  "keys: suite.data_root, suite.only, suite.skip.")
            for col in suite.columns:
                if target in (col.id, col.task):
                    per_column.setdefault(col.id, []).append(f"{key[:len(key) - len(bare)]}{sub}={value}")
    columns = [c for c in suite.columns
               if (only is None or c.id in only or c.task in only) and c.id not in skip and c.task not in skip]
    if not columns:
        raise ConfigError(f"suite.only / suite.skip leave no column of suite {suite.name!r} to run.")
    return SuiteRequest(suite, columns, common, per_column)


@dataclass
class SuiteJob:
    column: SuiteColumn
    overrides: list[str]  # the full transfer.run command line of this run
    label: str  # e.g. "nyu_depth_frozen backbone=rs50"


def column_data_dir(suite: SuiteConfig, col: SuiteColumn) -> str | None:
    """The ``task.data_dir`` of a column: absolute as given, or under ``suite.data_root``; None: the task's own."""
    if col.data_dir is None:
        return None
    path = Path(col.data_dir).expanduser()
    if path.is_absolute():
        return str(path)
    return str(Path(suite.data_root).expanduser() / path) if suite.data_root else None


def expand(request: SuiteRequest, *, multirun: bool) -> list[SuiteJob]:
    """One job per (sweep combination of the common overrides, column), backbone by backbone."""
    from transfer.sweeps import expand_sweep

    combos = expand_sweep(request.common) if multirun else [request.common]
    # A run's label: its column, its backbone and whatever else the sweep varies (trainer.seed=1, ...).
    varying = {o for c in combos for o in c if any(o not in other for other in combos)}
    jobs = []
    for common in combos:
        shown = [o for o in common if o.partition("=")[0].lstrip("+~") == "backbone" or o in varying]
        for col in request.columns:
            data_dir = column_data_dir(request.suite, col)
            job = [f"task={col.task}", f"protocol={col.protocol}",
                   *([f"task.data_dir={data_dir}"] if data_dir else []), *col.overrides, *common,
                   *request.per_column.get(col.id, [])]
            jobs.append(SuiteJob(col, job, " ".join([col.id, *(shown or ["backbone=<recipe default>"])])))
    return jobs


def check_jobs(request: SuiteRequest, jobs: list[SuiteJob]) -> None:
    """Compose and validate every run before any starts; one error lists every run that cannot start.

    Runs that fail the same way (a column's missing copy, for every backbone) are listed once, with the
    columns and sweep values they concern and how to pass the data or leave the columns out.
    """
    problems: dict[str, list[SuiteJob]] = {}
    for job in jobs:
        try:
            validate(compose(job.overrides))
        except (TransferError, UnknownNameError) as e:
            problems.setdefault(str(e).strip(), []).append(job)
    if not problems:
        return
    lines = []
    for message, failed in problems.items():
        cols = list({j.column.id: j.column for j in failed}.values())
        swept = sorted({j.label.partition(" ")[2] for j in failed})
        lines.append(f"- {', '.join(c.id for c in cols)} ({'; '.join(swept)}): {message}")
        missing = [c for c in cols if c.data_dir and not Path(c.data_dir).is_absolute() and not request.suite.data_root]
        if missing and "data_dir" in message:
            lines.append(f"  These columns read their copy from <suite.data_root>/{missing[0].data_dir}: pass "
                         f"suite.data_root=DIR or suite.{missing[0].task}.task.data_dir=PATH, or leave them out with "
                         f"suite.skip=[{','.join(c.id for c in missing)}].")
    n = sum(len(f) for f in problems.values())
    raise ConfigError(f"suite {request.suite.name!r}: {n} of {len(jobs)} runs cannot start; nothing was run.\n"
                      + "\n".join(lines))


def run_suite(overrides: list[str], *, multirun: bool, show: bool,
              run_one: Callable[..., dict[str, Any]]) -> int:
    """Run every column of the suite for every sweep combination; returns the exit status (1: some run failed).

    ``show`` (``--cfg``) lists the runs after checking them and runs nothing.
    """
    from transfer.results import format_table
    from transfer.rundir import RESULTS_FILE
    from transfer.tracking import is_global_zero

    request = parse_request(overrides)
    jobs = expand(request, multirun=multirun)
    check_jobs(request, jobs)
    name, say = request.suite.name, is_global_zero()
    if show:
        print(f"suite {name}: {len(jobs)} runs ({request.suite.path})")
        for job in jobs:
            print("  python -m transfer.run " + " ".join(job.overrides))
        return 0
    results, failures = [], []
    for i, job in enumerate(jobs):
        if say:
            print(f"[{i + 1}/{len(jobs)}] suite {name}: {job.label}", flush=True)
        try:
            results.append(run_one(job.overrides, sweep_index=i))
        except (TransferError, UnknownNameError) as e:
            failures.append((job, str(e).strip()))
            print(f"error: {job.label}: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one broken run must not cost the rest of the table
            failures.append((job, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            print(f"error: {job.label}: unexpected {type(e).__name__}; the suite continues. Traceback:\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
    if say:
        if results:
            print("\n" + format_table(results))
            for r in results:
                print(f"results: {Path(r['run_dir']) / RESULTS_FILE}")
        print(f"\nsuite {name}: {len(results)} of {len(jobs)} runs finished, {len(failures)} failed.")
        for job, why in failures:
            print(f"failed: {job.label}: {why.splitlines()[0]}")
        root = next((o.partition("=")[2] for o in request.common if o.startswith("run.root=")), "runs")
        given = next(o.partition("=")[2] for o in overrides if o.partition("=")[0] == SUITE_KEY)
        print(f"the table: python -m transfer.report {root} --suite {given}")
    return 1 if failures else 0
