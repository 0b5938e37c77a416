"""Published VOC detection rows meet the runs of the recipe that reproduces them, and only those."""
from __future__ import annotations

import pytest

from tasks.detection.schema import comparison_facts, detector_name
from transfer.compare import assess
from transfer.config import compose, validate
from transfer.results import build_results
from transfer.tasks import TaskOutput

METRICS = {"test/ap": 55.0, "test/ap50": 82.0, "test/ap75": 62.0}
MOCO_FILE = {"source": "file:moco_v2_800ep.safetensors", "sha256": "0" * 64}


@pytest.mark.parametrize("base_config, name", [
    ("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", "faster_rcnn_c4"),
    ("PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml", "faster_rcnn_fpn"),
    ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", "mask_rcnn_fpn"),
    ("COCO-Detection/retinanet_R_50_FPN_3x.yaml", "retinanet_fpn"),
    ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "cascade_mask_rcnn_fpn"),
])
def test_detector_name_is_the_zoo_design_without_its_depth_and_schedule(base_config, name):
    assert detector_name(base_config) == name


def test_facts_tell_c4_from_fpn_frozen_from_finetuned_and_name_the_splits(voc_root):
    common = [f"task.data_dir={voc_root}", "task.class_names=[red,blue]", "backbone.weights=random"]
    c4 = comparison_facts(validate(compose(["task=voc_detection_moco_c4", *common])))
    assert c4 == {"detector": "faster_rcnn_c4", "freeze_backbone": False,
                  "train_splits": "2007_trainval+2012_trainval", "test_split": "2007_test"}
    fpn = comparison_facts(validate(compose(["task=voc_detection", "protocol=frozen", *common])))
    assert (fpn["detector"], fpn["freeze_backbone"]) == ("faster_rcnn_fpn", True)


def _results(overrides: list[str], voc_root) -> dict:
    """results.json of a finished run of these settings, with the facts and solver the adapter records."""
    from tasks.detection.translate import build_detectron2_config, solver_record

    cfg = validate(compose(["backbone=moco_v2_r50", "backbone.weights=random", f"task.data_dir={voc_root}",
                            "task.class_names=[red,blue]", "logger.wandb.mode=disabled", *overrides]))
    d2 = build_detectron2_config(cfg)
    output = TaskOutput(metrics=METRICS, weights=MOCO_FILE, primary_metric="test/ap50",
                        recipe={"protocol": cfg.protocol.name, **solver_record(d2)}, extra=comparison_facts(cfg))
    return build_results(cfg, output, 1.0, voc_root)


def _comparable(verdict: dict) -> set[tuple[str, str, float]]:
    return {(r["method"], r["metric"], r["value"]) for r in verdict["baselines"] if r["comparable"]}


@pytest.mark.detectron2
def test_a_moco_c4_run_at_mocos_settings_meets_mocos_rows(voc_root):
    pytest.importorskip("detectron2", reason="detectron2 is not installed; build it from source to run this test")
    verdict = assess(_results(["task=voc_detection_moco_c4"], voc_root))
    assert verdict["comparable"], verdict["comparison"]["reasons"]
    assert _comparable(verdict) == {
        ("moco_v1", "test/ap50", 81.5), ("moco_v1", "test/ap", 55.9), ("moco_v1", "test/ap75", 62.6),
        ("moco_v2", "test/ap50", 82.4), ("moco_v2", "test/ap", 57.0), ("moco_v2", "test/ap75", 63.6),
        ("moco_v2", "test/ap50", 82.5), ("moco_v2", "test/ap", 57.4), ("moco_v2", "test/ap75", 64.0)}
    assert verdict["comparison"]["facts"]["detector"] == "faster_rcnn_c4"
    # The frozen BYOL rows stay context, saying why.
    byol = [r for r in verdict["baselines"] if r["method"] == "byol"]
    assert byol and all("protocol: row frozen, run finetune" in r["context"] for r in byol)


@pytest.mark.detectron2
def test_a_shortened_or_fpn_run_does_not_meet_mocos_rows(voc_root):
    pytest.importorskip("detectron2", reason="detectron2 is not installed; build it from source to run this test")
    short = assess(_results(["task=voc_detection_moco_c4", "trainer.max_steps=2"], voc_root))
    assert not _comparable(short)
    assert all("max_iter: row 24000, run 2" in r["context"] for r in short["baselines"] if r["method"] == "moco_v2")
    one_split = assess(_results(["task=voc_detection_moco_c4", "task.train_splits=[2007_trainval]"], voc_root))
    assert not _comparable(one_split)
    # The FPN recipe has no published rows of its own: MoCo's C4 numbers are never shown as its peers.
    assert assess(_results(["task=voc_detection"], voc_root))["baselines"] == []


@pytest.mark.detectron2
def test_the_documented_byol_command_meets_byols_frozen_rows(voc_root):
    pytest.importorskip("detectron2", reason="detectron2 is not installed; build it from source to run this test")
    # docs/detection.md: BYOL App. D.5 on the MoCo C4 recipe, frozen, VOC07 trainval, BYOL's schedule.
    verdict = assess(_results(["task=voc_detection_moco_c4", "protocol=frozen", "task.train_splits=[2007_trainval]",
                               "task.solver.base_lr=0.001", "task.solver.max_iter=1500000",
                               "task.solver.steps=[1000000,1200000]"], voc_root))
    assert verdict["comparable"], verdict["comparison"]["reasons"]
    assert _comparable(verdict) == {("moco", "test/ap50", 74.9), ("simclr_byol_repro", "test/ap50", 75.2),
                                    ("byol", "test/ap50", 77.5)}
