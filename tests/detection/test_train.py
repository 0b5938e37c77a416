"""Training and evaluation on synthetic COCO and VOC data, in process and through ``python -m transfer.run``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; it is not on PyPI, build it from source "
                    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) to run these tests")

from tasks.detection.config import build_detectron2_config  # noqa: E402
from tasks.detection.train import METRICS_LOG, read_metrics_log, split_metrics, train_worker  # noqa: E402
from transfer.config import compose, validate  # noqa: E402
from transfer.run import run_one  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e]


def _train(tmp_path: Path, overrides: list[str]) -> tuple[list[float], dict[str, float]]:
    """Train in this process; returns the per-iteration total losses and the final test metrics."""
    cfg = validate(compose(overrides))
    d2cfg = build_detectron2_config(cfg, tmp_path / "out")
    trainer = train_worker(d2cfg, cfg.task, resume=False)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    records = read_metrics_log(tmp_path / "out" / METRICS_LOG)
    metrics, _, _ = split_metrics([r for r in records if "bbox/AP" in r][-1])
    return losses, metrics


def _assert_ap(metrics: dict[str, float], keys: list[str]) -> None:
    for key in keys:
        assert key in metrics, sorted(metrics)
        assert 0.0 <= metrics[key] <= 100.0 and not math.isnan(metrics[key])


def _assert_loss_went_down(losses: list[float]) -> None:
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, losses


@pytest.fixture(scope="module")
def coco_run(coco_root, fast_overrides, tmp_path_factory):
    # Frozen backbone: the 20 iterations train FPN and heads, which keeps the test fast on CPU.
    return _train(tmp_path_factory.mktemp("coco_run"), [
        "task=coco_instance_seg", "backbone=rs50", f"task.data_dir={coco_root}", "trainer.max_steps=20",
        "trainer.log_every_n_steps=5", "protocol.freeze_backbone=true", *fast_overrides])


@pytest.fixture(scope="module")
def voc_run(voc_root, fast_overrides, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("voc_run"), [
        "task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
        "trainer.max_steps=20", "trainer.log_every_n_steps=5", "protocol.freeze_backbone=true", *fast_overrides])


def test_coco_mask_rcnn_loss_goes_down(coco_run):
    _assert_loss_went_down(coco_run[0])


def test_coco_evaluation_reports_box_and_mask_ap(coco_run):
    _assert_ap(coco_run[1], ["test/AP", "test/AP50", "test/AP75", "test/mask_AP", "test/mask_AP50"])


def test_voc_faster_rcnn_loss_goes_down(voc_run):
    _assert_loss_went_down(voc_run[0])


def test_voc_evaluation_reports_ap(voc_run):
    metrics = voc_run[1]
    _assert_ap(metrics, ["test/AP", "test/AP50", "test/AP75"])
    assert not any("mask" in k for k in metrics)


@pytest.mark.parametrize("recipe", ["coco_retinanet", "coco_cascade_mask_rcnn"])
def test_other_architectures_run_through_the_adapter(recipe, coco_root, fast_overrides, tmp_path):
    results = run_one([f"task={recipe}", f"task.data_dir={coco_root}", "trainer.max_steps=2",
                       f"run.dir={tmp_path}", *fast_overrides])
    _assert_ap(results["metrics"], ["test/AP", "test/AP50"])
    assert (tmp_path / "results.json").exists()


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread fixture, for the run's own process(es)
    return subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_coco_instance_seg_end_to_end(coco_root, fast_overrides, tmp_path):
    out = _cli(["task=coco_instance_seg", "backbone=rs50", f"task.data_dir={coco_root}", "trainer.max_steps=2",
                f"run.dir={tmp_path}", *fast_overrides])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "coco_instance_seg" and results["backbone"] == "rs50"
    _assert_ap(results["metrics"], ["test/AP", "test/AP50", "test/AP75", "test/mask_AP"])
    assert results["weights"]["source"] == "random"
    assert (tmp_path / "checkpoints" / "model_final.pth").exists()


def test_voc_detection_end_to_end(voc_root, fast_overrides, tmp_path):
    out = _cli(["task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                "trainer.max_steps=2", f"run.dir={tmp_path}", *fast_overrides])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    _assert_ap(results["metrics"], ["test/AP", "test/AP50", "test/AP75"])
