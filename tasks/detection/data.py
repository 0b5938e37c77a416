"""Pascal VOC and COCO in their standard on-disk layouts, checked and registered with detectron2's catalogs.

Each layout turns a split name (``2007_trainval``, ``train2017``) under ``task.data_dir`` into a
detectron2 data set name; detectron2's own loaders read the files (``register_pascal_voc``,
``register_coco_instances``); it is imported only where a split is registered, so a configuration
can be checked where detectron2 is not installed. Catalog names carry a digest of the data
directory and classes, so runs on different copies in one process never collide and registering the
same copy twice is a no-op.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transfer.errors import DataError
from transfer.registry import Registry

VOC_YEARS = ("2007", "2012")
VOC_SPLITS = ("train", "val", "trainval", "test")

VOC_LAYOUT = """\
<data_dir>/VOCdevkit/
  VOC2007/                      (and VOC2012/ for the 07+12 training set)
    Annotations/<image id>.xml
    JPEGImages/<image id>.jpg
    ImageSets/Main/<split>.txt  (trainval.txt, test.txt: one image id per line)"""

COCO_LAYOUT = """\
<data_dir>/
  annotations/instances_<split>.json   (e.g. instances_train2017.json, instances_val2017.json)
  <split>/<file_name>                  (the images of that split, e.g. train2017/000000000009.jpg)"""


@dataclass(frozen=True)
class DatasetLayout:
    """How to find, name and register the splits of one data set family."""

    name: str
    tree: str  # the expected layout, shown in every error
    paths: Callable[[Path, str], list[Path]]  # files/folders a split needs
    classes: Callable[[Path, str, Sequence[str] | None], list[str]]
    register: Callable[[str, Path, str, list[str]], None]
    evaluator: Callable[..., object]  # (catalog name, detectron2 cfg, output dir) -> a DatasetEvaluator


LAYOUTS: Registry[DatasetLayout] = Registry("detection data set layout")


def _voc_year_split(split: str) -> tuple[str, str]:
    year, _, part = split.partition("_")
    if year not in VOC_YEARS or part not in VOC_SPLITS:
        raise DataError(f"Pascal VOC split {split!r} is not <year>_<split> with year in {VOC_YEARS} and split in "
                        f"{VOC_SPLITS}, e.g. 2007_trainval, 2012_trainval, 2007_test.")
    return year, part


def _voc_paths(data_dir: Path, split: str) -> list[Path]:
    year, part = _voc_year_split(split)
    root = data_dir / "VOCdevkit" / f"VOC{year}"
    return [root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main" / f"{part}.txt"]


def _voc_classes(data_dir: Path, split: str, class_names: Sequence[str] | None) -> list[str]:
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES

    return list(class_names) if class_names else list(CLASS_NAMES)


def _voc_register(name: str, data_dir: Path, split: str, classes: list[str]) -> None:
    from detectron2.data.datasets.pascal_voc import register_pascal_voc

    year, part = _voc_year_split(split)
    register_pascal_voc(name, str(data_dir / "VOCdevkit" / f"VOC{year}"), part, int(year), classes)


def _voc_evaluator(name: str, cfg, output_dir: Path):
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    return PascalVOCDetectionEvaluator(name)  # AP, AP50, AP75; 11-point AP for VOC2007 as in its devkit


LAYOUTS.add("voc", DatasetLayout("voc", VOC_LAYOUT, _voc_paths, _voc_classes, _voc_register, _voc_evaluator))


def _coco_paths(data_dir: Path, split: str) -> list[Path]:
    return [data_dir / "annotations" / f"instances_{split}.json", data_dir / split]


def _coco_classes(data_dir: Path, split: str, class_names: Sequence[str] | None) -> list[str]:
    path = _coco_paths(data_dir, split)[0]
    try:
        categories = json.loads(path.read_text())["categories"]
        names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]  # detectron2's order: by id
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the categories of {str(path)!r} ({type(e).__name__}: {e}); a COCO "
                        f"annotation file has a 'categories' list of {{id, name}}. Expected layout:\n"
                        f"{COCO_LAYOUT}") from None
    if class_names and list(class_names) != names:
        raise DataError(f"task.class_names={list(class_names)} differ from the categories of {str(path)!r}: "
                        f"{names}. Leave task.class_names unset for COCO-format data.")
    return names


def _coco_register(name: str, data_dir: Path, split: str, classes: list[str]) -> None:
    from detectron2.data.datasets import register_coco_instances

    json_file, image_root = _coco_paths(data_dir, split)
    register_coco_instances(name, {}, str(json_file), str(image_root))


def _coco_evaluator(name: str, cfg, output_dir: Path):
    from detectron2.evaluation import COCOEvaluator

    return COCOEvaluator(name, output_dir=str(output_dir))  # box AP, plus mask AP when the model has masks


LAYOUTS.add("coco", DatasetLayout("coco", COCO_LAYOUT, _coco_paths, _coco_classes, _coco_register,
                                  _coco_evaluator))


def check_layout(layout: DatasetLayout, data_dir: Path, splits: Sequence[str]) -> None:
    """Raise a DataError naming every missing file of ``splits`` and showing the expected layout."""
    if not data_dir.is_dir():
        raise DataError(f"task.data_dir={str(data_dir)!r} is not a directory. Point it at a {layout.name} copy "
                        f"laid out as:\n{layout.tree}")
    missing = [str(p) for split in splits for p in layout.paths(data_dir, split) if not p.exists()]
    if missing:
        raise DataError(f"task.data_dir={str(data_dir)!r} is missing {', '.join(missing)}. Expected layout:\n"
                        f"{layout.tree}")


def split_classes(layout: DatasetLayout, data_dir: Path, splits: Sequence[str],
                  class_names: Sequence[str] | None) -> list[str]:
    """The class names of ``splits``; all splits must agree (one classifier is trained)."""
    per_split = {split: layout.classes(data_dir, split, class_names) for split in splits}
    first = per_split[splits[0]]
    for split, names in per_split.items():
        if names != first:
            raise DataError(f"splits {splits[0]!r} and {split!r} under {str(data_dir)!r} have different classes: "
                            f"{first} vs {names}.")
    return first


def register_split(layout: DatasetLayout, data_dir: Path, split: str, classes: list[str]) -> str:
    """Register ``split`` with detectron2's catalogs (once per process); returns its catalog name."""
    digest = hashlib.sha1(f"{data_dir.resolve()}|{'|'.join(classes)}".encode()).hexdigest()[:8]
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"transfer_{layout.name}_{split}_{digest}"
    if name not in DatasetCatalog.list():
        layout.register(name, data_dir, split, classes)
        MetadataCatalog.get(name).set(transfer_layout=layout.name)  # picks the evaluator
    return name
