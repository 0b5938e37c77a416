"""Tiny detection data sets written in the real on-disk formats: COCO json + images, Pascal VOC XML trees.

Each image shows one to three filled rectangles on a grey background; a red rectangle is class
``red``, a blue one class ``blue``. Boxes are large relative to the image so a few iterations of
training find them.

Tests that need detectron2 carry the ``detectron2`` marker (``pytest -m detectron2`` selects them). Where
detectron2 is not installed they are skipped with the reason; with ``TRANSFER_REQUIRE_DETECTRON2=1`` (set by
``.ci/run``) a missing or broken detectron2 stops the session and any skipped detectron2 test fails it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from detection_copies import CLASSES, synthetic_images, truncate_jpeg, write_coco, write_voc  # noqa: F401

# The detectron2 requirement (skips with the reason; TRANSFER_REQUIRE_DETECTRON2=1 turns them into failures) is a
# plugin of the whole test session, tests/needs_detectron2.py, so segmentation's detectron2 tests count too.
from needs_detectron2 import DETECTRON2_PROBLEM, REQUIRE_ENV, SKIP_REASON  # noqa: E402,F401


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the detectors' many small CPU ops lose more to thread hand-offs than they gain
    when the cores are shared (measured here: 1.3 s per Mask R-CNN iteration on one thread, 3-12 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"), {"train2017": 8, "val2017": 4})


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"), {("2007", "trainval"): 6, ("2012", "trainval"): 4,
                                                      ("2007", "test"): 4})


@pytest.fixture(scope="session")
def damaged_voc_root(voc_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A copy of ``voc_root`` with one truncated JPEG in VOC2012 trainval and one in VOC2007 test."""
    root = tmp_path_factory.mktemp("voc_damaged") / "voc"
    shutil.copytree(voc_root, root)
    damaged = [root / "VOCdevkit/VOC2012/JPEGImages/2012_trainval_0001.jpg",
               root / "VOCdevkit/VOC2007/JPEGImages/2007_test_0002.jpg"]
    for path in damaged:
        truncate_jpeg(path)
    return root, damaged


# Small and fast: tiny images, two images per iteration, few proposals and sampled RoIs, every box
# scored at test time so that evaluation has detections to rank after a few iterations.
FAST = ["task.input.min_size_train=[80]", "task.input.max_size_train=128", "task.input.min_size_test=80",
        "task.input.max_size_test=128", "task.solver.ims_per_batch=2", "task.solver.base_lr=0.01",
        "trainer.num_workers=0", "backbone.weights=random", "logger.wandb.mode=disabled",
        "task.opts=[MODEL.RPN.POST_NMS_TOPK_TRAIN,100,MODEL.RPN.POST_NMS_TOPK_TEST,50,"
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,64,MODEL.ROI_HEADS.SCORE_THRESH_TEST,0.0,"
        "MODEL.RETINANET.SCORE_THRESH_TEST,0.0]"]


@pytest.fixture(scope="session")
def fast_overrides() -> tuple[str, ...]:
    return tuple(FAST)
