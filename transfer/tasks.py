"""The task-adapter registry and the contract between ``transfer.run`` and every task.

A task adapter (classification, detection, video, …) registers a :class:`TaskAdapter`; task recipes
(``recipes/task/<name>.yaml``) name their adapter with ``adapter:``. ``run(ctx)`` gets the validated
config, the run directory and the logger, and returns a :class:`TaskOutput`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transfer.registry import Registry

if TYPE_CHECKING:
    from transfer.config import RunConfig
    from transfer.tracking import RunLogger


@dataclass
class RunContext:
    cfg: RunConfig
    run_dir: Path
    logger: RunLogger

    @property
    def cache_dir(self) -> Path:
        root = self.cfg.run.cache_dir or str(Path(self.cfg.run.root) / ".cache")
        return Path(root)


@dataclass
class TaskOutput:
    """What a task returns: ``metrics`` keyed ``split/metric`` (``test/top1``), counts of skipped inputs."""

    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskAdapter:
    config_class: type
    run: Callable[[RunContext], TaskOutput]
    protocols: tuple[str, ...]


TASKS: Registry[TaskAdapter] = Registry("task adapter")

# Adapter modules register themselves on import; each may need optional packages only when it runs.
ADAPTER_MODULES = ("tasks.classification", "tasks.imagenet", "tasks.detection", "video.task")


def load_adapters() -> None:
    for module in ADAPTER_MODULES:
        importlib.import_module(module)
