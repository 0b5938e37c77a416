"""A run's score next to the published baselines: which rows were measured the same way, which are context.

The matching rule (docs/comparison.md states it for users). A published row is **comparable** with a run when

1. the run itself is comparable (:func:`run_reasons` finds nothing): weights that are a real pretrained
   representation (random weights only under a task's declared from-scratch recipe), the published splits and
   all of them, and the protocol's published settings;
2. the task and the metric key (``split/name``) are the same;
3. the protocol is the same: ``linear``, ``knn``; ``eval`` is the file's ``supervised`` (its schema's
   ``BASELINE_PROTOCOL``); ``finetune`` is
   ``finetune``, or ``scratch`` when the run starts from random weights; a protocol with no published
   counterpart (``finetune_strong``) matches nothing;
4. the pretraining kind is the same (:data:`transfer.baselines.PRETRAINING`);
5. each of the row's ``conditions`` holds for the run: ``key=value`` against the run's ``extra`` (then
   ``protocol_config``) in results.json, e.g. ``preprocess=paper`` or ``clip=32x2``.

Every other row of the task with a metric the run reports is **context**: kept with ``comparable: false``,
the reason and no ``difference``, and logged under ``context/<protocol>/...`` so its protocol is never hidden.

:func:`assess` is pure (it reads only the baselines file and the registries) so its answer goes into
results.json; :func:`log_comparison` puts the same answer into the W&B run.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer.baselines import KEY, PRETRAINING, PROTOCOLS, Baseline, baselines_for
from transfer.protocols import is_frozen_protocol, run_protocol_label

if TYPE_CHECKING:
    from transfer.tracking import RunLogger

log = logging.getLogger(__name__)

# Registry families whose weights are self-supervised; every other family is ImageNet-1k supervised.
FAMILY_PRETRAINING = {"ssl": "imagenet1k_self_supervised"}
# A fact a results.json may lack: its value then. Runs written before the papers' preprocessing option
# existed used the checkpoint's own resolution and crop.
CONDITION_DEFAULTS = {"preprocess": "checkpoint"}
TABLE_KEY = "comparison/baselines"
TABLE_COLUMNS = ["method", "arch", "pretrain", "protocol", "setting", "metric", "value", "difference", "comparable",
                 "source", "better"]
THIS_RUN = "this run"


def baseline_protocol(protocol: str, pretraining: str | None = None, schema: type | None = None) -> str | None:
    """The baselines-file protocol the suite's ``protocol`` is measured under, or None when none matches.

    A protocol ``schema`` whose published counterpart carries another name in the baselines file says so in its
    ``BASELINE_PROTOCOL`` (ImageNet's ``eval`` is the file's ``supervised``). ``finetune`` from random weights
    (``pretraining="none"``) is training from scratch.
    """
    mapped = getattr(schema, "BASELINE_PROTOCOL", protocol)
    if mapped == "finetune" and pretraining == "none":
        return "scratch"
    return mapped if mapped in PROTOCOLS else None


def run_pretraining(results: dict[str, Any]) -> str:
    """The run's pretraining kind: ``none`` for random weights, else what its registry entry's weights are.

    A local weights file is taken to be the entry's own weights (results.json records its sha256).
    """
    from transfer.backbones import BACKBONES
    from transfer.registry import UnknownNameError

    if (results.get("weights") or {}).get("source") == "random":
        return "none"
    try:
        family = BACKBONES.get(results["backbone"]).family
    except UnknownNameError:
        return "unknown"
    return FAMILY_PRETRAINING.get(family, "imagenet1k_supervised")


def _fact(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # whole: 1500000, never 1.5e+06
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, str)) for v in value):
        return "x".join(_fact(v) for v in value)
    return None


def run_facts(results: dict[str, Any]) -> dict[str, str]:
    """What conditions are checked against: the run's ``protocol_config``, overlaid by the ``recipe`` it
    actually trained with, overlaid by its ``extra``, as text.

    Lists become ``32x2``, booleans ``true``/``false``; :data:`CONDITION_DEFAULTS` fill the gaps.
    """
    facts: dict[str, str] = dict(CONDITION_DEFAULTS)
    for source in (results.get("protocol_config") or {}, results.get("recipe") or {}, results.get("extra") or {}):
        facts.update({k: text for k, v in source.items() if (text := _fact(v)) is not None})
    return facts


def protocol_schema_of(results: dict[str, Any]) -> type | None:
    """The schema of the run's protocol: its task adapter's own (results.json ``adapter``, else the adapter its task
    recipe names), or None when neither is known any more."""
    from transfer.config import task_adapter
    from transfer.errors import ConfigError
    from transfer.registry import UnknownNameError
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    try:
        adapter = results.get("adapter") or task_adapter(results["task"])
        return TASKS.get(adapter).protocols.get(results["protocol"])
    except (UnknownNameError, ConfigError):
        return None


def checked_protocol_keys(schema: type) -> list[str]:
    """The fields of a protocol schema a run must leave at the published recipe's values: every field but
    ``name`` and the schema's ``UNCHECKED_KEYS`` (none when the protocol has no published recipe)."""
    if not getattr(schema, "PUBLISHED", True):
        return []
    unchecked = getattr(schema, "UNCHECKED_KEYS", {})
    return [f.name for f in dataclasses.fields(schema) if f.name != "name" and f.name not in unchecked]


def protocol_deviations(results: dict[str, Any]) -> list[str]:
    """``protocol.<key>`` values of the run's ``protocol_config`` that differ from the published recipe (the
    schema's defaults), for every key :func:`checked_protocol_keys` names."""
    used = results.get("protocol_config") or {}
    schema = protocol_schema_of(results)
    if schema is None:
        return []
    recipe = schema()
    out = []
    for key in checked_protocol_keys(schema):
        if key in used and not _same(used[key], getattr(recipe, key)):
            out.append(f"protocol.{key}={used[key]!r} differs from the {results['protocol']} recipe's "
                       f"{getattr(recipe, key)!r}")
    return out


def _same(used: Any, published: Any) -> bool:
    """Equal as stored in results.json (a tuple default is a list there; 1 and 1.0 are the same number)."""
    if isinstance(published, (list, tuple)) and isinstance(used, (list, tuple)):
        return len(used) == len(published) and all(_same(u, p) for u, p in zip(used, published))
    return used == published


def run_reasons(results: dict[str, Any]) -> list[str]:
    """Why the run cannot stand next to any published number; empty when it can.

    Collects the adapter's own reasons (``extra.not_comparable``: a copy with other split sizes, a subset, a
    partial ImageNet, an l2 at the edge of its search), random weights (unless the adapter declares
    ``extra.scratch_recipe``, a published from-scratch recipe, and the protocol trains the backbone), an
    unknown backbone, and protocol settings changed from the published recipe.
    """
    extra = results.get("extra") or {}
    reasons = [str(r) for r in extra.get("not_comparable") or []]
    pretraining = run_pretraining(results)
    frozen = is_frozen_protocol(protocol_schema_of(results), results.get("protocol_config"))
    if pretraining == "none" and frozen:
        reasons.append(f"backbone.weights=random with protocol={results['protocol']}: features of an untrained "
                       "network are no pretrained representation")
    elif pretraining == "none" and not extra.get("scratch_recipe"):
        reasons.append(f"backbone.weights=random: the {results['task']} recipe is not a published from-scratch "
                       "recipe, so no published number was measured this way")
    elif pretraining == "unknown":
        reasons.append(f"backbone {results['backbone']!r} is not in the registry: its pretraining is unknown")
    return reasons + protocol_deviations(results)


def lower_is_better(results: dict[str, Any]) -> set[str]:
    """The run's metric keys where a smaller value is better, as its adapter declared them (``TaskAdapter``).

    results.json lists them as ``lower_is_better``; files written before that key existed may carry the depth
    adapter's ``extra.lower_is_better``.
    """
    keys = results.get("lower_is_better")
    if keys is None:
        keys = (results.get("extra") or {}).get("lower_is_better") or []
    return set(keys)


def better_direction(metric: str, lower: set[str]) -> str:
    """``"lower"`` or ``"higher"``: which way ``metric`` improves."""
    return "lower" if metric in lower else "higher"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _labels(found: list[Baseline]) -> list[str]:
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


def _why_context(b: Baseline, run_ok: bool, protocol: str | None, suite_protocol: str, pretraining: str,
                 facts: dict[str, str]) -> str:
    """Empty when ``b`` is comparable with the run; else every way it differs."""
    why = [] if run_ok else ["the run is not comparable (see comparison.reasons)"]
    if b.protocol != protocol:
        run = protocol if protocol else f"{suite_protocol}, which has no published counterpart"
        why.append(f"protocol: row {b.protocol}, run {run}")
    if b.pretrain != pretraining:
        why.append(f"pretraining: row {b.pretrain}, run {pretraining}")
    for key, value in b.conditions:
        if facts.get(key) != value:
            why.append(f"{key}: row {value}, run {facts.get(key, 'not recorded')}")
    return "; ".join(why)


def assess(results: dict[str, Any], *, path: str | Path | None = None) -> dict[str, Any]:
    """The comparison of one run, as stored in results.json.

    Returns ``{"comparable": bool, "comparison": {...}, "baselines": [...]}``: the run-level verdict, its
    reasons and the facts it was matched on, and every published row of the task whose metric the run
    reports, comparable rows first. ``difference`` (run minus row) is given for comparable rows only; ``better``
    says which way the metric improves (``lower`` for errors such as depth's ``test/rms``: a negative difference
    is then the run doing better).
    """
    reasons = run_reasons(results)
    pretraining = run_pretraining(results)
    protocol = baseline_protocol(results["protocol"], pretraining, protocol_schema_of(results))
    facts = run_facts(results)
    found = [b for b in baselines_for(results["task"], path=path) if b.metric in results["metrics"]] \
        if KEY.match(results["task"]) else []
    why = [_why_context(b, not reasons, protocol, results["protocol"], pretraining, facts) for b in found]
    comparable = [b for b, w in zip(found, why) if not w]
    context = [(b, w) for b, w in zip(found, why) if w]
    lower = lower_is_better(results)
    rows = [_row(label, b, results, "", lower) for label, b in zip(_labels(comparable), comparable)]
    for p in dict.fromkeys(b.protocol for b, _ in context):  # labels unique within protocol and metric
        group = [(b, w) for b, w in context if b.protocol == p]
        rows += [_row(f"{p}/{label}", b, results, w, lower)
                 for label, (b, w) in zip(_labels([b for b, _ in group]), group)]
    used = sorted({k for b in found for k, _ in b.conditions})
    return {"comparable": not reasons,
            "comparison": {"reasons": reasons, "pretraining": pretraining, "baseline_protocol": protocol,
                           "facts": {k: facts.get(k, "not recorded") for k in used}},
            "baselines": rows}


def _row(label: str, b: Baseline, results: dict[str, Any], context: str, lower: set[str]) -> dict[str, Any]:
    return {"label": label, "method": b.method, "arch": b.arch, "pretrain": b.pretrain, "protocol": b.protocol,
            "setting": b.setting, "conditions": b.conditions_text, "metric": b.metric, "value": b.value,
            "difference": None if context else round(results["metrics"][b.metric] - b.value, 4),
            "better": better_direction(b.metric, lower), "comparable": not context, "context": context,
            "source": b.source}


def baseline_rows(results: dict[str, Any], *, path: str | Path | None = None) -> list[dict[str, Any]]:
    """The ``baselines`` rows of :func:`assess`."""
    return assess(results, path=path)["baselines"]


def log_comparison(logger: RunLogger, results: dict[str, Any], *,
                   path: str | Path | None = None) -> list[dict[str, Any]]:
    """Log the comparison into the run's W&B run and return its rows.

    Uses the ``comparable``/``comparison``/``baselines`` already in ``results`` when :func:`assess` filled
    them. A W&B failure here only warns: the result is already on disk and must not be lost to the tracker.
    """
    done = "baselines" in results and "comparable" in results
    verdict = results if done else {**results, **assess(results, path=path)}
    rows = verdict["baselines"]
    if not verdict["comparable"]:
        log.warning("not comparable with published numbers: %s", "; ".join(verdict["comparison"]["reasons"]))
    if not results["metrics"]:
        log.info("nothing to compare with published baselines: the run produced no metric")
    elif not rows:
        log.info("no published baselines for task=%s protocol=%s metrics=%s", results["task"],
                 results["protocol"], ", ".join(sorted(results["metrics"])))
    if logger.run is None:
        return rows
    try:
        _log_to_wandb(logger, verdict, rows)
    except Exception as e:  # noqa: BLE001 - the tracker must never cost a result
        warnings.warn(f"could not log the baseline comparison to W&B ({type(e).__name__}: {e}); the rows are in "
                      f"{results.get('run_dir', 'the run directory')}/results.json under 'baselines'.", stacklevel=2)
    return rows


def _log_to_wandb(logger: RunLogger, results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    import wandb

    reasons = results["comparison"]["reasons"]
    logger.summary({"comparable": results["comparable"], "comparison/reasons": "; ".join(reasons) or "none",
                    **{f"{'baseline' if r['comparable'] else 'context'}/{r['label']}/{r['metric']}": r["value"]
                       for r in rows}})
    if not rows:
        return
    this = f"{results['backbone']} ({THIS_RUN})"
    status = "yes" if results["comparable"] else f"no: {'; '.join(reasons)}"
    metrics = sorted({r["metric"] for r in rows})
    lower = lower_is_better(results)
    own = [[this, results["backbone"], results["comparison"]["pretraining"], results["protocol"], THIS_RUN, m,
            results["metrics"][m], 0.0, status, results.get("run_dir", ""), better_direction(m, lower)]
           for m in metrics]
    table_rows = own + [[r["label"], r["arch"], r["pretrain"], r["protocol"], r["setting"], r["metric"], r["value"],
                         r["difference"], "yes" if r["comparable"] else f"context: {r['context']}", r["source"],
                         r["better"]] for r in rows]
    charts = {}
    for m in metrics:
        # One chart per metric (a bar chart of mixed units would mislead), with the comparable rows only.
        bars = [[row[0], row[6]] for row in table_rows[len(own):] if row[5] == m and row[8] == "yes"]
        if bars and results["comparable"]:
            table = wandb.Table(columns=["method", m], data=[[this, results["metrics"][m]], *bars])
            charts[f"comparison/{_slug(m)}"] = wandb.plot.bar(
                table, "method", m, title=f"{results['task']} {run_protocol_label(results)} {m} "
                                          f"({better_direction(m, lower)} is better): this run vs published, same "
                                          "protocol and pretraining")
    logger.log({TABLE_KEY: wandb.Table(columns=TABLE_COLUMNS, data=table_rows), **charts})


def describe_pretraining(kind: str) -> str:
    return PRETRAINING.get(kind, kind)
