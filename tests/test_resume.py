"""A fine-tune killed after its first checkpoint continues from it with resume=true."""
import os
import signal
import subprocess
import sys
import time

import pytest
from suite_helpers import QUICK, REPO

from transfer.results import read_results
from transfer.run import main


@pytest.mark.e2e
def test_killed_finetune_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*QUICK, "protocol=finetune_strong", "trainer.max_epochs=3", "trainer.batch_size=16",
            "task.limit_per_split=64", f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "transfer.run", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run ended or timed out before writing its first checkpoint"
    assert not (run_dir / "results.json").exists(), "the run finished before it could be interrupted"
    done_epochs = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch*.ckpt"))
    assert done_epochs, "a per-epoch checkpoint should exist beside last.ckpt"

    assert main([*args, "resume=true"]) == 0
    results = read_results(run_dir / "results.json")
    extra = results["extra"]
    assert extra["resumed_from"] == str(first)
    assert extra["first_epoch_this_process"] >= 1, "resume started from scratch"
    assert extra["global_step"] == 3 * 4  # 3 epochs of 64 images in batches of 16: none lost or repeated
    assert "test/top1" in results["metrics"]
