"""Tiny copies of the transfer sets in their official release layouts, written in the real file formats.

Each writer puts a few small JPEGs (or, for CIFAR, pixel arrays) where the release puts its images and writes the
release's own split files: Python-2-style pickles for CIFAR, MATLAB ``.mat`` files through scipy for Flowers-102
and Stanford Cars, text lists for Pets, DTD, FGVC-Aircraft and SUN397, JSON for Food-101. Each returns a
:class:`Written`: the folder to pass as ``task.data_dir``, what each split must hold (an image name and its class
name, per item), and the tiny copy's split sizes in the shape of the published ones (the published sizes are data
on the data set's spec, so the loading tests swap these in: ``SplitSizes`` with the same fields set).

Every writer of image files takes ``big``: with ``big=True`` one training image (for Caltech-101, whose training
images are drawn, one image) is :data:`BIG` x :data:`BIG` pixels (1.44 M), for the ``task.max_image_pixels`` tests
(``tests/local_copies.py``). CIFAR's batches hold 32 x 32 pixel arrays by format: they have no ``big``.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from tasks.classification.splits import SplitSizes

BIG = 1200  # pixels a side of the big image: 1.44 M pixels


@dataclass
class Written:
    data_dir: Path
    expected: dict[str, list[tuple[str, str]]]  # split -> sorted (image name, class name) of every item
    sizes: SplitSizes  # the tiny copy's sizes, with the fields the published sizes have
    files: list[Path] = field(default_factory=list)  # the image files written
    lists: list[Path] = field(default_factory=list)  # the split, label or batch files the reader must key on


def jpeg(path: Path, label: int, i: int, size: int = 10) -> Path:
    """A small JPEG whose colour depends on the class, so even random features separate the classes a little."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][label % 4]
    rng = np.random.default_rng(1000 * label + i)
    pixels = np.clip(np.asarray(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def _sorted(items) -> list[tuple[str, str]]:
    return sorted((Path(name).name, cls) for name, cls in items)


# --- CIFAR ----------------------------------------------------------------------------------------------------------

def cifar_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # (N, 3072), R then G, B


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the Python 2 cPickle files of the release


def write_cifar10(root: Path, *, per_batch: int = 4, n_test: int = 6) -> Written:
    """cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta, as unpacked from cifar-10-python.tar.gz."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    expected: dict[str, list] = {"train": [], "test": []}
    for b, (name, n) in enumerate([(f"data_batch_{k}", per_batch) for k in range(1, 6)] + [("test_batch", n_test)]):
        labels = [(b * 3 + i) % 10 for i in range(n)]
        _pickle(base / name, {"batch_label": f"batch {b}", "labels": labels, "data": cifar_pixels(n, b),
                              "filenames": [f"img_{b}_{i}.png" for i in range(n)]})
        expected["test" if name == "test_batch" else "train"] += [(f"{name}[{i}]", names[lab])
                                                                  for i, lab in enumerate(labels)]
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=5 * per_batch, test=n_test),
                   lists=sorted(base.iterdir()))


def write_cifar100(root: Path, *, n_train: int = 18, n_test: int = 7) -> Written:
    """cifar-100-python/: train, test, meta (fine and coarse label names)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    fine = [f"class_{i:03d}" for i in range(100)]
    _pickle(base / "meta", {"fine_label_names": fine, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    expected = {}
    for seed, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        labels = [(7 * i + seed) % 100 for i in range(n)]
        _pickle(base / split, {"batch_label": split, "fine_labels": labels, "coarse_labels": [x // 5 for x in labels],
                               "data": cifar_pixels(n, 10 + seed), "filenames": [f"f{i}.png" for i in range(n)]})
        expected[split] = sorted((f"{split}[{i}]", fine[lab]) for i, lab in enumerate(labels))
    return Written(base, expected, SplitSizes(train=n_train, test=n_test), lists=sorted(base.iterdir()))


# --- Flowers-102 ----------------------------------------------------------------------------------------------------

def write_flowers102(root: Path, *, big: bool = False) -> Written:
    """jpg/image_NNNNN.jpg, imagelabels.mat (1-based labels), setid.mat (trnid / valid / tstid)."""
    per_class = [(2, 2, 3), (2, 2, 4), (2, 2, 2)]  # train, val, test images of each of 3 classes
    labels = np.repeat(np.arange(1, 4), [sum(c) for c in per_class])  # 1-based, as in imagelabels.mat
    ids = np.random.default_rng(0).permutation(len(labels)) + 1  # ids mixed over the classes
    split_ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    for c, (tr, va, _) in enumerate(per_class, start=1):
        mine = sorted(ids[labels[ids - 1] == c].tolist())
        split_ids["trnid"] += mine[:tr]
        split_ids["valid"] += mine[tr:tr + va]
        split_ids["tstid"] += mine[tr + va:]
    files = [jpeg(root / "jpg" / f"image_{i:05d}.jpg", int(lab), i, BIG if big and i == split_ids["trnid"][0] else 10)
             for i, lab in enumerate(labels, start=1)]
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels[None].astype(np.uint8)})
    scipy.io.savemat(root / "setid.mat", {k: np.asarray(v, dtype=np.uint16)[None] for k, v in split_ids.items()})
    from torchvision.datasets import Flowers102

    expected = {ours: _sorted((f"image_{i:05d}.jpg", Flowers102.classes[labels[i - 1] - 1]) for i in split_ids[key])
                for ours, key in (("train", "trnid"), ("validation", "valid"), ("test", "tstid"))}
    return Written(root, expected, SplitSizes(train=6, val=6, test=9), files,
                   [root / "setid.mat", root / "imagelabels.mat"])


# --- Oxford-IIIT Pets -----------------------------------------------------------------------------------------------

PETS = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("american_pit_bull_terrier", 3, 2)]  # name, id, species


def write_pets(root: Path, *, big: bool = False) -> Written:
    """images/<Breed>_<n>.jpg; annotations/trainval.txt and test.txt ("Image CLASS-ID SPECIES BREED-ID")."""
    expected: dict[str, list] = {"train": [], "test": []}
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    files = []
    for label, (breed, class_id, species) in enumerate(PETS):
        for i in range(1, 8):
            split = "trainval" if i <= 4 else "test"
            image_id = f"{breed}_{100 + i}"
            size = BIG if big and (label, i) == (0, 1) else 10
            files.append(jpeg(root / "images" / f"{image_id}.jpg", label, i, size))
            lines[split].append(f"{image_id} {class_id} {species} {label + 1}")
            title = " ".join(part.title() for part in breed.split("_"))  # torchvision's class name
            expected["train" if split == "trainval" else "test"].append((f"{image_id}.jpg", title))
    (root / "annotations").mkdir(parents=True)
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n")
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=12, test=9), files,
                   [root / "annotations" / f"{split}.txt" for split in lines])


# --- DTD ------------------------------------------------------------------------------------------------------------

TEXTURES = ["banded", "blotchy", "zigzagged"]


def write_dtd(root: Path, *, torchvision_layout: bool = False, big: bool = False) -> Written:
    """dtd/images/<texture>/<texture>_NNNN.jpg and dtd/labels/{train,val,test}{1,2}.txt (split 2 differs)."""
    base = root / "dtd" / "dtd" if torchvision_layout else root / "dtd"
    expected: dict[str, list] = {"train": [], "validation": [], "test": []}
    lists: dict[str, list[str]] = {}
    files = []
    for label, texture in enumerate(TEXTURES):
        names = [f"{texture}_{i:04d}.jpg" for i in range(1, 8)]
        files += [jpeg(base / "images" / texture / n, label, i, BIG if big and (label, i) == (0, 0) else 10)
                  for i, n in enumerate(names)]  # image 0 of each texture is in train1
        for partition, order in ((1, names), (2, names[::-1])):
            for k, (split, ours) in enumerate((("train", "train"), ("val", "validation"), ("test", "test"))):
                chosen = order[2 * k:2 * k + 2]
                lists.setdefault(f"{split}{partition}", []).extend(f"{texture}/{n}" for n in chosen)
                if partition == 1:
                    expected[ours] += [(n, texture) for n in chosen]
    (base / "labels").mkdir(parents=True)
    for name, rows in lists.items():
        (base / "labels" / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=6, val=6, test=6), files,
                   [base / "labels" / f"{s}1.txt" for s in ("train", "val", "test")])


# --- FGVC-Aircraft --------------------------------------------------------------------------------------------------

VARIANTS = ["707-320", "Cessna 172", "F-16A/B"]  # real variant names: one with a space, one with a slash


def write_aircraft(root: Path, *, big: bool = False) -> Written:
    """fgvc-aircraft-2013b/data/images/NNNNNNN.jpg, variants.txt, images_variant_{train,val,test}.txt."""
    data = root / "fgvc-aircraft-2013b" / "data"
    expected: dict[str, list] = {"train": [], "validation": [], "test": []}
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    files, number = [], 1000000
    for label, variant in enumerate(VARIANTS):
        for split, ours in (("train", "train"), ("val", "validation"), ("test", "test")):
            for _ in range(2):
                number += 7
                first = big and not files  # the first image written is a training image
                files.append(jpeg(data / "images" / f"{number}.jpg", label, number, BIG if first else 10))
                lists[split].append(f"{number} {variant}")
                expected[ours].append((f"{number}.jpg", variant))
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    for split, rows in lists.items():
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    (data / "images_variant_trainval.txt").write_text("\n".join(lists["train"] + lists["val"]) + "\n")
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=6, val=6, test=6), files,
                   [data / "variants.txt", *(data / f"images_variant_{s}.txt" for s in ("train", "val", "test"))])


# --- Stanford Cars --------------------------------------------------------------------------------------------------

CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT Hatchback 2011"]


def _annotations(rows: list[tuple[int, str]]) -> np.ndarray:
    """The ``annotations`` struct array of the devkit: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname."""
    dtype = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    out = np.zeros((1, len(rows)), dtype=dtype)
    for i, (label, fname) in enumerate(rows):
        out[0, i] = (np.uint8(1), np.uint8(1), np.uint8(9), np.uint8(9), np.uint8(label + 1), fname)
    return out


def write_cars(root: Path, *, test_annos_in_devkit: bool = False, big: bool = False) -> Written:
    """devkit/cars_meta.mat + cars_train_annos.mat, cars_train/, cars_test/, cars_test_annos_withlabels.mat."""
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CARS)), dtype=object)
    names[0, :] = CARS
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    expected: dict[str, list] = {}
    files, lists = [], [root / "devkit" / "cars_meta.mat"]
    for split, per_class in (("train", 4), ("test", 3)):
        rows = [(label, f"{label * 10 + i + 1:05d}.jpg") for label in range(len(CARS)) for i in range(per_class)]
        files += [jpeg(root / f"cars_{split}" / f, label, i, BIG if big and (split, i) == ("train", 0) else 10)
                  for i, (label, f) in enumerate(rows)]
        where = root / "devkit" / "cars_train_annos.mat" if split == "train" else \
            root / ("devkit" if test_annos_in_devkit else "") / "cars_test_annos_withlabels.mat"
        scipy.io.savemat(where, {"annotations": _annotations(rows)})
        lists.append(where)
        expected[split] = _sorted((f, CARS[label]) for label, f in rows)
    return Written(root, expected, SplitSizes(train=12, test=9), files, lists)


# --- Food-101 -------------------------------------------------------------------------------------------------------

DISHES = ["apple_pie", "baby_back_ribs", "waffles"]


def write_food101(root: Path, *, big: bool = False) -> Written:
    """food-101/images/<dish>/<id>.jpg, food-101/meta/{train,test}.json (+ the .txt lists and classes.txt)."""
    base = root / "food-101"
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    expected: dict[str, list] = {"train": [], "test": []}
    files = []
    for label, dish in enumerate(DISHES):
        for i in range(6):
            split = "train" if i < 4 else "test"
            image_id = f"{dish}/{100 + i * 13}"
            size = BIG if big and (label, i) == (0, 0) else 10
            files.append(jpeg(base / "images" / f"{image_id}.jpg", label, i, size))
            meta[split].setdefault(dish, []).append(image_id)
            expected[split].append((f"{100 + i * 13}.jpg", dish))
    (base / "meta").mkdir(parents=True)
    for split, content in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(content))
        (base / "meta" / f"{split}.txt").write_text("\n".join(x for v in content.values() for x in v) + "\n")
    (base / "meta" / "classes.txt").write_text("\n".join(DISHES) + "\n")
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=12, test=6), files,
                   [base / "meta" / f"{split}.json" for split in meta])


# --- Caltech-101 ----------------------------------------------------------------------------------------------------

CALTECH = {"BACKGROUND_Google": 31, "Faces_easy": 33, "accordion": 32}  # images per folder; 30 train each


def write_caltech101(root: Path, *, big: bool = False) -> Written:
    """101_ObjectCategories/<class>/image_NNNN.jpg (BACKGROUND_Google is one of the folders)."""
    base = root / "101_ObjectCategories"
    files = [jpeg(base / name / f"image_{i:04d}.jpg", label, i, size=BIG if big and (label, i) == (0, 1) else 8)
             for label, (name, n) in enumerate(CALTECH.items()) for i in range(1, n + 1)]
    n_test = sum(CALTECH.values()) - 30 * len(CALTECH)
    return Written(root, {}, SplitSizes(train=30 * len(CALTECH), test=n_test, train_per_class=30), files)


# --- SUN397 ---------------------------------------------------------------------------------------------------------

SCENES = ["/a/abbey", "/b/bakery/shop", "/c/campus"]  # a class two folders deep, as in the release


def write_sun397(root: Path, *, big: bool = False) -> Written:
    """SUN397/<l>/<class>/sun_*.jpg + ClassName.txt; Partitions/ClassName.txt, Training_0k.txt, Testing_0k.txt.

    Each class has 6 images: split 1 trains on 2 and tests on 2; split 2 uses the others, so reading the wrong
    partition (or every image) is seen.
    """
    images = root / "SUN397"
    expected: dict[str, list] = {"train": [], "test": []}
    files = []
    # Split 1: images 0-1 train, 2-3 test; split 2: images 4-5 train, 0-1 test.
    lists = {"Training_01": [], "Testing_01": [], "Training_02": [], "Testing_02": []}
    for label, scene in enumerate(SCENES):
        names = [f"{scene}/sun_{label}{chr(97 + i) * 6}.jpg" for i in range(6)]
        files += [jpeg(images / n.lstrip("/"), label, i, BIG if big and (label, i) == (0, 0) else 10)
                  for i, n in enumerate(names)]  # image 0 of each class is in Training_01
        for split, picked in (("Training_01", names[0:2]), ("Testing_01", names[2:4]), ("Training_02", names[4:6]),
                              ("Testing_02", names[0:2])):
            lists[split] += picked
        expected["train"] += [(Path(n).name, scene) for n in names[0:2]]
        expected["test"] += [(Path(n).name, scene) for n in names[2:4]]
    (root / "Partitions").mkdir(parents=True)
    for where in (images, root / "Partitions"):
        (where / "ClassName.txt").write_text("\n".join(SCENES) + "\n")
    for split, rows in lists.items():
        (root / "Partitions" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return Written(root, {k: sorted(v) for k, v in expected.items()}, SplitSizes(train=6, test=6), files,
                   [root / "Partitions" / f for f in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")])


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "flowers102": write_flowers102,
           "oxford_pets": write_pets, "dtd": write_dtd, "fgvc_aircraft": write_aircraft,
           "stanford_cars": write_cars, "food101": write_food101, "caltech101": write_caltech101,
           "sun397": write_sun397}
