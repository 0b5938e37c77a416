"""The task-adapter registry and the contract between ``transfer.run`` and every task.

A task adapter (classification, detection, video, …) registers a :class:`TaskAdapter`; task recipes
(``recipes/task/<name>.yaml``) name their adapter with ``adapter:``. ``run(ctx)`` gets the validated
config, the run directory and the logger, and returns a :class:`TaskOutput`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transfer.registry import Registry

if TYPE_CHECKING:
    from transfer.config import RunConfig
    from transfer.rundir import RunRecord
    from transfer.tracking import RunLogger


@dataclass
class RunContext:
    """What a task's ``run`` gets: the config, its run directory, the logger, and the run's
    :class:`transfer.rundir.RunRecord` (``history.json``; the engine records each fit in it)."""

    cfg: RunConfig
    run_dir: Path
    logger: RunLogger
    record: RunRecord | None = None

    @property
    def cache_dir(self) -> Path:
        root = self.cfg.run.cache_dir or str(Path(self.cfg.run.root) / ".cache")
        return Path(root)


@dataclass
class TaskOutput:
    """What a task returns to the runner, which writes it to ``results.json``.

    ``metrics`` keyed ``split/metric`` (``test/top1``, percent unless the key says otherwise);
    ``weights`` the :meth:`transfer.weights.WeightsInfo.as_dict` of the weights actually loaded;
    ``primary_metric`` the key the run is compared on; ``counts`` of skipped or padded inputs;
    ``recipe`` the training values the adapter actually used (recorded as ``recipe``, beside the
    configured protocol section ``protocol_config``; None when that section is the whole story);
    ``extra`` anything else worth keeping. Two ``extra`` keys are read by :mod:`transfer.compare`:
    ``not_comparable`` (list of reasons the scores cannot stand next to published numbers: a subset, other
    split sizes, a partial data set) and ``scratch_recipe`` (the published from-scratch recipe the task
    follows, so a run from random weights matches the from-scratch rows).
    """

    metrics: dict[str, float]
    weights: dict
    primary_metric: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    recipe: dict | None = None
    extra: dict = field(default_factory=dict)


def attach_output(error: Exception, output: TaskOutput) -> None:
    """Let ``error`` carry what the task counted before it failed (``output``: counts, no metric):
    ``transfer.run`` writes it to results.json with status ``failed`` and the error, then reports the error."""
    error.output = output


@dataclass(frozen=True)
class TaskAdapter:
    """A task's contract with the core.

    ``check(cfg)`` holds every check of the whole run config that does not need the adapter's optional
    dependency; ``validate`` calls it, so a bad value fails before a run directory or W&B run exists.
    It raises :class:`transfer.errors.ConfigError` naming the key, the valid values and the fix.

    ``protocols`` maps each protocol name the task takes to the adapter's schema for it (a dataclass whose defaults
    are the published recipe; :mod:`transfer.protocols` says what a schema may declare). ``protocol=NAME`` composes
    the schema of the task's own adapter, so two adapters may each have a ``finetune`` of their own.
    """

    config_class: type
    run: Callable[[RunContext], TaskOutput]
    protocols: Mapping[str, type]
    check: Callable[[RunConfig], None] | None = None
    # Every metric key the adapter can put in TaskOutput.metrics (``split/name``, lower-case): baselines are
    # matched on these keys, so a test checks that each baseline row's metric is one of them.
    metrics: tuple[str, ...] = ()
    # The keys of ``metrics`` where a smaller value is better (errors, e.g. depth's test/rms): results.json lists
    # them as ``lower_is_better``, and the comparison and the report say which direction is better.
    lower_is_better: tuple[str, ...] = ()
    # Config keys (or ``prefix.`` prefixes) that define the trained model beyond the core's identity keys
    # (task, backbone, weights, protocol): a resume that changes one is another run, refused before anything
    # is written even with resume_allow_changes=true (transfer.rundir.config_changes).
    model_keys: tuple[str, ...] = ()


TASKS: Registry[TaskAdapter] = Registry("task adapter")

# Adapter modules register themselves on import; each may need optional packages only when it runs. Every compose
# loads them all, so each imports its schemas and checks only, and its training code (Lightning, timm) when it runs:
# a refused value then costs little more than `import torch` (tests/test_import_graph.py, bench/bench_startup.py).
ADAPTER_MODULES = ("tasks.classification", "tasks.imagenet", "tasks.detection", "video", "tasks.segmentation",
                   "tasks.depth")


def load_adapters() -> None:
    for module in ADAPTER_MODULES:
        importlib.import_module(module)
