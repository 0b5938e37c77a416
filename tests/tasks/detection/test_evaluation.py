"""What a finished detection run reports: VOC AP without classes that have no ground truth, distinct bad files."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.detectron2
pytest.importorskip("detectron2", reason="detectron2 is not installed; it is not on PyPI, build it from source "
                    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) to run these tests")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from PIL import Image  # noqa: E402

from tasks.detection.data import PreparedData, prepare_data, register_data  # noqa: E402
from tasks.detection.evaluation import VOCEvaluator  # noqa: E402
from tasks.detection.mapper import UNREADABLE_LOG  # noqa: E402
from tasks.detection.train import METRICS_LOG, collect, split_metrics  # noqa: E402
from tasks.detection.translate import build_detectron2_config  # noqa: E402
from transfer.config import compose, validate  # noqa: E402
from transfer.errors import DataError  # noqa: E402


def _perfect_predictions(dataset: list[dict]) -> list[tuple[dict, dict]]:
    """(input, output) pairs whose boxes are the ground truth itself, each with score 0.9."""
    pairs = []
    for d in dataset:
        boxes = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes, inst.scores = Boxes(boxes), torch.full((len(boxes),), 0.9)
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        pairs.append(({"image_id": d["image_id"]}, {"instances": inst}))
    return pairs


def test_a_class_without_test_objects_leaves_the_voc_mean_and_is_undefined(voc_root, tmp_path):
    # green is a class of the task but no test image has a green object: its AP is undefined, not 0.
    cfg = validate(compose(["task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue,green]",
                            "backbone.weights=random", "logger.wandb.mode=disabled"]))
    splits = register_data(cfg.task)
    evaluator = VOCEvaluator(splits.test, tmp_path)
    evaluator.reset()
    for inp, out in _perfect_predictions(DatasetCatalog.get(splits.test)):
        evaluator.process([inp], [out])
    result = evaluator.evaluate()["bbox"]
    assert result["AP50-red"] == pytest.approx(100.0) and result["AP50-blue"] == pytest.approx(100.0)
    assert math.isnan(result["AP50-green"])
    assert result["AP50"] == pytest.approx(100.0), "the class without objects was averaged in as AP 0"
    metrics, per_class, undefined = split_metrics(result if "bbox/AP" in result else
                                                  {f"bbox/{k}": v for k, v in result.items()})
    assert metrics["test/ap50"] == pytest.approx(100.0) and undefined == ["test/ap50/green"]
    assert set(per_class["test/ap50"]) == {"red", "blue"}


class _Logger:
    def log(self, *a, **k): ...
    def summary(self, *a, **k): ...
    def table(self, *a, **k): ...


def _finished_run(tmp_path: Path, voc_root: Path, unreadable: list[str], max_bad_fraction: float, record: dict):
    """A run folder as detectron2 leaves it (metrics.json, unreadable_images.jsonl), read back by ``collect``."""
    cfg = validate(compose(["task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                            "backbone.weights=random", "logger.wandb.mode=disabled", "trainer.max_steps=2",
                            f"task.max_bad_fraction={max_bad_fraction}"]))
    out = tmp_path / "checkpoints"
    out.mkdir(parents=True)
    (out / METRICS_LOG).write_text(json.dumps({"iteration": 2, "detections/images": 4, "detections/count": 9,
                                               **record}) + "\n")
    (out / UNREADABLE_LOG).write_text("".join(json.dumps({"file": f, "error": "OSError: image file is truncated"})
                                              + "\n" for f in unreadable))
    d2cfg = build_detectron2_config(cfg, out)
    data = PreparedData(splits=None, exclude=frozenset(), skipped=[],
                        totals={"2007_trainval": 6, "2012_trainval": 4, "2007_test": 4})
    return collect(SimpleNamespace(cfg=cfg, logger=_Logger()), d2cfg, data, {"source": "random"})


BBOX = {"bbox/AP": 50.0, "bbox/AP50": 80.0, "bbox/AP75": 55.0, "bbox/AP50-red": 80.0, "bbox/AP50-blue": 80.0}


def test_an_image_unreadable_mid_run_counts_once_however_often_it_was_drawn(voc_root, tmp_path):
    # One file failed on three draws, another on one: two files of ten, within 0.25 of the training set.
    drawn = ["a.jpg", "a.jpg", "a.jpg", "b.jpg"]
    output = _finished_run(tmp_path, voc_root, drawn, 0.25, BBOX)
    assert output.counts["unreadable_during_training"] == 2
    assert [(u["file"], u["draws"]) for u in output.extra["unreadable_during_training"]] == [("a.jpg", 3),
                                                                                             ("b.jpg", 1)]
    # Three distinct files of ten exceed 0.25: the limit counts files, not draws.
    with pytest.raises(DataError, match="3 training images became unreadable.*3 files, more than"):
        _finished_run(tmp_path / "more", voc_root, [*drawn, "c.jpg"], 0.25, BBOX)


def test_undefined_metrics_are_counted_and_named_in_the_log(voc_root, tmp_path, caplog):
    record = {**BBOX, "bbox/AP50-green": math.nan}
    with caplog.at_level(logging.WARNING, logger="tasks.detection.train"):
        output = _finished_run(tmp_path, voc_root, [], 0.01, record)
    assert output.counts["undefined_metrics"] == 1 and output.extra["undefined_metrics"] == ["test/ap50/green"]
    assert "test/ap50/green" in caplog.text


def test_an_image_smaller_than_its_annotation_is_refused_before_training(voc_root, tmp_path):
    # A downscaled copy: the JPEG is 48x40, its XML still says 96x80, so every box would be misplaced.
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    for year, image_id in (("2012", "2012_trainval_0001"), ("2007", "2007_test_0002")):
        path = root / f"VOCdevkit/VOC{year}/JPEGImages/{image_id}.jpg"
        with Image.open(path) as img:
            small = img.resize((48, 40))
        small.save(path, quality=95)
    cfg = validate(compose(["task=voc_detection", f"task.data_dir={root}", "task.class_names=[red,blue]",
                            "backbone.weights=random", "logger.wandb.mode=disabled"]))
    with pytest.raises(DataError) as err:
        prepare_data(cfg.task, cache_dir=tmp_path / "cache", workers=1)
    message = str(err.value)
    assert "2 image(s) differ in size" in message and "image 48x40, annotation 96x80" in message
    assert "2012_trainval_0001.jpg" in message and "2007_test_0002.jpg" in message
    # The verdict and size come from the scan cache the second time: the same refusal.
    with pytest.raises(DataError, match="2 image"):
        prepare_data(cfg.task, cache_dir=tmp_path / "cache", workers=1)
