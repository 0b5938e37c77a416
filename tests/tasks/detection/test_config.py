"""Detection settings, data layout checks and the detectron2 requirement: most run without detectron2."""
from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.detection import requirement, schema
from tasks.detection.data import LAYOUTS, check_layout, split_classes
from tasks.detection.schema import DetectionTaskConfig
from transfer.config import RunConfig, compose, recipe_names, task_adapter, validate
from transfer.errors import ConfigError, DataError, TransferError
from transfer.registry import UnknownNameError
from transfer.run import main
from transfer.tasks import TASKS

ROOT = Path(__file__).resolve().parents[3]
VOC_CLASSES = "task.class_names=[red,blue]"  # the classes of the conftest's VOC-layout copy
# (every recipe composes naming the adapter its YAML names: tests/test_config.py::test_every_task_recipe_composes)
DETECTION_RECIPES = tuple(t for t in recipe_names("task") if task_adapter(t) == "detection")


@functools.cache
def _validated_once(overrides: tuple[str, ...]) -> RunConfig:
    return validate(compose(list(overrides)))


def _validated(*overrides: str) -> RunConfig:
    """``validate(compose(overrides))``, composed once per distinct list in this module (several tests check the
    same recipe); each caller gets its own deep copy."""
    return copy.deepcopy(_validated_once(overrides))


def _task(**kw) -> DetectionTaskConfig:
    base = dict(name="t", dataset="voc", base_config="PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml",
                train_splits=["2007_trainval"], test_split="2007_test")
    return DetectionTaskConfig(**{**base, **kw})


def test_every_detection_recipe_is_found():
    assert {"voc_detection", "coco_detection", "coco_instance_seg", "coco_retinanet", "coco_cascade_mask_rcnn",
            "voc_detection_moco_c4", "voc_detection_ssl_transfer"} <= set(DETECTION_RECIPES)


@pytest.mark.parametrize("recipe", DETECTION_RECIPES)
@pytest.mark.parametrize("protocol", ["finetune", "frozen"])
def test_recipes_compose_with_both_protocols(recipe, protocol, voc_root, coco_root):
    data = (f"task.data_dir={coco_root}",) if recipe.startswith("coco") else (f"task.data_dir={voc_root}", VOC_CLASSES)
    cfg = _validated(f"task={recipe}", f"protocol={protocol}", *data)
    assert isinstance(cfg.task, DetectionTaskConfig)
    assert cfg.protocol.name == protocol
    assert cfg.task.train_splits and cfg.task.test_split


def test_recipes_default_to_finetune(voc_root):
    cfg = _validated("task=voc_detection", f"task.data_dir={voc_root}", VOC_CLASSES)
    assert cfg.protocol.name == "finetune"


def test_protocols_other_than_finetune_and_frozen_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="protocol='linear' does not apply"):
        validate(compose(["task=voc_detection", "protocol=linear", f"task.data_dir={tmp_path}"]))


def test_freeze_backbone_on_finetune_is_the_frozen_protocol(voc_root, tmp_path):
    """protocol=finetune protocol.freeze_backbone=true is frozen transfer wherever protocol=frozen is: every level
    fixed, the run folder <backbone>-frozen, results.json's protocol and protocol_config, the comparison facts."""
    from transfer.compare import run_reasons
    from transfer.results import protocol_config
    from transfer.rundir import plan_run_dir

    base = ["task=voc_detection", f"task.data_dir={voc_root}", VOC_CLASSES, f"run.root={tmp_path}"]
    frozen = validate(compose([*base, "protocol=frozen"]))
    cfg = validate(compose([*base, "protocol=finetune", "protocol.freeze_backbone=true"]))
    assert cfg.protocol.name == "frozen" and cfg.to_yaml() == frozen.to_yaml()
    assert schema.frozen_levels(cfg) == 5  # every level of rs50, as under protocol=frozen
    assert plan_run_dir(cfg).path.parent.name == "rs50-frozen"
    assert protocol_config(cfg) == {"name": "frozen"}
    assert schema.comparison_facts(cfg)["freeze_backbone"] is True
    results = {"task": "voc_detection", "adapter": "detection", "protocol": cfg.protocol.name, "backbone": "rs50",
               "weights": {"source": "random"}, "protocol_config": protocol_config(cfg), "extra": {}}
    assert any("features of an untrained network" in r for r in run_reasons(results))


def test_results_record_only_the_protocol_keys_detection_uses(voc_root):
    # detectron2's config holds the solver: the classification fields (lr 0.01, steps 20000, batch 256, ...) are
    # neither recorded in results.json's protocol_config nor accepted when changed.
    from transfer.results import protocol_config

    data = [f"task.data_dir={voc_root}", VOC_CLASSES]
    base = ["task=voc_detection", *data]
    assert protocol_config(_validated(*base)) == {"name": "finetune", "freeze_backbone": False}
    assert protocol_config(_validated("task=voc_detection", "protocol=frozen", *data)) == {"name": "frozen"}
    # the solver is detectron2's (task.solver, task.opts): the fine-tune protocol has no training value
    with pytest.raises(ConfigError, match=r"unknown key 'protocol.lr'.*Valid keys of protocol: name, freeze_backbone"):
        validate(compose([*base, "protocol.lr=0.5"]))


def test_frozen_levels_follow_the_protocol(voc_root):
    data = [f"task.data_dir={voc_root}", VOC_CLASSES]
    assert schema.frozen_levels(_validated("task=voc_detection_ssl_transfer", *data)) == 2
    # ssl-transfer FREEZE_AT 4
    assert schema.frozen_levels(_validated("task=voc_detection_ssl_transfer", "protocol=frozen", *data)) == 4
    everything = _validated("task=voc_detection", "protocol=frozen", *data)
    assert schema.frozen_levels(everything) == 5


def test_the_adapter_declares_lower_case_metrics_matching_the_baselines():
    from transfer.baselines import load_baselines

    declared = TASKS.get("detection").metrics
    assert all(m == m.lower() for m in declared) and "test/ap50" in declared and "test/mask_ap" in declared
    detection_tasks = set(DETECTION_RECIPES)
    published = {b.metric for b in load_baselines() if b.task in detection_tasks}
    assert published and published <= set(declared)


@pytest.mark.parametrize("detectron2", [pytest.param(True, marks=pytest.mark.detectron2), False])
def test_base_config_is_checked_with_or_without_detectron2(detectron2):
    if detectron2:
        pytest.importorskip("detectron2", reason="detectron2 is not installed; checks the model-zoo lookup")
    schema.check_base_config("PascalVOC-Detection/faster_rcnn_R_50_C4.yaml", detectron2=detectron2)
    for bad in ("NoSuch/config.yaml", "PascalVOC-Detection", "../../etc/passwd.yaml"):
        with pytest.raises(ConfigError, match="not a detectron2 model-zoo config"):
            schema.check_base_config(bad, detectron2=detectron2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    # In the test's own working folder (conftest.py), never the checkout.
    return subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=Path.cwd(), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("override, fragment", [
    ("task.frozen_freeze_at=6", "task.frozen_freeze_at=6"),
    ("task.max_bad_fraction=1.5", "task.max_bad_fraction=1.5"),
    ("task.solver.ims_per_batch=0", "task.solver.ims_per_batch=0"),
    ("trainer.precision=bf16-mixed", "trainer.precision='bf16-mixed'"),
    ("trainer.devices=2", "trainer.devices=1"),
    ("task.data_dir=/no/such/folder", "/no/such/folder"),
])
def test_bad_values_fail_before_any_run_folder(override, fragment, voc_root, tmp_path, capsys):
    data = [] if override.startswith("task.data_dir") else [f"task.data_dir={voc_root}"]
    code = main(["task=voc_detection", *data, VOC_CLASSES, override, f"run.root={tmp_path / 'runs'}",
                 "logger.wandb.mode=disabled", "trainer.accelerator=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(head_norm="LayerNorm"), "task.head_norm"),
    (dict(backbone_norm="GN"), "GroupNorm cannot replace"),
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
            f"'logger.wandb.mode=disabled', 'backbone.weights=random', '{VOC_CLASSES}']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not on PyPI" in out.stderr and requirement.INSTALL_GUIDE in out.stderr
    assert "Traceback" not in out.stderr


# --- data mistakes stop the run before any run folder exists, naming the file and the fix ---------------------


def _copy(voc_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    return root


def _refused(root: Path, tmp_path: Path, capsys, *extra: str) -> str:
    runs = tmp_path / "runs"
    code = main(["task=voc_detection", f"task.data_dir={root}", f"run.root={runs}", "logger.wandb.mode=disabled",
                 "trainer.accelerator=cpu", "backbone.weights=random", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors and "Traceback" not in err, err[-3000:]
    assert not runs.exists(), "the data mistake was found after the run folder was made"
    return err


def test_an_annotation_class_outside_class_names_names_class_file_and_fix(voc_root, tmp_path, capsys):
    root = _copy(voc_root, tmp_path)
    err = _refused(root, tmp_path, capsys, "task.class_names=[red]")
    assert "'blue' in" in err and "Annotations/" in err and ".xml" in err
    assert "task.class_names=[red,blue]" in err


def test_a_listed_id_without_its_xml_lists_the_missing_paths_and_the_layout(voc_root, tmp_path, capsys):
    root = _copy(voc_root, tmp_path)
    (root / "VOCdevkit/VOC2012/Annotations/2012_trainval_0002.xml").unlink()
    err = _refused(root, tmp_path, capsys, VOC_CLASSES)
    assert "VOC2012/Annotations/2012_trainval_0002.xml" in err and "1 file(s) listed" in err
    assert "ImageSets/Main/<split>.txt" in err  # the expected layout is shown


def test_a_missing_jpeg_is_a_layout_error_not_a_damaged_image(voc_root, tmp_path, capsys):
    root = _copy(voc_root, tmp_path)
    (root / "VOCdevkit/VOC2012/JPEGImages/2012_trainval_0002.jpg").unlink()
    err = _refused(root, tmp_path, capsys, VOC_CLASSES, "task.max_bad_fraction=0.5")
    assert "VOC2012/JPEGImages/2012_trainval_0002.jpg" in err and "missing" in err


def test_a_missing_split_file_is_refused_before_the_run_folder(voc_root, tmp_path, capsys):
    err = _refused(voc_root, tmp_path, capsys, VOC_CLASSES, "task.test_split=2007_val")
    assert "VOC2007/ImageSets/Main/val.txt" in err
