"""Tiny local copies of classification data sets, one writer per local layout the suite reads, in the real on-disk
formats (PNG/JPEG via Pillow, arrow via ``datasets.save_to_disk``, parquet, MATLAB ``.mat`` via scipy).

Each writer ``write(root, big=False) -> data_dir`` writes a copy whose every file is one the reader reads; with
``big=True`` one training image is 1200 x 1200 pixels (1.44 M), for the ``task.max_image_pixels`` tests.
:data:`GENERIC` holds the generic layouts of ``transfer.image_sources`` and :data:`OFFICIAL` the official
release layouts by data set name (the writers of ``tests/official_copies.py``, with the release's files that the
reader does not read removed): a test fails for a registered layout that has no writer here. :data:`ARRAYS` are the
official layouts that hold pixel arrays of a fixed size (CIFAR's 32 x 32 batches), which have no big image.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from official_copies import WRITERS
from PIL import Image

CLASSES = ["apple", "bear", "cloud"]
BIG = 1200  # pixels a side of the big image: 1.44 M pixels
TINY = {"train": 2, "val": 2, "test": [3, 4, 5]}  # images per class in the tiny Flowers copy (3 classes)


def image(label: int, i: int, size: int = 12) -> Image.Image:
    rng = np.random.default_rng(100 * label + i)
    base = np.zeros((size, size, 3), dtype=np.uint8)
    base[..., label % 3] = 200
    return Image.fromarray(np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _hf_split(split: str, big: bool):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=CLASSES)})
    rows = {"img": [], "fine_label": []}
    for label in range(len(CLASSES)):
        for i in range(3):
            size = BIG if big and split == "train" and (label, i) == (0, 0) else 12
            rows["img"].append({"bytes": png_bytes(image(label, i, size)), "path": None})
            rows["fine_label"].append(label)
    return datasets.Dataset.from_dict(rows, features=features)


def write_saved_to_disk(root: Path, big: bool = False) -> Path:
    import datasets

    datasets.DatasetDict({s: _hf_split(s, big) for s in ("train", "test")}).save_to_disk(str(root))
    return root


def write_parquet(root: Path, big: bool = False) -> Path:
    (root / "data").mkdir(parents=True)
    for split in ("train", "test"):
        _hf_split(split, big).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_image_folder(root: Path, big: bool = False) -> Path:
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                size = BIG if big and split == "train" and (label, i) == (0, 0) else 12
                image(label, i, size).save(root / split / name / f"{i:03d}.png")
    return root


def write_flowers(root: Path, *, torchvision_layout: bool = False, big: bool = False) -> dict:
    """A tiny Flowers-102 in the official layout (``jpg/image_NNNNN.jpg``, ``imagelabels.mat``, ``setid.mat`` with
    the ``trnid`` / ``valid`` / ``tstid`` index arrays); returns the ids of each split and the 1-based labels."""
    import scipy.io

    base = root / "flowers-102" if torchvision_layout else root
    (base / "jpg").mkdir(parents=True)
    per_class = [TINY["train"] + TINY["val"] + n for n in TINY["test"]]
    labels = np.repeat(np.arange(1, len(per_class) + 1), per_class)  # 1-based, as in imagelabels.mat
    ids = np.random.default_rng(0).permutation(len(labels)) + 1  # image ids are 1-based and mixed over classes
    split_ids = {"trnid": [], "valid": [], "tstid": []}
    for c in range(1, len(per_class) + 1):
        mine = sorted(ids[labels[ids - 1] == c].tolist())
        split_ids["trnid"] += mine[:TINY["train"]]
        split_ids["valid"] += mine[TINY["train"]:TINY["train"] + TINY["val"]]
        split_ids["tstid"] += mine[TINY["train"] + TINY["val"]:]
    for i, label in enumerate(labels, start=1):
        size = BIG if big and i == split_ids["trnid"][0] else 12
        colour = (40 * int(label), 255 - i, 7 * i % 256)
        Image.new("RGB", (size, size), colour).save(base / "jpg" / f"image_{i:05d}.jpg")
    # The real files: imagelabels.mat holds `labels` (1 x 8189), setid.mat the 1 x N index arrays.
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels[None].astype(np.uint8)})
    scipy.io.savemat(base / "setid.mat", {k: np.asarray(v, dtype=np.uint16)[None] for k, v in split_ids.items()})
    return {"ids": split_ids, "labels": labels}


def _official(name: str):
    """The official-layout writer of ``name`` as ``write(root, big=False) -> data_dir``; only the files its reader
    reads stay (the split files and images of other partitions only, ``list.txt``, ``trainval`` lists … are
    removed), so that every
    file of the copy must be part of the identity."""

    def write(root: Path, big: bool = False) -> Path:
        if name in ARRAYS:
            if big:
                raise ValueError(f"{name}: a pixel-array layout has no big image")
            written = WRITERS[name](root)
        else:
            written = WRITERS[name](root, big=big)
        listed = {n for pairs in written.expected.values() for n, _ in pairs}  # the images the splits list
        images = written.files if name == "caltech101" else [f for f in written.files if f.name in listed]
        read = {*images, *written.lists}  # Caltech-101 has no split file: every image of its folders is read
        for f in [p for p in root.rglob("*") if p.is_file() and p not in read]:
            f.unlink()
        return written.data_dir

    write.__name__ = f"write_{name}"
    return write


# Generic layouts (transfer.image_sources.accepted_layouts, in its order): (a data set read that way, writer).
GENERIC = {
    "datasets.save_to_disk": ("cifar100", write_saved_to_disk),
    "parquet": ("cifar100", write_parquet),
    "image_folder": ("dtd", write_image_folder),
}
# Official layouts whose images are pixel arrays of a fixed size in the batch files, not image files.
ARRAYS = {"cifar10", "cifar100"}
# Official release layouts (tasks.classification.datasets.SPECS[name].official): data set name -> writer.
OFFICIAL = {name: _official(name) for name in sorted(WRITERS)}
