"""Classification data sets: a registry of builders that return fixed train/val/test splits."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from tasks.classification.config import ClassificationTaskConfig
from transfer.registry import Registry


@dataclass
class Splits:
    """Fixed splits of one data set; each item of a split is ``(PIL.Image, int label)``."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    val_held_out: bool = False  # val was carved out of train; the final fit uses train+val
    counts: dict[str, int] = field(default_factory=dict)  # e.g. unreadable images skipped


DATASETS: Registry[Callable[[ClassificationTaskConfig], Splits]] = Registry("dataset")


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])


class Transformed(Dataset):
    """Apply an image transform to a split: items become ``(Tensor (3, H, W), label)``."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


def hold_out(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``train`` into (train, val) with a seeded permutation, the same on every run."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(fraction * len(train))))
    return Subset(train, sorted(order[n_val:].tolist())), Subset(train, sorted(order[:n_val].tolist()))


def limit(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else Subset(ds, list(range(n)))


@DATASETS.register("digits")
def build_digits(cfg: ClassificationTaskConfig) -> Splits:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): the offline demo.

    Fixed split from a seeded permutation: 360 test, 360 val, 1,077 train.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values 0..16 -> 0..255
    full = ArrayImages(images, digits.target)
    order = np.random.default_rng(0).permutation(len(full))
    test, val, train = order[:360], order[360:720], order[720:]
    pick = lambda idx: limit(Subset(full, sorted(idx.tolist())), cfg.limit_per_split)  # noqa: E731
    return Splits(train=pick(train), val=pick(val), test=pick(test), num_classes=10,
                  class_names=[str(i) for i in range(10)])
