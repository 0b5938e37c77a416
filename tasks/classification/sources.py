"""Reading a classification data set: a Hugging Face Hub id, or a local copy in one of three layouts.

Every layout ends as named source splits (``train``, ``validation``, ``test`` …) of ``(PIL image, label)``
items, after a scan that skips unreadable images and counts them. The scan only parses image headers
(``PIL.Image.verify``), so it costs a small fraction of a decode.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from transfer.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = """\
  1. a datasets.save_to_disk folder (DATA_DIR/dataset_dict.json, DATA_DIR/train/…, DATA_DIR/test/…);
  2. parquet files named by split, as on the Hub (DATA_DIR/data/train-00000-of-00001.parquet,
     DATA_DIR/data/test-00000-of-00001.parquet);
  3. an ImageFolder tree: DATA_DIR/train/<class>/*.jpg, DATA_DIR/test/<class>/*.jpg
     (optionally DATA_DIR/val/<class>/*.jpg)."""
SCAN_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class SourceSplit:
    """One split of the source after the scan: the readable items and how many were skipped."""

    dataset: Dataset
    labels: np.ndarray  # (N,) int64, the label of every readable item
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class Source:
    splits: dict[str, SourceSplit]
    class_names: list[str]
    origin: str  # what was read, for messages


class HubRows(Dataset):
    """Rows ``indices`` of a Hugging Face data set as ``(RGB PIL image, label)``."""

    def __init__(self, ds, image_column: str, label_column: str, indices: Sequence[int]):
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        row = self.ds[int(self.indices[i])]
        return _open(row[self.image_column]).convert("RGB"), int(row[self.label_column])


class FileImages(Dataset):
    """Image files with labels (an ImageFolder tree after the scan)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), int(self.labels[i])


def _open(value) -> Image.Image:
    """A PIL image from a decoded image, or a Hugging Face ``{"bytes", "path"}`` cell."""
    if isinstance(value, Image.Image):
        return value
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def readable(value) -> bool:
    """True when the image header parses (cheap: no full decode)."""
    try:
        with _open(value) as im:
            im.verify()
        return True
    except SCAN_ERRORS:
        return False


def load_source(*, data_dir: str | None, hub_id: str | None, image_column: str, label_column: str,
                scan: bool = True) -> Source:
    """Open the data set from ``data_dir`` when given, else from the Hub by ``hub_id``; scan every split."""
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"task.data_dir={data_dir!r} is not a directory. Accepted layouts:\n{LAYOUTS}")
        if _is_saved_dataset(root):
            return _from_hf(_load_from_disk(root), image_column, label_column, str(root), scan)
        parquet = sorted(root.rglob("*.parquet"))
        if parquet:
            return _from_hf(_load_parquet(root, parquet), image_column, label_column, str(root), scan)
        if (root / "train").is_dir():
            return _from_folders(root, scan)
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"task.data_dir={str(root)!r} is in none of the accepted layouts (found: "
                        f"{found or 'nothing'}). Accepted layouts:\n{LAYOUTS}")
    if not hub_id:
        raise DataError("this data set has no Hugging Face Hub copy on record; download it yourself and pass "
                        f"task.data_dir=PATH. Accepted layouts:\n{LAYOUTS}")
    return _from_hf(_load_hub(hub_id), image_column, label_column, f"hub:{hub_id}", scan)


def _is_saved_dataset(root: Path) -> bool:
    return any((root / f).exists() for f in ("dataset_dict.json", "state.json"))


def _load_from_disk(root: Path):
    import datasets

    loaded = datasets.load_from_disk(str(root))
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _load_parquet(root: Path, files: list[Path]):
    import datasets

    by_split: dict[str, list[str]] = {}
    for f in files:
        # Hub layout: <split>-00000-of-00001.parquet, or a folder named after the split.
        split = f.name.split("-")[0] if "-" in f.name else f.parent.name
        by_split.setdefault(split, []).append(str(f))
    try:
        return datasets.load_dataset("parquet", data_files=by_split)
    except Exception as e:  # noqa: BLE001 - arrow/parquet raise many types for a damaged file
        raise DataError(f"task.data_dir={str(root)!r}: cannot read its parquet files ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}). Accepted layouts:\n{LAYOUTS}") from None


def _load_hub(hub_id: str):
    import datasets

    try:
        return datasets.load_dataset(hub_id)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, loading-script repos: one actionable message
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load the Hugging Face data set {hub_id!r} ({type(e).__name__}: {first}). "
                        f"Without network access, or if the id is wrong, download a copy and pass "
                        f"task.data_dir=PATH (or another id as task.hub_id=ID). Accepted layouts:\n{LAYOUTS}") from None


def _column(ds, wanted: str, kind: str, origin: str) -> str:
    """``wanted`` when present, else the one column of feature type ``kind`` (Image or ClassLabel)."""
    import datasets

    if wanted in ds.column_names:
        return wanted
    typed = {"image": datasets.Image, "label": datasets.ClassLabel}[kind]
    found = [name for name, feat in ds.features.items() if isinstance(feat, typed)]
    if len(found) == 1:
        return found[0]
    raise DataError(f"{origin}: no {kind} column {wanted!r}; columns are {ds.column_names}. "
                    f"Name it with task.{kind}_column=NAME.")


def _from_hf(dsd, image_column: str, label_column: str, origin: str, scan: bool) -> Source:
    import datasets

    splits, names = {}, None
    for split_name, ds in dsd.items():
        image_col = _column(ds, image_column, "image", origin)
        label_col = _column(ds, label_column, "label", origin)
        feature = ds.features[label_col]
        if names is None and isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        raw = ds.cast_column(image_col, datasets.Image(decode=False))
        labels = np.asarray(raw[label_col], dtype=np.int64)
        good, bad = np.ones(len(raw), dtype=bool), []
        if scan:
            for i, cell in enumerate(tqdm(raw.select_columns([image_col]), desc=f"scan {split_name}",
                                          unit="img", leave=False)):
                if not readable(cell[image_col]):
                    good[i] = False
                    bad.append(f"{split_name}[{i}]" + (f" {cell[image_col].get('path')}"
                                                       if cell[image_col].get("path") else ""))
        keep = np.flatnonzero(good)
        splits[split_name] = SourceSplit(HubRows(raw, image_col, label_col, keep), labels[keep], len(bad), bad[:5])
    if names is None:
        present = np.concatenate([s.labels for s in splits.values()])
        names = [str(i) for i in range(int(present.max()) + 1)] if len(present) else []
    return Source(splits, names, origin)


def _from_folders(root: Path, scan: bool) -> Source:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders. Accepted layouts:\n{LAYOUTS}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        paths, labels, bad = [], [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{split_dir}: class folder {class_dir.name!r} is not among the train classes "
                                f"({len(classes)} folders under {root / 'train'}).")
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() not in IMG_EXTENSIONS:
                    continue
                if scan and not readable({"path": str(f), "bytes": None}):
                    bad.append(str(f))
                    continue
                paths.append(str(f))
                labels.append(index[class_dir.name])
        splits[split_dir.name] = SourceSplit(FileImages(paths, labels), np.asarray(labels, dtype=np.int64),
                                             len(bad), bad[:5])
    return Source(splits, classes, str(root))
