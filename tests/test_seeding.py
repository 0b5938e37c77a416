"""Seeding happens once, in the runner: a task's draws follow ``trainer.seed`` and no adapter reseeds."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from suite_helpers import QUICK, REPO, fake_task

from transfer.run import run_one
from transfer.tasks import TaskOutput


def _draws(monkeypatch, tmp_path, seed: int) -> list[float]:
    """What a task that never seeds anything draws from torch, numpy and ``random`` in a run at ``seed``."""
    got: list[float] = []

    def task(ctx):
        got.extend([torch.rand(()).item(), float(np.random.rand()), random.random()])
        return TaskOutput(metrics={"test/top1": 1.0}, weights={"source": "random"})

    fake_task(monkeypatch, task)
    run_one([*QUICK, f"trainer.seed={seed}", f"run.root={tmp_path}"])
    return got


def test_the_runner_seeds_every_generator_from_trainer_seed(monkeypatch, tmp_path):
    first = _draws(monkeypatch, tmp_path / "a", 7)
    # The process state between runs must not matter: disturb every generator first.
    torch.rand(5), np.random.rand(5), random.random()
    again = _draws(monkeypatch, tmp_path / "b", 7)
    other = _draws(monkeypatch, tmp_path / "c", 8)
    assert first == again
    assert all(a != b for a, b in zip(first, other))


# Detectron2's trainers seed each spawned worker process (seed + rank) themselves: the runner's seed does not reach
# a process it did not start. Every other adapter module leaves seeding to the runner.
_RESEEDS = re.compile(r"\b(seed_everything|manual_seed|np\.random\.seed|random\.seed|seed_all(_rng)?)\(")
_WORKER_SEEDING = {"tasks/detection/train.py", "tasks/segmentation/train.py"}


@pytest.mark.parametrize("package", ["tasks", "video"])
def test_no_adapter_reseeds_the_global_generators(package):
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / package).rglob("*.py"))
                 if str(path.relative_to(REPO)) not in _WORKER_SEEDING
                 for n, line in enumerate(path.read_text().splitlines(), start=1) if _RESEEDS.search(line)]
    assert not offenders, f"seeding belongs to transfer.run (trainer.seed); found in {offenders}"
