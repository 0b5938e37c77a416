"""A run's score next to the published baselines for the same task, protocol and metric.

:func:`baseline_rows` is pure (it only reads ``transfer/data/baselines.csv``) so its rows can go into
``results.json``; :func:`log_comparison` puts the same rows into the W&B run: summary keys
``baseline/<label>/<metric>``, a ``wandb.Table`` and one bar chart per metric.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer.baselines import KEY, PROTOCOLS, baselines_for

if TYPE_CHECKING:
    from transfer.tracking import RunLogger

log = logging.getLogger(__name__)

# A suite protocol whose published counterpart carries another name in the baselines file:
# `eval` scores the checkpoint's own ImageNet classifier, which the file calls `supervised`.
BASELINE_PROTOCOL = {"eval": "supervised"}
TABLE_KEY = "comparison/baselines"
TABLE_COLUMNS = ["method", "arch", "pretrain", "setting", "metric", "value", "difference", "source"]
THIS_RUN = "this run"


def baseline_protocol(protocol: str) -> str | None:
    """The baselines-file protocol matching the suite's ``protocol``, or None when none can match."""
    protocol = BASELINE_PROTOCOL.get(protocol, protocol)
    return protocol if protocol in PROTOCOLS else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _labels(found: list) -> list[str]:
    """Short labels, unique within each metric: the method, then + arch, then + setting when still ambiguous."""
    def candidates(b) -> list[str]:
        return [b.method, f"{b.method}_{b.arch}", f"{b.method}_{b.arch}_{_slug(b.setting)[:40]}".rstrip("_")]

    labels = []
    for i, b in enumerate(found):
        same_metric = [o for o in found if o.metric == b.metric]
        for level, label in enumerate(candidates(b)):
            if sum(candidates(o)[level] == label for o in same_metric) == 1:
                break
        else:  # identical method/arch/setting slug: the file order keeps the labels stable
            label = f"{label}_{sum(o.metric == b.metric for o in found[:i]) + 1}"
        labels.append(label)
    return labels


def baseline_rows(results: dict[str, Any], *, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Published numbers for the run's task and protocol, for each metric the run reports.

    ``difference`` is this run's value minus the baseline's (positive: the run scores higher).
    """
    protocol = baseline_protocol(results["protocol"])
    if protocol is None or not KEY.match(results["task"]):
        return []
    metrics = results["metrics"]
    found = [b for b in baselines_for(results["task"], protocol, path=path) if b.metric in metrics]
    if not found:
        # No published number under this protocol (video is published trained from scratch, the suite
        # fine-tunes inflated weights): show the task's numbers under any protocol, each naming its own.
        found = [b for other in PROTOCOLS if other != protocol
                 for b in baselines_for(results["task"], other, path=path) if b.metric in metrics]
    return [{"label": label, "method": b.method, "arch": b.arch, "pretrain": b.pretrain,
             "setting": b.setting if b.protocol == protocol else f"{b.protocol}: {b.setting}",
             "metric": b.metric, "value": b.value, "difference": round(metrics[b.metric] - b.value, 4),
             "source": b.source}
            for label, b in zip(_labels(found), found)]


def log_comparison(logger: RunLogger, results: dict[str, Any], *,
                   path: str | Path | None = None) -> list[dict[str, Any]]:
    """Log the baselines next to the run's score and return their rows.

    Uses ``results["baselines"]`` when :func:`baseline_rows` already filled it. A W&B failure here only
    warns: the result is already on disk and must not be lost to the tracker.
    """
    rows = results["baselines"] if "baselines" in results else baseline_rows(results, path=path)
    if not rows:
        log.info("no published baselines for task=%s protocol=%s metrics=%s", results["task"],
                 results["protocol"], ", ".join(sorted(results["metrics"])))
        return rows
    if logger.run is None:
        return rows
    try:
        _log_to_wandb(logger, results, rows)
    except Exception as e:  # noqa: BLE001 - the tracker must never cost a result
        warnings.warn(f"could not log the baseline comparison to W&B ({type(e).__name__}: {e}); the rows are in "
                      f"{results.get('run_dir', 'the run directory')}/results.json under 'baselines'.", stacklevel=2)
    return rows


def _log_to_wandb(logger: RunLogger, results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import wandb

    this = f"{results['backbone']} ({THIS_RUN})"
    metrics = sorted({r["metric"] for r in rows})
    logger.summary({f"baseline/{r['label']}/{r['metric']}": r["value"] for r in rows})
    own = [[this, results["backbone"], results["weights"].get("source", ""), THIS_RUN, m, results["metrics"][m],
            0.0, results.get("run_dir", "")] for m in metrics]
    table_rows = own + [[r["label"], r["arch"], r["pretrain"], r["setting"], r["metric"], r["value"],
                         r["difference"], r["source"]] for r in rows]
    charts = {}
    for m in metrics:
        # One chart per metric: a bar chart of mixed units (top-1 next to mAP) would mislead.
        bars = wandb.Table(columns=["method", m], data=[[row[0], row[5]] for row in table_rows if row[4] == m])
        charts[f"comparison/{_slug(m)}"] = wandb.plot.bar(bars, "method", m, title=f"{results['task']} "
                                                          f"{results['protocol']} {m}: this run vs published")
    logger.log({TABLE_KEY: wandb.Table(columns=TABLE_COLUMNS, data=table_rows), **charts})
