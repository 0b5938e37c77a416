"""Tiny detection data sets written in the real on-disk formats: COCO json + images, Pascal VOC XML trees.

Each image shows one to three filled rectangles on a grey background; a red rectangle is class
``red``, a blue one class ``blue``. Shared by the detection tests (tests/tasks/detection/conftest.py) and the config
tests that compose every task recipe (a detection config is checked against its data before a run starts).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from xml.etree import ElementTree as ET

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


def detection_data_overrides(task: str, root: Path) -> list[str]:
    """``task.data_dir`` (and class names) of a tiny copy in ``root`` in the layout detection ``task`` reads."""
    if task.startswith("coco"):
        return [f"task.data_dir={write_coco(root, {'train2017': 2, 'val2017': 2})}"]
    data = write_voc(root, {("2007", "trainval"): 2, ("2012", "trainval"): 2, ("2007", "test"): 2})
    return [f"task.data_dir={data}", "task.class_names=[red,blue]"]
