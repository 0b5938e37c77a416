"""Checks of the data settings that several task adapters share: ``task.data_dir`` (and any other folder a task
reads, e.g. video's ``task.manifest``), ``task.max_bad_fraction`` and ``task.limit_per_split``. Each adapter's
config calls these instead of repeating them, so one key is refused with the same message whatever the task.
"""
from __future__ import annotations

import os
from pathlib import Path

from transfer.errors import ConfigError


def check_data_settings(*, max_bad_fraction: float | None = None, limit_per_split: int | None = None) -> None:
    """Raise :class:`ConfigError` for ``task.max_bad_fraction`` outside [0, 1) (a fraction of a split's images or
    videos that may be damaged and skipped) or ``task.limit_per_split`` below 1 (None: every item)."""
    if max_bad_fraction is not None and not 0 <= max_bad_fraction < 1:
        raise ConfigError(f"task.max_bad_fraction={max_bad_fraction} must be in [0, 1): the fraction of a split's "
                          "inputs that may be damaged and skipped (0 stops at the first).")
    if limit_per_split is not None and limit_per_split < 1:
        raise ConfigError(f"task.limit_per_split={limit_per_split} must be at least 1, or null for every item.")


def check_directory(key: str, value: str | None, what: str) -> None:
    """``value`` of config key ``key``, when given, must be an existing folder (holding ``what``): checked by the
    adapters' ``check`` so a mistyped path fails before a run directory exists. Raises :class:`ConfigError`."""
    if value and not Path(os.path.expanduser(value)).is_dir():
        raise ConfigError(f"{key}={value!r} is not a directory; pass the folder holding {what}.")


def local_data_dir(data_dir: str | None, *, task: str, copy: str, tree: str) -> Path:
    """``task.data_dir`` with ``~`` expanded; :class:`ConfigError` when unset or not an existing folder, showing the
    layout ``tree`` of the local ``copy`` (e.g. "COCO 2017") the task ``task`` reads. Adapters call it from their
    ``check`` so a mistyped path fails before a run directory exists."""
    if not data_dir:
        raise ConfigError(f"task {task!r} needs task.data_dir=PATH, a local {copy} copy laid out as:\n{tree}")
    check_directory("task.data_dir", data_dir, f"a local {copy} copy (task {task!r})")
    return Path(os.path.expanduser(data_dir))
