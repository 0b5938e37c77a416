"""Published baseline numbers (``transfer/data/baselines.csv``): load, validate and query them.

Each row is one number a paper or an official repository reports: who (``method``, ``arch``,
``pretrain``, one of :data:`PRETRAINING`), on what (``task``, ``protocol``, ``setting``, and the
``conditions`` a run must meet to be measured the same way, ``key=value;key=value``), which ``metric``
(``split/name``, lower case) and ``value``, and the ``source`` it was read from. The file starts with
``# version: N``; other ``#`` lines are comments. Everything is checked on read, so a bad edit fails with
the line number instead of a wrong report. How rows are matched to runs: :mod:`transfer.compare`.
"""
from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from transfer.errors import ConfigError, DataError

BASELINES_VERSION = 2
COLUMNS = ("method", "arch", "pretrain", "task", "protocol", "setting", "conditions", "metric", "value", "source")
# linear / finetune / knn are the suite's protocols; scratch = trained from random init on the task;
# supervised = the checkpoint's own supervised ImageNet evaluation.
# frozen: a dense task trained on a fixed backbone (detection, segmentation, depth), e.g. BYOL's frozen VOC detection.
PROTOCOLS = ("linear", "finetune", "knn", "scratch", "supervised", "frozen")
# What the network had learnt before the task: the kinds a run is matched on (transfer.compare).
PRETRAINING = {
    "imagenet1k_supervised": "ImageNet-1k, supervised",
    "imagenet1k_self_supervised": "ImageNet-1k, self-supervised",
    "none": "none: random initialisation, trained on the task only",
    "wvt_video_text": "WVT web video-text, pre-trained (Du et al. 2021)",
}
# Tasks with published rows but no task in this suite: kept for the papers' full tables (the 12-dataset tables
# of SimCLR and BYOL include VOC2007 classification), never comparable with a run.
NO_SUITE_TASK = {
    "voc2007": "VOC2007 multi-label classification (11-point mAP) of the SimCLR/BYOL tables: no suite task reads it",
}
KEY = re.compile(r"^[a-z0-9][a-z0-9_]*$")
METRIC = re.compile(r"^(train|val|test)/[a-z0-9_]+$")
CONDITION = re.compile(r"^([a-z0-9_]+)=([^;=\s][^;=]*)$")
VERSION_LINE = re.compile(r"^#\s*version:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Baseline:
    """One published number and where it comes from."""

    method: str
    arch: str
    pretrain: str
    task: str
    protocol: str
    setting: str
    conditions: tuple[tuple[str, str], ...]  # (key, value): facts a run must have to be measured the same way
    metric: str
    value: float
    source: str

    def identity(self) -> tuple:
        """Everything but value and source: two rows with the same identity contradict each other."""
        return (self.method, self.arch, self.pretrain, self.task, self.protocol, self.setting, self.conditions,
                self.metric)

    @property
    def conditions_text(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.conditions)


def default_path() -> Path:
    return Path(str(resources.files("transfer") / "data" / "baselines.csv"))


def load_baselines(path: str | Path | None = None) -> tuple[Baseline, ...]:
    """All rows of the baselines file (the packaged one by default), validated."""
    return _load(str(Path(path) if path is not None else default_path()))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> tuple[Baseline, ...]:
    if not Path(path).is_file():
        raise DataError(f"baselines file {path!r} does not exist. The packaged file is "
                        f"{str(default_path())!r}; reinstall the package if it is missing.")
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = VERSION_LINE.match(lines[0]) if lines else None
    if not first:
        raise DataError(f"{path}:1: the first line must be '# version: {BASELINES_VERSION}'.")
    if int(first.group(1)) != BASELINES_VERSION:
        raise DataError(f"{path}: version {first.group(1)} is not supported (this code reads version "
                        f"{BASELINES_VERSION}: columns {','.join(COLUMNS)}, pretrain one of {', '.join(PRETRAINING)}). "
                        "Update the file or the package.")
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip() and not line.startswith("#")]
    if not numbered:
        raise DataError(f"{path}: no header row. Expected columns: {','.join(COLUMNS)}.")
    reader = csv.reader(line for _, line in numbered)
    header = tuple(next(reader))
    if header != COLUMNS:
        raise DataError(f"{path}:{numbered[0][0]}: columns are {','.join(header)}; expected {','.join(COLUMNS)}.")
    rows: list[Baseline] = []
    seen: dict[tuple[str, ...], int] = {}
    for (lineno, _), cells in zip(numbered[1:], reader):
        row = _parse_row(cells, f"{path}:{lineno}")
        if row.identity() in seen:
            raise DataError(f"{path}:{lineno}: same method/arch/pretrain/task/protocol/setting/metric as line "
                            f"{seen[row.identity()]}. Make the setting say what differs, or drop one row.")
        seen[row.identity()] = lineno
        rows.append(row)
    return tuple(rows)


def _parse_row(cells: list[str], where: str) -> Baseline:
    if len(cells) != len(COLUMNS):
        raise DataError(f"{where}: {len(cells)} cells, expected {len(COLUMNS)} ({','.join(COLUMNS)}). "
                        "Quote cells that contain commas.")
    raw = dict(zip(COLUMNS, (c.strip() for c in cells)))
    empty = [c for c in COLUMNS if c not in ("setting", "conditions") and not raw[c]]
    if empty:
        raise DataError(f"{where}: empty {', '.join(empty)}; every number needs its method, task, metric and source.")
    for column in ("method", "arch", "task"):
        if not KEY.match(raw[column]):
            raise DataError(f"{where}: {column}={raw[column]!r} must be a lower-case key (letters, digits, '_').")
    if raw["protocol"] not in PROTOCOLS:
        raise DataError(f"{where}: protocol={raw['protocol']!r}; valid: {', '.join(PROTOCOLS)}.")
    if raw["pretrain"] not in PRETRAINING:
        raise DataError(f"{where}: pretrain={raw['pretrain']!r}; valid: {', '.join(PRETRAINING)}.")
    conditions = []
    for part in filter(None, (c.strip() for c in raw["conditions"].split(";"))):
        match = CONDITION.match(part)
        if not match:
            raise DataError(f"{where}: condition {part!r} must look like 'key=value' (lower-case key), several "
                            "separated by ';', e.g. 'preprocess=paper;clip=32x2'.")
        conditions.append((match.group(1), match.group(2).strip()))
    if not METRIC.match(raw["metric"]):
        raise DataError(f"{where}: metric={raw['metric']!r} must look like 'split/name', e.g. 'test/top1'.")
    try:
        value = float(raw["value"])
    except ValueError:
        raise DataError(f"{where}: value={raw['value']!r} is not a number.") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: value={raw['value']!r} is not finite.")
    return Baseline(**{**raw, "value": value, "conditions": tuple(conditions)})


def baselines_for(task: str, protocol: str | None = None, metric: str | None = None, *,
                  path: str | Path | None = None) -> list[Baseline]:
    """Rows for ``task`` (and ``protocol``/``metric`` when given); empty when nothing was published."""
    if not KEY.match(task):
        raise ConfigError(f"task={task!r} must be a lower-case key such as 'cifar100'.")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}.")
    if metric is not None and not METRIC.match(metric):
        raise ConfigError(f"metric={metric!r} must look like 'split/name', e.g. 'test/top1'.")
    return [b for b in load_baselines(path) if b.task == task and protocol in (None, b.protocol)
            and metric in (None, b.metric)]
