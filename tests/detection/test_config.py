"""Detection settings, data layout checks and the detectron2 requirement: most run without detectron2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.detection import requirement
from tasks.detection.config import DetectionTaskConfig
from tasks.detection.data import LAYOUTS, check_layout, split_classes
from transfer.config import compose, validate
from transfer.errors import ConfigError, DataError, TransferError
from transfer.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[2]
DETECTION_RECIPES = ("voc_detection", "coco_detection", "coco_instance_seg", "coco_retinanet",
                     "coco_cascade_mask_rcnn")


def _task(**kw) -> DetectionTaskConfig:
    base = dict(name="t", dataset="voc", base_config="PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml",
                train_splits=["2007_trainval"], test_split="2007_test")
    return DetectionTaskConfig(**{**base, **kw})


@pytest.mark.parametrize("recipe", DETECTION_RECIPES)
def test_recipes_compose_with_the_finetune_protocol(recipe):
    cfg = validate(compose([f"task={recipe}"]))
    assert isinstance(cfg.task, DetectionTaskConfig)
    assert cfg.protocol.name == "finetune"
    assert cfg.task.train_splits and cfg.task.test_split


def test_protocols_other_than_finetune_are_refused():
    with pytest.raises(ConfigError, match="protocol='linear' does not apply"):
        validate(compose(["task=voc_detection", "protocol=linear"]))


@pytest.mark.parametrize("bad, match", [
    (dict(head_norm="LayerNorm"), "task.head_norm"),
    (dict(opts=["MODEL.RPN.NMS_THRESH"]), "KEY VALUE pairs"),
    (dict(train_splits=[]), "train_splits is empty"),
    (dict(freeze_at=-1), "freeze_at"),
])
def test_invalid_settings_raise_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        _task(**bad)


def test_unknown_dataset_layout_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="coco, voc"):
        _task(dataset="pascal")


def test_missing_voc_files_show_the_expected_layout(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007" / "Annotations").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        check_layout(LAYOUTS.get("voc"), tmp_path, ["2007_trainval"])
    message = str(err.value)
    assert "JPEGImages" in message and "trainval.txt" in message and "Annotations" not in message.split("Expected")[0]
    assert "VOCdevkit/" in message.split("Expected layout:")[1]


def test_missing_coco_annotation_file_is_named(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DataError, match="instances_val2017.json"):
        check_layout(LAYOUTS.get("coco"), tmp_path, ["val2017"])


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        check_layout(LAYOUTS.get("coco"), tmp_path / "nope", ["val2017"])


def test_bad_voc_split_name(tmp_path):
    with pytest.raises(DataError, match="2007_trainval"):
        check_layout(LAYOUTS.get("voc"), tmp_path, ["trainval"])


def test_coco_classes_come_from_the_annotation_file(coco_root):
    assert split_classes(LAYOUTS.get("coco"), coco_root, ["train2017", "val2017"], None) == ["red", "blue"]
    with pytest.raises(DataError, match="differ from the categories"):
        split_classes(LAYOUTS.get("coco"), coco_root, ["val2017"], ["cat"])


def test_missing_detectron2_is_a_transfer_error(monkeypatch):
    monkeypatch.setattr(requirement.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TransferError, match="not on PyPI") as err:
        requirement.require_detectron2()
    assert requirement.INSTALL_GUIDE in str(err.value)


@pytest.mark.e2e
def test_run_without_detectron2_stops_with_the_message_and_no_traceback(voc_root, tmp_path):
    # sys.modules[name] = None makes the import system report the package as absent.
    code = ("import sys; sys.modules['detectron2'] = None; from transfer.run import main; "
            f"sys.exit(main(['task=voc_detection', 'task.data_dir={voc_root}', 'run.dir={tmp_path}', "
            "'logger.wandb.mode=disabled', 'backbone.weights=random']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not on PyPI" in out.stderr and requirement.INSTALL_GUIDE in out.stderr
    assert "Traceback" not in out.stderr
