"""ImageNet-1k validation images from a local copy: an ImageFolder tree or a Hugging Face copy (read by the shared
:mod:`transfer.image_sources`, as the classification data sets are).

Class index = position of the WordNet id in the sorted list of the 1000 ILSVRC-2012 wnids, as in
torchvision's ``ImageFolder`` over the full tree and in timm's ImageNet info; the Hugging Face
``ILSVRC/imagenet-1k`` labels follow the same order.

Images are decoded by :func:`transfer.images.decode_image` (every Pillow mode to RGB, EXIF orientation);
one that fails to decode becomes an :class:`transfer.images.Undecodable` item, which
:func:`transfer.images.collate_images` drops and the evaluation counts.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from tasks.imagenet.config import EXPECTED_TREE
from transfer.errors import DataError
from transfer.image_sources import HubRows, load_parquet_splits, parquet_splits, read_saved_dataset
from transfer.images import TooLarge, Undecodable, load_image

# The 1000 ILSVRC-2012 wnids in class-index order (timm ships the list: timm/data/_info/imagenet_synsets.txt).
WNIDS: tuple[str, ...] = tuple(ImageNetInfo("imagenet-1k").label_names())
WNID_RE = re.compile(r"^n\d{8}$")
HF_SPLITS = {"val": "validation", "train": "train"}  # our split name -> the Hugging Face copy's


class ImageNetFolder(ImageFolder):
    """``split/<wnid>/*.JPEG`` with the ImageNet-1k class index of each wnid, even when folders are missing.

    Items are ``(image, label)``; the image is an :class:`Undecodable` when the file does not decode.
    """

    max_pixels: int | None = None

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        present = sorted(p.name for p in Path(directory).iterdir() if p.is_dir())
        index = {w: i for i, w in enumerate(WNIDS)}
        return present, {w: index[w] for w in present}

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image | Undecodable | TooLarge, int]:
        path, label = self.samples[i]
        return load_image(path, max_pixels=self.max_pixels, transform=self.transform), label


def find_split_dir(data_dir: Path, split: str) -> Path | None:
    """``data_dir/split`` when it holds wnid folders, or ``data_dir`` itself when it does; else None."""
    for candidate in (data_dir / split, data_dir):
        if candidate.is_dir() and any(WNID_RE.match(p.name) for p in candidate.iterdir() if p.is_dir()):
            return candidate
    return None


def build_imagenet(data_dir: str | Path, *, split: str = "val", transform: Callable | None = None,
                   allow_partial: bool = False, max_pixels: int | None = None) -> tuple[Dataset, dict[str, int]]:
    """The ImageNet-1k ``split`` under ``data_dir``, and counts (images, classes present).

    ``max_pixels``: the image size limit of :func:`transfer.images.decode_image` (default Pillow's).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"task.data_dir={str(data_dir)!r} is not a directory. Expected:\n{EXPECTED_TREE}")
    split_dir = find_split_dir(root, split)
    if split_dir is not None:
        ds, counts = _folder(split_dir, transform, allow_partial)
    elif _is_hf_copy(root):
        ds, counts = _hf(root, split, transform)
    else:
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"task.data_dir={str(root)!r} holds neither a {split}/<wnid>/ tree nor a Hugging Face copy "
                        f"(found: {found or 'nothing'}). Expected:\n{EXPECTED_TREE}")
    ds.max_pixels = max_pixels
    return ds, counts


def _folder(split_dir: Path, transform: Callable | None, allow_partial: bool) -> tuple[Dataset, dict[str, int]]:
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in WNIDS]
    if unknown:
        raise DataError(f"{split_dir}: {len(unknown)} folder(s) are not ImageNet-1k wnids, e.g. {unknown[:5]}. "
                        f"Each folder must be named by its WordNet id (n01440764 …). Expected:\n{EXPECTED_TREE}")
    missing = sorted(set(WNIDS) - set(folders))
    if missing and not allow_partial:
        raise DataError(f"{split_dir}: {len(missing)} of the 1000 ImageNet-1k classes have no folder, e.g. "
                        f"{missing[:5]}. Accuracy over a subset is not comparable with published numbers; "
                        f"pass task.allow_partial=true to evaluate the classes present anyway. Expected:\n"
                        f"{EXPECTED_TREE}")
    try:
        ds = ImageNetFolder(str(split_dir), transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"{split_dir}: {e}. Every wnid folder needs at least one image "
                        f"(.JPEG, .jpg, .png …). Expected:\n{EXPECTED_TREE}") from None
    return ds, {"images": len(ds), "classes": len(folders)}


def _is_hf_copy(root: Path) -> bool:
    return any((root / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")) \
        or any(root.rglob("*.parquet"))


def _hf(root: Path, split: str, transform: Callable | None) -> tuple[Dataset, dict[str, int]]:
    import datasets

    hf_split = HF_SPLITS.get(split, split)
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        # Only this split's files are converted (a train copy beside them would be ~150 GB of arrow cache).
        files = parquet_splits(parquet).get(hf_split)
        if not files:
            raise DataError(f"{root}: no {hf_split}-*.parquet file among the parquet files. Expected:\n{EXPECTED_TREE}")
        ds = load_parquet_splits(root, {hf_split: files}, EXPECTED_TREE)[hf_split]
    else:
        loaded = read_saved_dataset(root)
        if isinstance(loaded, datasets.DatasetDict):
            if hf_split not in loaded:
                raise DataError(f"{root}: the Hugging Face copy has splits {list(loaded)}, not {hf_split!r}.")
            loaded = loaded[hf_split]
        ds = loaded
    label = ds.features.get("label")
    if "image" not in ds.features or not isinstance(label, datasets.ClassLabel) or label.num_classes != len(WNIDS):
        raise DataError(f"{root}: expected columns 'image' and 'label' (ClassLabel with {len(WNIDS)} classes, "
                        f"as in ILSVRC/imagenet-1k); found {dict(ds.features)}.")
    if all(WNID_RE.match(n) for n in label.names) and tuple(label.names) != WNIDS:
        raise DataError(f"{root}: the label names are wnids in an order other than the sorted ImageNet-1k "
                        "order, so label indices would not match the classifier.")
    raw = ds.cast_column("image", datasets.Image(decode=False))  # decoded by HubRows, failures counted
    rows = HubRows(raw, "image", range(len(raw)), np.asarray(raw["label"], dtype=np.int64), split=hf_split,
                   transform=transform)
    return rows, {"images": len(ds), "classes": label.num_classes}
