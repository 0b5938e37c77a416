"""Detection data sets on disk: their layouts, and their registration with detectron2's catalogs.

Two layouts: Pascal VOC (``VOCdevkit/VOC<year>/...``) and COCO json. Layout checks run without
detectron2; loading and registering import it inside the functions, so this module imports where
detectron2 is not installed. Catalog names carry a digest of the data directory, the classes and the
images left out, so runs on different copies in one process never collide and registering the same
copy twice is a no-op.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

from transfer.data_settings import local_data_dir
from transfer.errors import DataError
from transfer.registry import Registry

if TYPE_CHECKING:
    from tasks.detection.schema import DetectionTaskConfig

log = logging.getLogger(__name__)

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
    """How to find, read and evaluate the splits of one data set family."""

    name: str
    tree: str  # the expected layout, shown in every error
    paths: Callable[[Path, str], list[Path]]  # files/folders a split needs
    classes: Callable[[Path, str, Sequence[str] | None], list[str]]
    load: Callable[[Path, str, list[str], str], list[dict]]  # (data_dir, split, classes, catalog name) -> dicts
    metadata: Callable[[Path, str, list[str]], dict]  # what detectron2's evaluator reads from MetadataCatalog
    primary_metric: str  # the headline number of the data set's papers
    # (data_dir, splits, classes) -> None: every listed file present and its annotation usable, else DataError.
    # Called by the adapter's check, before a run folder exists; None: the layout has no such check.
    check_files: Callable[[Path, Sequence[str], Sequence[str]], None] | None = None


LAYOUTS: Registry[DatasetLayout] = Registry("detection data set layout")


def _voc_year_split(split: str) -> tuple[str, str]:
    year, _, part = split.partition("_")
    if year not in VOC_YEARS or part not in VOC_SPLITS:
        raise DataError(f"Pascal VOC split {split!r} is not <year>_<split> with year in {VOC_YEARS} and split in "
                        f"{VOC_SPLITS}, e.g. 2007_trainval, 2012_trainval, 2007_test.")
    return year, part


def _voc_root(data_dir: Path, split: str) -> Path:
    return data_dir / "VOCdevkit" / f"VOC{_voc_year_split(split)[0]}"


def _voc_paths(data_dir: Path, split: str) -> list[Path]:
    root, part = _voc_root(data_dir, split), _voc_year_split(split)[1]
    return [root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main" / f"{part}.txt"]


# The 20 Pascal VOC classes in the devkit's order (VOCdevkit VOCcode/VOCinit.m; detectron2's pascal_voc.CLASS_NAMES).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _voc_classes(data_dir: Path, split: str, class_names: Sequence[str] | None) -> list[str]:
    return list(class_names) if class_names else list(VOC_CLASSES)


def _listed(paths: list[Path], limit: int = 10) -> str:
    return ", ".join(map(str, paths[:limit])) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _voc_check(data_dir: Path, splits: Sequence[str], classes: Sequence[str]) -> None:
    """Every image id listed in a split has its Annotations/<id>.xml and JPEGImages/<id>.jpg, and every object
    of those XML files is of a class in ``classes``. Raises DataError naming the files and the fix."""
    missing, unreadable, unknown, used = [], [], {}, {}
    known = set(classes)
    for split in splits:
        root, part = _voc_root(data_dir, split), _voc_year_split(split)[1]
        ids = (root / "ImageSets" / "Main" / f"{part}.txt").read_text().split()
        for image_id in ids:
            xml, jpg = root / "Annotations" / f"{image_id}.xml", root / "JPEGImages" / f"{image_id}.jpg"
            missing += [p for p in (xml, jpg) if not p.is_file()]
            if not xml.is_file():
                continue
            try:
                names = [(o.findtext("name") or "") for o in ElementTree.parse(xml).getroot().iter("object")]
            except (OSError, ElementTree.ParseError) as e:
                unreadable.append(f"{xml} ({type(e).__name__}: {e})")
                continue
            for name in names:
                used[name] = None
                if name not in known:
                    unknown.setdefault(name, []).append(xml)
    if missing:
        raise DataError(f"task.data_dir={str(data_dir)!r}: {len(missing)} file(s) listed in the splits' ImageSets "
                        f"are missing: {_listed(missing)}. Restore them, or remove their ids from the ImageSets "
                        f"file. Expected layout:\n{VOC_LAYOUT}")
    if unreadable:
        raise DataError(f"{len(unreadable)} annotation file(s) are not readable XML: {'; '.join(unreadable[:5])}. "
                        "Re-download them.")
    if unknown:
        suggested = [c for c in classes if c in used] + list(unknown)
        found = "; ".join(f"{name!r} in {len(files)} file(s), e.g. {files[0]}" for name, files in unknown.items())
        raise DataError(f"the annotations name classes that are not in task.class_names={list(classes)}: {found}. "
                        f"Set task.class_names to every class of this copy (its annotations name task.class_names="
                        f"[{','.join(suggested)}]), or remove those objects from the XML files.")


def _voc_load(data_dir: Path, split: str, classes: list[str], name: str) -> list[dict]:
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    return load_voc_instances(str(_voc_root(data_dir, split)), _voc_year_split(split)[1], classes)


def _voc_metadata(data_dir: Path, split: str, classes: list[str]) -> dict:
    # The keys detectron2's register_pascal_voc sets; PascalVOCDetectionEvaluator reads them.
    year, part = _voc_year_split(split)
    return {"thing_classes": list(classes), "dirname": str(_voc_root(data_dir, split)), "year": int(year),
            "split": part}


# VOC papers report AP50 (the VOC devkit's metric); MoCo and BYOL's VOC tables lead with it.
LAYOUTS.add("voc", DatasetLayout("voc", VOC_LAYOUT, _voc_paths, _voc_classes, _voc_load, _voc_metadata, "test/ap50",
                                  _voc_check))


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


def _coco_load(data_dir: Path, split: str, classes: list[str], name: str) -> list[dict]:
    from detectron2.data.datasets import load_coco_json

    json_file, image_root = _coco_paths(data_dir, split)
    return load_coco_json(str(json_file), str(image_root), name)  # also sets the class metadata of `name`


def _coco_metadata(data_dir: Path, split: str, classes: list[str]) -> dict:
    # The keys detectron2's register_coco_instances sets; COCOEvaluator reads them.
    json_file, image_root = _coco_paths(data_dir, split)
    return {"json_file": str(json_file), "image_root": str(image_root), "evaluator_type": "coco"}


LAYOUTS.add("coco", DatasetLayout("coco", COCO_LAYOUT, _coco_paths, _coco_classes, _coco_load, _coco_metadata,
                                  "test/ap"))  # COCO AP, IoU 0.50:0.95


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


def check_data(task: DetectionTaskConfig) -> None:
    """The data checks that need no detectron2, made by the adapter's check before any run folder exists.

    Every split's files and folders are present (:func:`check_layout`), all splits have the same classes, and the
    layout's own check passes (VOC: each listed image has its XML and JPEG, each XML object a known class).
    Raises DataError naming the files and the fix.
    """
    layout, root = LAYOUTS.get(task.dataset), data_root(task)
    splits = [*task.train_splits, task.test_split]
    check_layout(layout, root, splits)
    if layout.check_files is not None:  # COCO's classes come from its (large) json files, read at registration
        layout.check_files(root, splits, split_classes(layout, root, splits, task.class_names))


def register_split(layout: DatasetLayout, data_dir: Path, split: str, classes: list[str],
                   exclude: Collection[str] = ()) -> str:
    """Register ``split`` with detectron2's catalogs (once per process), without the images in ``exclude``.

    Returns its catalog name. ``exclude`` holds ``file_name`` values (undecodable images found by the scan).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    left_out = sorted(exclude)
    key = "|".join([str(data_dir.resolve()), *classes, "#", *left_out])
    name = f"transfer_{layout.name}_{split}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, functools.partial(_load_kept, layout, data_dir, split, list(classes), name,
                                                        frozenset(left_out)))
        MetadataCatalog.get(name).set(transfer_layout=layout.name, **layout.metadata(data_dir, split, classes))
    return name


def _load_kept(layout: DatasetLayout, data_dir: Path, split: str, classes: list[str], name: str,
               exclude: frozenset[str]) -> list[dict]:
    return [d for d in layout.load(data_dir, split, classes, name) if d["file_name"] not in exclude]


@dataclass(frozen=True)
class DataSplits:
    """detectron2 catalog names of the registered splits and their classes."""

    train: tuple[str, ...]
    test: str
    classes: tuple[str, ...]


@dataclass
class PreparedData:
    """The registered splits of a run, without the images that do not decode, and the account of those."""

    splits: DataSplits
    exclude: frozenset[str]  # file names left out of every split
    skipped: list[dict] = field(default_factory=list)  # {"split", "file", "error"} of each image left out
    totals: dict[str, int] = field(default_factory=dict)  # images per split before leaving any out


def data_root(task: DetectionTaskConfig) -> Path:
    layout = LAYOUTS.get(task.dataset)
    return local_data_dir(task.data_dir, task=task.name, copy=layout.name, tree=layout.tree)


def register_data(task: DetectionTaskConfig, exclude: Collection[str] = ()) -> DataSplits:
    """Check the layout and register every split in this process, leaving out the files in ``exclude``."""
    layout, root = LAYOUTS.get(task.dataset), data_root(task)
    splits = [*task.train_splits, task.test_split]
    check_layout(layout, root, splits)
    classes = split_classes(layout, root, splits, task.class_names)
    names = [register_split(layout, root, split, classes, exclude) for split in splits]
    return DataSplits(tuple(names[:-1]), names[-1], tuple(classes))


def check_sizes(dicts: dict[str, list[dict]], sizes: dict[str, tuple[int, int]]) -> None:
    """Raise a DataError naming the images whose decoded size differs from their annotation's width and height.

    Boxes are in the annotation's pixels: on a resized copy of an image they land in the wrong place, and
    detectron2 stops mid-run (SizeMismatchError). ``dicts``: split -> detectron2 dataset dicts; ``sizes``:
    file -> (width, height) of the files that decoded.
    """
    wrong = [(split, d["file_name"], sizes[d["file_name"]], (d["width"], d["height"]))
             for split, found in dicts.items() for d in found
             if d["file_name"] in sizes and "width" in d and sizes[d["file_name"]] != (d["width"], d["height"])]
    if wrong:
        examples = "; ".join(f"{f} (split {split}: image {w}x{h}, annotation {aw}x{ah})"
                             for split, f, (w, h), (aw, ah) in wrong[:5])
        raise DataError(f"{len(wrong)} image(s) differ in size from their annotation, so their boxes would be "
                        f"misplaced: {examples}. Use the original full-size images (a resized copy needs its "
                        "annotations' sizes and boxes rescaled too), or correct the annotation's width/height.")


def prepare_data(task: DetectionTaskConfig, *, cache_dir: Path | None, workers: int) -> PreparedData:
    """Register the splits after decoding every image once; undecodable images are left out and counted.

    Raises DataError when a split is empty, when more than ``task.max_bad_fraction`` of a split does not
    decode, or when an image's size differs from its annotation's (:func:`check_sizes`).
    """
    from detectron2.data import DatasetCatalog

    from tasks.detection.images import scan_images

    full = register_data(task)
    files = {split: [d["file_name"] for d in DatasetCatalog.get(name)]
             for split, name in zip([*task.train_splits, task.test_split], [*full.train, full.test])}
    for split, found in files.items():
        if not found:
            raise DataError(f"split {split!r} of task.data_dir={task.data_dir!r} has no images. Expected layout:\n"
                            f"{LAYOUTS.get(task.dataset).tree}")
    # A listed file that is not there is a layout error (a partial copy), not a damaged image to leave out.
    missing = [Path(f) for f in dict.fromkeys(f for found in files.values() for f in found) if not os.path.isfile(f)]
    if missing:
        raise DataError(f"task.data_dir={task.data_dir!r}: {len(missing)} image file(s) named by the annotations are "
                        f"missing: {_listed(missing)}. Restore them, or remove them from the annotations. Expected "
                        f"layout:\n{LAYOUTS.get(task.dataset).tree}")
    root = data_root(task).resolve()
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "detection_image_scan" / f"{hashlib.sha1(str(root).encode()).hexdigest()[:12]}.json"
    sizes: dict[str, tuple[int, int]] = {}
    bad = scan_images([f for found in files.values() for f in found], cache=cache, workers=workers,
                      desc=f"decoding the images of {root}", sizes=sizes)
    check_sizes({split: DatasetCatalog.get(name) for split, name in zip(files, [*full.train, full.test])}, sizes)
    skipped = []
    for split, found in files.items():
        left_out = [f for f in found if f in bad]
        skipped += [{"split": split, "file": f, "error": bad[f]} for f in left_out]
        if not left_out:
            continue
        examples = "; ".join(f"{f} ({bad[f]})" for f in left_out[:3])
        log.warning("split %s: leaving out %d of %d images that do not decode, e.g. %s", split, len(left_out),
                    len(found), examples)
        if len(left_out) > task.max_bad_fraction * len(found):
            raise DataError(f"split {split!r}: {len(left_out)} of {len(found)} images do not decode, more than "
                            f"task.max_bad_fraction={task.max_bad_fraction}; e.g. {examples}. Re-download the "
                            "damaged files, or raise task.max_bad_fraction to leave them out.")
    if not bad:
        return PreparedData(full, frozenset(), [], {s: len(f) for s, f in files.items()})
    exclude = frozenset(bad)
    return PreparedData(register_data(task, exclude), exclude, skipped, {s: len(f) for s, f in files.items()})
