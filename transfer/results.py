"""``results.json``: one per run, written atomically, checked when read back."""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from transfer.errors import TransferError
from transfer.io import atomic_write_json
from transfer.protocols import run_protocol_label
from transfer.tables import markdown_table

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
REQUIRED = {"schema_version": int, "task": str, "backbone": str, "protocol": str, "weights": dict,
            "metrics": dict, "counts": dict, "packages": dict, "wall_time_s": (int, float)}
PACKAGES = ("torch", "torchvision", "timm", "lightning", "wandb", "resnet-rs-transfer")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def build_results(cfg, output, wall_time_s: float, run_dir: Path, *, record=None) -> dict[str, Any]:
    """The results.json of a finished task; ``record`` (the run's :class:`transfer.rundir.RunRecord`) adds the
    processes that worked on the run, and makes ``wall_time_s`` their total."""
    history = {}
    if record is not None and record.writer:
        history = {"wall_time_this_process_s": round(record.wall_time_this_process(), 3),
                   "process_index": record.index, "history": record.processes}
        wall_time_s = record.total_wall_time()
    return {
        "schema_version": SCHEMA_VERSION,
        "task": cfg.task.name,
        "adapter": cfg.task.adapter,  # whose protocol schema protocol_config is (transfer.compare)
        "backbone": cfg.backbone.name,
        "protocol": cfg.protocol.name,
        "weights": output.weights,
        "primary_metric": output.primary_metric,
        "metrics": {k: tidy_metric(v) for k, v in output.metrics.items()},
        "lower_is_better": lower_is_better(cfg, output.metrics),
        "counts": dict(output.counts),
        "extra": tidy_extra(output.extra),
        "protocol_config": protocol_config(cfg),
        "recipe": output.recipe,
        "packages": package_versions(),
        "git_revision": git_revision(),
        "wall_time_s": round(wall_time_s, 3),
        **history,
        "run_dir": str(run_dir),
        "status": "failed" if unscored(cfg.task.name, output) else "complete",
    }


# Metrics mostly come out of float32 tensors (torchmetrics, Lightning's logged values), which hold about seven
# significant decimal digits; the float64 they become carries conversion noise past those (97.5 as float32 is
# 97.50000238418579). results.json keeps the seven digits that mean something, at every scale (97.5, 0.1234568).
METRIC_DIGITS = 7


def tidy_metric(value) -> float:
    """``value`` as a float rounded to :data:`METRIC_DIGITS` significant digits (NaN and inf pass unchanged)."""
    v = float(value)
    return float(f"{v:.{METRIC_DIGITS}g}") if math.isfinite(v) else v


def tidy_extra(value):
    """``value`` (a task's ``extra``) with every float in it, in dicts, lists and tuples at any depth, rounded by
    :func:`tidy_metric` (``l2_curve`` holds val scores that passed through float32); other values unchanged."""
    if isinstance(value, float):
        return tidy_metric(value)
    if isinstance(value, dict):
        return {k: tidy_extra(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy_extra(v) for v in value]
    return value


def protocol_config(cfg) -> dict[str, Any]:
    """The protocol section of results.json: every key of the task adapter's own schema for the protocol."""
    return asdict(cfg.protocol)


def unscored(task: str, output) -> str | None:
    """Why a task's output is a failed run, or None: no metric at all, or not its primary metric (the number the
    run exists for, e.g. ``test/top1``) even when others (``val/best``) were produced. A task that knows why
    (every test image undecodable) says so in ``extra["unscored"]``."""
    why = output.extra.get("unscored") if isinstance(output.extra, dict) else None
    counts = f"counts: {dict(output.counts) or 'none'}"
    primary = output.primary_metric
    if not output.metrics:
        return (f"task {task!r} produced no metric{f', not even its primary metric {primary!r}' if primary else ''} "
                f"({counts}); nothing was scored. " + (f"{why}." if why else "See the log above for what was skipped."))
    if primary and primary not in output.metrics:
        only = ", ".join(sorted(output.metrics))
        return (f"task {task!r} did not produce its primary metric {primary!r} (only {only}; {counts}). "
                + (f"{why}." if why else "See the log above for what was skipped."))
    return None


def lower_is_better(cfg, metrics: dict[str, float]) -> list[str]:
    """The run's metric keys where smaller is better, as its task adapter declares them (``TaskAdapter``)."""
    from transfer.tasks import TASKS

    declared = TASKS.get(cfg.task.adapter).lower_is_better
    return [k for k in metrics if k in declared]


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    check_results(results, origin=str(path))
    atomic_write_json(path, results)
    return path


def check_results(results: Any, *, origin: str) -> dict[str, Any]:
    if not isinstance(results, dict):
        raise TransferError(f"{origin}: results must be a JSON object")
    for key, kind in REQUIRED.items():
        if not isinstance(results.get(key), kind):
            raise TransferError(f"{origin}: key {key!r} is missing or not {kind}; the file is damaged or "
                                "not a results.json of this suite.")
    for k, v in results["metrics"].items():
        if not isinstance(v, (int, float)) or math.isnan(v):
            raise TransferError(f"{origin}: metric {k!r} has value {v!r}, not a number")
    return results


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and check a results.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TransferError(f"cannot read results file {str(path)!r}: {e}") from None
    return check_results(data, origin=str(path))


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table: one row per run, one column per metric."""
    keys = sorted({k for r in results for k in r["metrics"]})
    head = ["task", "backbone", "protocol", *keys]
    rows = [[r["task"], r["backbone"], run_protocol_label(r), *(format_metric(r["metrics"].get(k)) for k in keys)]
            for r in results]
    return markdown_table(head, rows, align=True)


def format_metric(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"
