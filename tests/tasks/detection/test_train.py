"""Training and evaluation on synthetic COCO and VOC data, in process and through ``python -m transfer.run``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.detectron2]
pytest.importorskip("detectron2", reason="detectron2 is not installed; it is not on PyPI, build it from source "
                    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) to run these tests")

from detectron2.data import detection_utils  # noqa: E402

from tasks.detection.data import register_data  # noqa: E402
from tasks.detection.images import decode_error  # noqa: E402
from tasks.detection.schema import METRICS  # noqa: E402
from tasks.detection.train import METRICS_LOG, read_metrics_log, split_metrics, train_worker  # noqa: E402
from tasks.detection.translate import build_detectron2_config  # noqa: E402
from transfer.config import compose, validate  # noqa: E402
from transfer.errors import ConfigError, DataError  # noqa: E402
from transfer.report import build_comparison, find_results  # noqa: E402
from transfer.run import main, run_one  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _train(tmp_path: Path, overrides: list[str]) -> tuple[list[float], dict[str, float]]:
    """Train in this process; returns the per-iteration total losses and the final test metrics."""
    cfg = validate(compose(overrides))
    d2cfg = build_detectron2_config(cfg, tmp_path / "out", register_data(cfg.task))
    trainer = train_worker(d2cfg, cfg.task, resume=False)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    records = read_metrics_log(tmp_path / "out" / METRICS_LOG)
    metrics, _, _ = split_metrics([r for r in records if "bbox/AP" in r][-1])
    return losses, metrics


def _assert_ap(metrics: dict[str, float], keys: list[str]) -> None:
    for key in keys:
        assert key in metrics, sorted(metrics)
        assert 0.0 <= metrics[key] <= 100.0 and not math.isnan(metrics[key])
    assert set(metrics) <= set(METRICS), "an emitted metric key is not declared by the adapter"


def _assert_loss_went_down(losses: list[float]) -> None:
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, losses


@pytest.fixture(scope="module")
def coco_run(coco_root, fast_overrides, tmp_path_factory):
    # Frozen backbone: the 20 iterations train FPN and heads, which keeps the test fast on CPU.
    return _train(tmp_path_factory.mktemp("coco_run"), [
        "task=coco_instance_seg", "backbone=rs50", f"task.data_dir={coco_root}", "trainer.max_steps=20",
        "trainer.log_every_n_steps=5", "protocol=frozen", *fast_overrides])


@pytest.fixture(scope="module")
def voc_run(voc_root, fast_overrides, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("voc_run"), [
        "task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
        "trainer.max_steps=20", "trainer.log_every_n_steps=5", "protocol=frozen", *fast_overrides])


def test_coco_mask_rcnn_loss_goes_down(coco_run):
    _assert_loss_went_down(coco_run[0])


def test_coco_evaluation_reports_box_and_mask_ap(coco_run):
    _assert_ap(coco_run[1], ["test/ap", "test/ap50", "test/ap75", "test/mask_ap", "test/mask_ap50"])


def test_voc_faster_rcnn_loss_goes_down(voc_run):
    _assert_loss_went_down(voc_run[0])


def test_voc_evaluation_reports_ap(voc_run):
    metrics = voc_run[1]
    _assert_ap(metrics, ["test/ap", "test/ap50", "test/ap75"])
    assert not any("mask" in k for k in metrics)


def test_split_metrics_lower_cases_keys_and_separates_classes():
    record = {"iteration": 9, "bbox/AP": 40.0, "bbox/AP50": 60.0, "bbox/APl": float("nan"), "bbox/AP-red": 30.0,
              "bbox/AP50-t-shirt": 55.0, "segm/APs": 12.0, "detections/count": 7, "total_loss": 1.0}
    metrics, per_class, undefined = split_metrics(record)
    assert metrics == {"test/ap": 40.0, "test/ap50": 60.0, "test/mask_aps": 12.0}
    assert per_class == {"test/ap": {"red": 30.0}, "test/ap50": {"t-shirt": 55.0}}
    assert undefined == ["test/apl"]
    assert set(metrics) <= set(METRICS)


@pytest.mark.parametrize("recipe", ["coco_retinanet", "coco_cascade_mask_rcnn"])
def test_other_architectures_run_through_the_adapter(recipe, coco_root, fast_overrides, tmp_path):
    results = run_one([f"task={recipe}", f"task.data_dir={coco_root}", "trainer.max_steps=2",
                       f"run.dir={tmp_path}", *fast_overrides])
    _assert_ap(results["metrics"], ["test/ap", "test/ap50"])
    assert results["primary_metric"] == "test/ap"
    assert (tmp_path / "results.json").exists()


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # as the one_thread fixture, for the run's own process(es)
           "PYTHONPATH": str(ROOT)}
    # In the test's own working folder (conftest.py): the default caches under ./runs stay out of the checkout.
    return subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=Path.cwd(), capture_output=True,
                          text=True, timeout=900, env=env)


def test_coco_instance_seg_end_to_end(coco_root, fast_overrides, tmp_path):
    out = _cli(["task=coco_instance_seg", "backbone=rs50", f"task.data_dir={coco_root}", "trainer.max_steps=2",
                f"run.dir={tmp_path}", *fast_overrides])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "coco_instance_seg" and results["backbone"] == "rs50"
    _assert_ap(results["metrics"], ["test/ap", "test/ap50", "test/ap75", "test/mask_ap"])
    assert results["weights"]["source"] == "random"
    assert (tmp_path / "checkpoints" / "model_final.pth").exists()
    # COCO's per-class AP (its evaluator's AP-<class>) is kept, by class name.
    assert set(results["extra"]["per_class_ap"]["test/ap"]) == {"red", "blue"}


# --- frozen vs fine-tuned, resume, undecodable images: one VOC copy with a truncated JPEG in train and test ----


@pytest.fixture(scope="module")
def kept_apart(damaged_voc_root, fast_overrides, tmp_path_factory):
    """A fine-tuned and a frozen run of the same task and backbone, then the fine-tuned one resumed."""
    root, damaged = damaged_voc_root
    runs = tmp_path_factory.mktemp("runs")
    common = ["task=voc_detection", "backbone=rs50", f"task.data_dir={root}", "task.class_names=[red,blue]",
              f"run.root={runs}", "task.max_bad_fraction=0.3", *fast_overrides]
    finetune = run_one([*common, "trainer.max_steps=2"])
    frozen = run_one([*common, "trainer.max_steps=2", "protocol=frozen"])
    frozen_files = {p: p.read_bytes() for p in Path(frozen["run_dir"]).rglob("config.yaml")}
    # A finished run is extended by naming it and allowing the longer schedule (transfer.rundir's rule).
    resumed = run_one([*common, "trainer.max_steps=4", "resume=true", f"run.dir={finetune['run_dir']}",
                       "resume_allow_changes=true"])
    return {"finetune": finetune, "frozen": frozen, "resumed": resumed, "runs": runs, "common": common,
            "frozen_files": frozen_files, "damaged": damaged}


def test_the_fixture_images_really_are_undecodable(damaged_voc_root):
    # Without the scan, detectron2's reader fails on them mid-run (the fault this suite must not have).
    for path in damaged_voc_root[1]:
        assert decode_error(str(path)) is not None
        with pytest.raises(OSError, match="truncated"):
            detection_utils.read_image(str(path), format="RGB")


def test_frozen_and_finetuned_runs_land_in_different_folders(kept_apart):
    finetune, frozen = kept_apart["finetune"], kept_apart["frozen"]
    assert Path(finetune["run_dir"]).parent.name == "rs50-finetune"
    assert Path(frozen["run_dir"]).parent.name == "rs50-frozen"
    assert (finetune["protocol"], frozen["protocol"]) == ("finetune", "frozen")
    assert finetune["recipe"]["freeze_at"] == 2 and frozen["recipe"]["freeze_at"] == 5
    on_disk = json.loads((Path(frozen["run_dir"]) / "results.json").read_text())
    assert on_disk["protocol"] == "frozen"
    # The published VOC rows are C4 (filed under voc_detection_moco_c4): the FPN recipe shows none of them as peers.
    assert frozen["baselines"] == [] and finetune["baselines"] == []
    # Both record the facts rows are matched on.
    assert (frozen["extra"]["detector"], frozen["extra"]["freeze_backbone"]) == ("faster_rcnn_fpn", True)
    assert finetune["extra"]["freeze_backbone"] is False
    assert finetune["extra"]["train_splits"] == "2007_trainval+2012_trainval"


def test_finetune_with_a_frozen_backbone_is_a_frozen_run(voc_root, fast_overrides, tmp_path):
    results = run_one(["task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}",
                       "task.class_names=[red,blue]", f"run.root={tmp_path}", "protocol=finetune",
                       "protocol.freeze_backbone=true", "trainer.max_steps=1", *fast_overrides])
    assert Path(results["run_dir"]).parent.name == "rs50-frozen"
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert on_disk["protocol"] == "frozen" and on_disk["protocol_config"] == {"name": "frozen"}
    assert on_disk["recipe"]["freeze_at"] == 5 and on_disk["extra"]["freeze_backbone"] is True


def test_both_protocols_appear_in_the_report(kept_apart):
    found = find_results(kept_apart["runs"])
    (voc,) = [t for t in build_comparison(found) if t.task == "voc_detection"]
    columns = {(c.protocol, c.metric) for c in voc.columns}
    assert {("finetune", "test/ap50"), ("frozen", "test/ap50")} <= columns
    (rs50,) = [e for e in voc.entries if e.name == "rs50"]
    assert rs50.values[("frozen", "test/ap50")] == kept_apart["frozen"]["metrics"]["test/ap50"]
    assert rs50.values[("finetune", "test/ap50")] == kept_apart["resumed"]["metrics"]["test/ap50"]


def test_resume_continues_the_finetuned_run_and_leaves_the_frozen_one_alone(kept_apart):
    resumed, finetune = kept_apart["resumed"], kept_apart["finetune"]
    assert resumed["run_dir"] == finetune["run_dir"]
    records = read_metrics_log(Path(resumed["run_dir"]) / "checkpoints" / METRICS_LOG)
    evaluations = [r["iteration"] for r in records if "bbox/AP" in r]
    assert evaluations == [2, 4], "the resumed run restarted from scratch or evaluated another run"
    for path, data in kept_apart["frozen_files"].items():
        assert path.read_bytes() == data, f"{path} of the frozen run was rewritten"
    spent = resumed["extra"]["train_time_all_attempts_s"]
    assert spent > finetune["extra"]["train_time_all_attempts_s"] > 0


def test_resume_with_another_model_is_refused_before_writing(kept_apart):
    run_dir = Path(kept_apart["finetune"]["run_dir"])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="task.freeze_at differ.*another run, not a continuation"):
        run_one([*kept_apart["common"], "trainer.max_steps=6", "resume=true", f"run.dir={run_dir}",
                 "resume_allow_changes=true", "task.freeze_at=3"])
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_truncated_jpegs_are_skipped_named_and_counted(kept_apart):
    results = kept_apart["frozen"]
    assert results["counts"]["skipped_images"] == 2 and results["counts"]["skipped_test_images"] == 1
    named = {(s["split"], Path(s["file"]).name) for s in results["extra"]["skipped_images"]}
    assert named == {("2012_trainval", "2012_trainval_0001.jpg"), ("2007_test", "2007_test_0002.jpg")}
    assert all("truncated" in s["error"] for s in results["extra"]["skipped_images"])
    # The VOC evaluator scored the 3 readable test images only: its image list left the damaged one out.
    evaluated = Path(results["run_dir"]) / "checkpoints" / "inference" / "test_evaluated.txt"
    assert evaluated.read_text().split() == ["2007_test_0000", "2007_test_0001", "2007_test_0003"]
    assert results["extra"]["test_images"] == 3


def test_voc_per_class_ap_is_filled(kept_apart):
    per_class = kept_apart["frozen"]["extra"]["per_class_ap"]["test/ap50"]
    assert set(per_class) == {"red", "blue"}
    assert all(0.0 <= v <= 100.0 for v in per_class.values())


def test_results_record_the_solver_actually_used(kept_apart):
    recipe = kept_apart["frozen"]["recipe"]
    assert (recipe["protocol"], recipe["architecture"], recipe["ims_per_batch"]) == ("frozen", "FPN", 2)
    assert recipe["base_lr"] == 0.01 and recipe["max_iter"] == 2 and recipe["warmup_iters"] == 1
    assert "randaugment" not in recipe and "label_smoothing" not in recipe  # classification's, unused here


def test_too_many_undecodable_images_stop_the_run(damaged_voc_root, fast_overrides, tmp_path):
    with pytest.raises(DataError, match=r"2012_trainval.*1 of 4 images do not decode.*2012_trainval_0001\.jpg"):
        run_one(["task=voc_detection", f"task.data_dir={damaged_voc_root[0]}", "task.class_names=[red,blue]",
                 f"run.root={tmp_path}", "task.max_bad_fraction=0.2", "trainer.max_steps=2", *fast_overrides])


def test_a_detector_without_detections_fails_with_one_line(voc_root, fast_overrides, tmp_path, capsys):
    # No score exceeds 1.0, so the detector returns nothing: that is not a measurement of AP.
    code = main(["task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                 f"run.dir={tmp_path}", "trainer.max_steps=1", "protocol=frozen", *fast_overrides,
                 "task.opts=[MODEL.ROI_HEADS.SCORE_THRESH_TEST,1.0]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "made no detection on the 4 test images" in err[0]
    assert not (tmp_path / "results.json").exists()


def test_moco_c4_recipe_trains_and_evaluates(voc_root, fast_overrides, tmp_path):
    results = run_one(["task=voc_detection_moco_c4", "backbone=rs50", f"task.data_dir={voc_root}",
                       "task.class_names=[red,blue]", "trainer.max_steps=2", f"run.dir={tmp_path}", *fast_overrides,
                       "task.opts=[TEST.PRECISE_BN.NUM_ITER,2,MODEL.RPN.POST_NMS_TOPK_TRAIN,100,"
                       "MODEL.RPN.POST_NMS_TOPK_TEST,50,MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,64,"
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST,0.0]"])
    _assert_ap(results["metrics"], ["test/ap", "test/ap50", "test/ap75"])
    recipe = results["recipe"]
    assert (recipe["architecture"], recipe["backbone_norm"], recipe["freeze_at"]) == ("C4", "naiveSyncBN", 0)
    assert recipe["res5_extra_norm"] and recipe["precise_bn"]
    assert results["primary_metric"] == "test/ap50"
