"""``python -m transfer.run`` end to end on the offline demo task, and its errors."""
import json
from pathlib import Path

import pytest
from suite_helpers import QUICK, UNREACHABLE, run_cli

from transfer.results import read_results
from transfer.run import main


def _only_results(root: Path) -> dict:
    found = list(root.rglob("results.json"))
    assert len(found) == 1, found
    return read_results(found[0])


@pytest.mark.e2e
def test_demo_linear_probe_end_to_end(tmp_path, capsys):
    code = main([*QUICK, "protocol=linear", "task.limit_per_split=120", f"run.root={tmp_path}"])
    assert code == 0
    results = _only_results(tmp_path)
    assert results["task"] == "digits" and results["backbone"] == "rs50" and results["protocol"] == "linear"
    assert 0 <= results["metrics"]["test/top1"] <= 100
    assert results["metrics"]["test/top1"] > 10  # above chance (10 classes) even with random features
    assert results["weights"]["source"] == "random"
    # The 45-value grid, plus the values beyond an end where the val curve had not come down (l2_search).
    assert len([l2 for l2, _ in results["extra"]["l2_curve"] if 1e-6 * (1 - 1e-9) <= l2 <= 1e5 * (1 + 1e-9)]) == 45
    out = capsys.readouterr().out
    assert "test/top1" in out and "| digits" in out
    run_dir = Path(results["run_dir"])
    assert (run_dir / "config.yaml").read_text().count("name: digits") == 1


@pytest.mark.e2e
def test_demo_finetune_one_epoch_with_offline_wandb(tmp_path):
    args = [a for a in QUICK if not a.startswith("logger.")]
    code = main([*args, "protocol=finetune_strong", "trainer.max_epochs=1", "trainer.batch_size=32",
                 "task.limit_per_split=96", "logger.wandb.mode=offline", f"run.root={tmp_path}"])
    assert code == 0
    results = _only_results(tmp_path)
    run_dir = Path(results["run_dir"])
    assert {"test/top1", "test/top5", "test/mean_per_class"} <= set(results["metrics"])
    assert results["extra"]["first_epoch_this_process"] == 0 and results["extra"]["global_step"] == 3
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "an offline W&B run should be saved in the run directory"
    assert json.loads((run_dir / "results.json").read_text())["packages"]["torch"]


def test_unknown_task_names_the_valid_tasks(capsys):
    # In this process: tests/test_cli.py runs the command line itself in a fresh one for the same kind of error.
    assert main(["task=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "digits" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.e2e
def test_pretrained_weights_without_network_is_one_clear_message(tmp_path):
    proc = run_cli("task=digits", "backbone=rs152", "logger.wandb.mode=disabled", f"run.root={tmp_path}",
                   cwd=tmp_path, timeout=600, env={"HF_ENDPOINT": UNREACHABLE, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "resnetrs152" in proc.stderr and "backbone.weights=/path/to/" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json"))
