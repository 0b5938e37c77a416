"""Helpers shared by the top-level tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A host that never resolves: "pretrained" downloads fail fast and the same way on every machine.
UNREACHABLE = "http://unreachable.invalid"


def run_cli(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m transfer.run ARGS`` in a fresh process; returns the finished process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# Settings that keep a digits run to seconds on a CPU: tiny images, W&B off.
QUICK = ["task=digits", "backbone.weights=random", "task.resolution=32", "logger.wandb.mode=disabled",
         "trainer.num_workers=0", "trainer.progress_bar=false"]


def fake_task(monkeypatch, run) -> None:
    """Make every task of ``python -m transfer.run`` (in this process) call ``run(ctx)`` instead of its adapter:
    a stand-in that returns a chosen TaskOutput at once, for tests of what the runner does around a task."""
    import dataclasses

    import transfer.run
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    fake = dataclasses.replace(TASKS.get("classification"), run=run)
    monkeypatch.setattr(transfer.run, "TASKS", type("Tasks", (), {"get": staticmethod(lambda name: fake)}))
