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
