"""Tiny detection data sets written in the real on-disk formats: COCO json + images, Pascal VOC XML trees.

Each image shows one to three filled rectangles on a grey background; a red rectangle is class
``red``, a blue one class ``blue``. Boxes are large relative to the image so a few iterations of
training find them.

Tests that need detectron2 carry the ``detectron2`` marker (``pytest -m detectron2`` selects them). Where
detectron2 is not installed they are skipped with the reason; with ``TRANSFER_REQUIRE_DETECTRON2=1`` (set by
``.ci/run``) a missing or broken detectron2 stops the session and any skipped detectron2 test fails it.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import torch

# The detectron2 requirement (skips with the reason; TRANSFER_REQUIRE_DETECTRON2=1 turns them into failures) is a
# plugin of the whole test session, tests/needs_detectron2.py, so segmentation's detectron2 tests count too.
from needs_detectron2 import DETECTRON2_PROBLEM, REQUIRE_ENV, SKIP_REASON  # noqa: E402,F401
from PIL import Image, ImageDraw


def truncate_jpeg(path: Path) -> None:
    """Cut a JPEG file in half: its header still opens, decoding its pixels fails (a partial download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

CLASSES = ("red", "blue")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
IMAGE_SIZE = (96, 80)  # width, height


def synthetic_images(n: int, seed: int) -> list[tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]]:
    """``n`` images with their objects as (class, (x0, y0, x1, y1)) in pixels, exclusive of x1/y1."""
    rng = random.Random(seed)
    width, height = IMAGE_SIZE
    out = []
    for _ in range(n):
        img = Image.new("RGB", IMAGE_SIZE, (128, 128, 128))
        draw = ImageDraw.Draw(img)
        objects = []
        for _ in range(rng.randint(1, 3)):
            cls = rng.choice(CLASSES)
            w, h = rng.randint(24, 48), rng.randint(20, 40)
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=COLOURS[cls])
            objects.append((cls, (x0, y0, x0 + w, y0 + h)))
        out.append((img, objects))
    return out


def write_coco(root: Path, splits: dict[str, int]) -> Path:
    """``root/annotations/instances_<split>.json`` and ``root/<split>/*.jpg`` for each split."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    for s, (split, n) in enumerate(splits.items()):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i, (img, objects) in enumerate(synthetic_images(n, seed=s)):
            name = f"{i:06d}.jpg"
            img.save(root / split / name, quality=95)
            images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
            for cls, (x0, y0, x1, y1) in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": CLASSES.index(cls) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def write_voc(root: Path, splits: dict[tuple[str, str], int]) -> Path:
    """``root/VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}`` for each (year, split)."""
    for s, ((year, split), n) in enumerate(splits.items()):
        base = root / "VOCdevkit" / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        ids = []
        for i, (img, objects) in enumerate(synthetic_images(n, seed=100 + s)):
            image_id = f"{year}_{split}_{i:04d}"
            ids.append(image_id)
            img.save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
            size = ET.SubElement(ann, "size")
            for key, value in (("width", img.width), ("height", img.height), ("depth", 3)):
                ET.SubElement(size, key).text = str(value)
            for cls, (x0, y0, x1, y1) in objects:
                obj = ET.SubElement(ann, "object")
                for key, value in (("name", cls), ("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
                    ET.SubElement(obj, key).text = str(value)
                box = ET.SubElement(obj, "bndbox")
                # VOC boxes are 1-based and inclusive.
                for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
                    ET.SubElement(box, key).text = str(value)
            ET.ElementTree(ann).write(base / "Annotations" / f"{image_id}.xml")
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


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
