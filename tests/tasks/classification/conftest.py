"""Tiny classification data sets written in the real on-disk formats, each with one corrupt image."""
from __future__ import annotations

import pytest
from local_copies import CLASSES, image, png_bytes  # the same images as the layout tests

PER_CLASS = {"train": 6, "test": 3}  # readable images per class and split
CORRUPT = b"\x89PNG\r\n\x1a\n this is not an image"


def cifar100_like(split: str, corrupt: bool):
    """A split with the column names and types of uoft-cs/cifar100: img, fine_label, coarse_label."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=CLASSES),
                                  "coarse_label": datasets.ClassLabel(names=["nature", "thing"])})
    rows = {"img": [], "fine_label": [], "coarse_label": []}
    for label in range(len(CLASSES)):
        for i in range(PER_CLASS[split]):
            rows["img"].append({"bytes": png_bytes(image(label, i)), "path": None})
            rows["fine_label"].append(label)
            rows["coarse_label"].append(label % 2)
    if corrupt:
        rows["img"].append({"bytes": CORRUPT, "path": None})
        rows["fine_label"].append(0)
        rows["coarse_label"].append(0)
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def saved_to_disk(tmp_path):
    """A datasets.save_to_disk folder (DatasetDict train/test) with one corrupt image in train."""
    import datasets

    root = tmp_path / "cifar100_disk"
    datasets.DatasetDict({"train": cifar100_like("train", True), "test": cifar100_like("test", False)}) \
        .save_to_disk(str(root))
    return root


@pytest.fixture
def parquet_files(tmp_path):
    """The Hub layout: data/train-00000-of-00001.parquet and data/test-00000-of-00001.parquet."""
    root = tmp_path / "cifar100_parquet"
    (root / "data").mkdir(parents=True)
    cifar100_like("train", True).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    cifar100_like("test", False).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder tree train/<class>/*.png, test/<class>/*.png, with one corrupt file in train."""
    root = tmp_path / "folder"
    for split, n in PER_CLASS.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image(label, i).save(folder / f"{i:03d}.png")
    (root / "train" / CLASSES[1] / "broken.jpg").write_bytes(CORRUPT)
    return root


@pytest.fixture
def facts():
    """What every tiny layout holds: class names and readable images per class and split."""
    return CLASSES, PER_CLASS
