"""trainer.devices=2 runs DDP (two CPU processes over gloo) through the shared engine."""
import json

import pytest
from suite_helpers import QUICK, run_cli


@pytest.mark.e2e
def test_finetune_with_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    quick = [a for a in QUICK if not a.startswith("logger.")]
    proc = run_cli(*quick, "protocol=finetune_strong", "trainer.max_epochs=1", "trainer.devices=2",
                   "trainer.accelerator=cpu", "trainer.batch_size=16", "task.limit_per_split=64",
                   "logger.wandb.mode=offline", f"run.dir={run_dir}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    # 64 training images, batch 16 per process, 2 processes: 2 optimiser steps, not 4.
    assert results["extra"]["global_step"] == 2
    assert {"test/top1", "test/top5"} <= set(results["metrics"])
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "only rank 0 logs to W&B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "every rank wrote into the same run directory"
