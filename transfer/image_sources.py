"""Reading a labelled image data set: a Hugging Face Hub id, or a local copy in one of three generic layouts (a
``datasets.save_to_disk`` folder, Hub-style parquet files, an ImageFolder tree). Shared by the classification
adapter (which adds each data set's official release layouts) and the ImageNet weight check (which reads its
Hugging Face copy through :func:`read_saved_dataset`, :func:`load_parquet_splits` and :class:`HubRows`).

Every layout ends as named source splits (``train``, ``validation``, ``test`` …) of ``(PIL image, label)``
items, after a scan that skips unreadable images and counts them. The scan only parses image headers
(``PIL.Image.verify``), so it costs a small fraction of a decode; an image whose header parses but whose
data does not decode (a truncated JPEG) is caught when it is read: the item is then an
:class:`transfer.images.Undecodable`, which :func:`transfer.images.collate_images` drops and counts. Every
image is decoded by :func:`transfer.images.decode_image` (every Pillow mode to 8-bit RGB, EXIF orientation).

Each :class:`Source` also carries ``identity``, a digest of the data it was read from (the files' names,
sizes and modification times for a local copy, the ``datasets`` fingerprints for a Hub copy), which the
feature cache key includes. For a local copy it is computed in one place, :func:`with_local_identity`, which
every local layout goes through (the classification adapter's ``build_from_spec``): it digests every image file
the splits read (:class:`FileImages`) and every other file the reader declares in ``Source.files`` (split lists,
label files, arrays), so a layout cannot leave an edited file out of the key.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from transfer.errors import DataError, TransferError
from transfer.images import ImageDecodeError, TooLarge, Undecodable, check_header, decode_image, load_image

log = logging.getLogger(__name__)


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
    identity: str = ""  # digest of the data read (files, sizes, mtimes; or datasets fingerprints)
    label_column: str = ""  # the column the labels came from ("" for class folders)
    # Files a local reader read besides the splits' image files (split lists, label files, arrays): part of
    # the identity (with_local_identity).
    files: list[Path] = field(default_factory=list)


class HubRows(Dataset):
    """Rows ``indices`` of a Hugging Face data set as ``(RGB PIL image, label)``, or ``(Undecodable, label)``.

    ``ds`` has its image column cast to ``datasets.Image(decode=False)``: images decode here, so a failure is an
    item, not an exception. ``transform`` (optional) is applied to each decoded image.
    """

    def __init__(self, ds, image_column: str, indices: Sequence[int], labels: np.ndarray, *, split: str,
                 max_pixels: int | None = None, transform: Callable | None = None):
        self.ds, self.image_column, self.split, self.max_pixels = ds, image_column, split, max_pixels
        self.transform = transform
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,) of the rows kept, in order
        self.item_ids = [f"{split}[{i}]" for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image | Undecodable | TooLarge, int]:
        row = int(self.indices[i])
        cell = self.ds[row][self.image_column]
        name = f"{self.split}[{row}]" + (f" {cell['path']}" if isinstance(cell, dict) and cell.get("path") else "")
        return load_image(cell, name=name, max_pixels=self.max_pixels, transform=self.transform), int(self.labels[i])


class FileImages(Dataset):
    """Image files with labels (an ImageFolder tree or an official file list, after the scan)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], *, max_pixels: int | None = None):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)
        self.max_pixels = max_pixels
        self.item_ids = self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image | Undecodable | TooLarge, int]:
        return load_image(self.paths[i], max_pixels=self.max_pixels), int(self.labels[i])


class ArrayImages(Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3); ``item_ids`` name them for the feature
    cache key (default: the index)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], item_ids: Sequence[str] | None = None):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        if item_ids is not None:
            self.item_ids = list(item_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return decode_image(Image.fromarray(self.images[i])), int(self.labels[i])


def scan_files(paths: Sequence[str | Path], labels: Sequence[int], *, split: str, scan: bool = True,
               max_pixels: int | None = None) -> SourceSplit:
    """One split of image files: with ``scan``, every header is checked under ``max_pixels`` (a progress bar on
    a terminal) and the unreadable or missing files are skipped and counted, as for every other layout; an image
    above ``max_pixels`` raises :class:`transfer.images.ImageTooLargeError`. The items decode under the same
    limit."""
    paths, labels = [str(p) for p in paths], np.asarray(labels, dtype=np.int64)
    good = np.ones(len(paths), dtype=bool)
    if scan:
        for i, f in enumerate(tqdm(paths, desc=f"scan {split}", unit="img", leave=False, disable=None)):
            good[i] = readable(f, max_pixels=max_pixels)
    bad = [f for f, ok in zip(paths, good) if not ok]
    keep = np.flatnonzero(good)
    return SourceSplit(FileImages([paths[i] for i in keep], labels[keep], max_pixels=max_pixels), labels[keep],
                       len(bad), bad[:5])


def readable(value, *, max_pixels: int | None = None, name: str | None = None) -> bool:
    """True when the image header parses (cheap: no full decode).

    An image above the size limit is not unreadable: :class:`transfer.images.ImageTooLargeError` propagates.
    """
    try:
        check_header(value, max_pixels=max_pixels, name=name)
        return True
    except ImageDecodeError:
        return False


def labels_of(ds: Dataset) -> np.ndarray:
    """(N,) int64 labels of every item of ``ds``, read without decoding an image.

    ``ds`` is a base data set with a ``labels`` array, or ``Subset`` / ``ConcatDataset`` layers over them, or
    a wrapper that keeps items in place and names its data set ``base`` (``datasets.Transformed``).
    """
    if hasattr(ds, "base"):
        return labels_of(ds.base)
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, ConcatDataset):
        return np.concatenate([labels_of(d) for d in ds.datasets]) if ds.datasets else np.zeros(0, np.int64)
    if hasattr(ds, "labels"):
        return np.asarray(ds.labels, dtype=np.int64)
    raise TypeError(f"{type(ds).__name__} has no labels array")


def items_digest(ds: Dataset) -> str:
    """sha256 over the identity of every item of ``ds`` in order (file paths, Hub row ids or array indices)."""
    h = hashlib.sha256()
    for item in item_ids(ds):
        h.update(str(item).encode() + b"\n")
    return h.hexdigest()


def item_ids(ds: Dataset) -> list:
    """What names each item of ``ds``: its file path, Hub row (``split[row]``) or array index."""
    if hasattr(ds, "base"):
        return item_ids(ds.base)
    if isinstance(ds, Subset):
        ids = item_ids(ds.dataset)
        return [ids[int(i)] for i in ds.indices]
    if isinstance(ds, ConcatDataset):
        return [x for d in ds.datasets for x in item_ids(d)]
    return list(getattr(ds, "item_ids", range(len(ds))))


def files_identity(root: Path, files: Iterable[Path]) -> str:
    """sha256 over (path relative to ``root``, or as given outside it; size; mtime in ns) of ``files``: changes
    when a file is added, removed, moved, replaced or edited. A file that does not exist counts by its name."""
    h = hashlib.sha256()
    for f in sorted({Path(f) for f in files}):
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        name = f.relative_to(root) if f.is_relative_to(root) else f
        h.update(f"{name}\t{stamp}\n".encode())
    return h.hexdigest()


def image_files(ds: Dataset) -> list[str]:
    """The image files ``ds`` reads (:class:`FileImages` paths, through ``Subset`` / ``ConcatDataset`` / ``base``
    layers); empty for rows of a Hub copy or arrays in memory."""
    if hasattr(ds, "base"):
        return image_files(ds.base)
    if isinstance(ds, Subset):
        return image_files(ds.dataset)
    if isinstance(ds, ConcatDataset):
        return [f for d in ds.datasets for f in image_files(d)]
    return list(ds.paths) if isinstance(ds, FileImages) else []


def with_local_identity(source: Source, root: Path) -> Source:
    """``source`` with ``identity`` covering every file a local layout read: the reader's own digest (arrow or
    parquet files), the files it declares (``source.files``) and every image file of its splits, each by path,
    size and mtime. Every local copy goes through here (``datasets.build_from_spec``), so the feature cache key
    changes when any of them is edited or replaced.

    Raises :class:`TransferError` when the reader left nothing to digest: a layout that reads files it does not
    declare is a bug, not a cache key that silently ignores the data.
    """
    files = [Path(f) for f in source.files] + [Path(f) for s in source.splits.values() for f in image_files(s.dataset)]
    if not files and not source.identity:
        raise TransferError(f"{source.origin}: the reader of this layout declared no files it read (Source.files) "
                            "and no identity; the feature cache could not tell an edited copy from this one.")
    h = hashlib.sha256(f"{source.identity}\n{files_identity(root, files) if files else ''}".encode())
    source.identity = h.hexdigest()
    return source


def check_damage(*, bad: int, total: int, examples: Sequence[str], max_bad_fraction: float, origin: str,
                 what: str = "unreadable") -> None:
    """Raise :class:`DataError` when ``bad`` of ``total`` images exceed ``max_bad_fraction``; warn otherwise."""
    if not bad:
        return
    log.warning("%s: skipped %d %s image(s) of %d, e.g. %s", origin, bad, what, total, list(examples)[:5])
    if bad > max_bad_fraction * total:
        raise DataError(f"{origin}: {bad} of {total} images are {what}, more than task.max_bad_fraction="
                        f"{max_bad_fraction}; e.g. {list(examples)[:5]}. Re-download the damaged files, or raise "
                        "task.max_bad_fraction to skip them.")


def accepted_layouts(official: Sequence[str] = ()) -> str:
    """The numbered list of layouts ``task.data_dir`` may have: the data set's official ones, then the generic."""
    generic = [
        "a datasets.save_to_disk folder (DATA_DIR/dataset_dict.json, DATA_DIR/train/…, DATA_DIR/test/…);",
        "parquet files named by split, as on the Hub (DATA_DIR/data/train-00000-of-00001.parquet,\n"
        "     DATA_DIR/data/test-00000-of-00001.parquet);",
        "an ImageFolder tree: DATA_DIR/train/<class>/*.jpg, DATA_DIR/test/<class>/*.jpg\n"
        "     (optionally DATA_DIR/val/<class>/*.jpg).",
    ]
    return "\n".join(f"  {i}. {text}" for i, text in enumerate([*official, *generic], start=1))


def load_source(*, data_dir: str | None, hub_id: str | None, image_column: str, label_column: str,
                scan: bool = True, max_pixels: int | None = None, official: Sequence[str] = (),
                hint: str = "") -> Source:
    """Open the data set from ``data_dir`` when given, else from the Hub by ``hub_id``; scan every split.

    ``max_pixels``: the image size limit of :func:`transfer.images.decode_image` (default Pillow's).
    ``official`` describes the data set's official release layouts (read elsewhere, before this): every error
    lists them with the generic layouts; ``hint`` is added to the error for a folder in no layout.
    """
    layouts = accepted_layouts(official)
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"task.data_dir={data_dir!r} is not a directory. Accepted layouts:\n{layouts}")
        if _is_saved_dataset(root):
            identity = files_identity(root, (p for p in root.rglob("*") if p.is_file()))
            return _from_hf(_load_from_disk(root), image_column, label_column, str(root), scan, max_pixels,
                            identity)
        parquet = sorted(root.rglob("*.parquet"))
        if parquet:
            return _from_hf(load_parquet_splits(root, parquet_splits(parquet), layouts), image_column, label_column,
                            str(root), scan, max_pixels, files_identity(root, parquet))
        if (root / "train").is_dir():
            return _from_folders(root, scan, max_pixels, layouts)
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"task.data_dir={str(root)!r} is in none of the accepted layouts (found: "
                        f"{found or 'nothing'}).{' ' + hint if hint else ''} Accepted layouts:\n{layouts}")
    if not hub_id:
        raise DataError("this data set has no Hugging Face Hub copy on record; download it yourself and pass "
                        f"task.data_dir=PATH. Accepted layouts:\n{layouts}")
    dsd = _load_hub(hub_id, layouts)
    identity = hashlib.sha256(repr(sorted((k, v._fingerprint) for k, v in dsd.items())).encode()).hexdigest()
    return _from_hf(dsd, image_column, label_column, f"hub:{hub_id}", scan, max_pixels, identity)


def _is_saved_dataset(root: Path) -> bool:
    return any((root / f).exists() for f in ("dataset_dict.json", "state.json"))


def read_saved_dataset(root: Path):
    """A ``datasets.save_to_disk`` folder as saved: a ``DatasetDict``, or one ``Dataset``."""
    import datasets

    return datasets.load_from_disk(str(root))


def _load_from_disk(root: Path):
    import datasets

    loaded = read_saved_dataset(root)
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def parquet_splits(files: Iterable[Path]) -> dict[str, list[str]]:
    """Parquet files grouped by split, as the Hub names them: ``<split>-00000-of-00001.parquet``, or files in a
    folder named after the split."""
    by_split: dict[str, list[str]] = {}
    for f in files:
        split = f.name.split("-")[0] if "-" in f.name else f.parent.name
        by_split.setdefault(split, []).append(str(f))
    return by_split


def load_parquet_splits(root: Path, by_split: dict[str, list[str]], layouts: str):
    """``datasets.DatasetDict`` of the parquet files ``by_split`` (only the splits given are converted); a damaged
    file raises :class:`DataError` naming ``root`` and the ``layouts`` accepted."""
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=by_split)
    except Exception as e:  # noqa: BLE001 - arrow/parquet raise many types for a damaged file
        raise DataError(f"task.data_dir={str(root)!r}: cannot read its parquet files ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}). Accepted layouts:\n{layouts}") from None


def _load_hub(hub_id: str, layouts: str):
    """``datasets.load_dataset(hub_id)``; any failure is a :class:`DataError` naming ``hub_id`` and ``layouts``.

    An unreachable Hub fails at once, like :func:`transfer.weights.download_hub`: the Hub client would retry
    five times with back-off (about 23 s, printing two lines each time) before its own error. A data set loaded
    before (its card in the Hub cache, or its prepared copy in the ``datasets`` cache) goes to ``datasets``
    anyway, which falls back to its cached copy.
    """
    import datasets
    from huggingface_hub import try_to_load_from_cache

    from transfer.weights import check_reachable

    try:
        if not (datasets.config.HF_HUB_OFFLINE
                or isinstance(try_to_load_from_cache(hub_id, "README.md", repo_type="dataset"), str)
                or _in_datasets_cache(hub_id)):
            check_reachable(datasets.config.HF_ENDPOINT)
        return datasets.load_dataset(hub_id)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, loading-script repos: one actionable message
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load the Hugging Face data set {hub_id!r} ({type(e).__name__}: {first}). "
                        f"Without network access, or if the id is wrong, download a copy and pass "
                        f"task.data_dir=PATH (or another id as task.hub_id=ID); a copy already in the Hugging "
                        f"Face cache loads with HF_HUB_OFFLINE=1. Accepted layouts:\n{layouts}") from None


def _in_datasets_cache(hub_id: str) -> bool:
    """Whether ``datasets`` holds a prepared copy of ``hub_id``: its cache keeps one folder per data set,
    ``<owner>___<name>`` under ``datasets.config.HF_DATASETS_CACHE``."""
    import datasets

    folder = hub_id.replace("/", "___")
    root = Path(datasets.config.HF_DATASETS_CACHE)
    return any((root / name).is_dir() for name in {folder, folder.lower()})


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


def _from_hf(dsd, image_column: str, label_column: str, origin: str, scan: bool, max_pixels: int | None,
             identity: str) -> Source:
    import datasets

    splits, names, label_cols = {}, None, set()
    for split_name, ds in dsd.items():
        image_col = _column(ds, image_column, "image", origin)
        label_col = _column(ds, label_column, "label", origin)
        label_cols.add(label_col)
        feature = ds.features[label_col]
        if names is None and isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        raw = ds.cast_column(image_col, datasets.Image(decode=False))
        labels = np.asarray(raw[label_col], dtype=np.int64)
        good, bad = np.ones(len(raw), dtype=bool), []
        if scan:
            for i, cell in enumerate(tqdm(raw.select_columns([image_col]), desc=f"scan {split_name}",
                                          unit="img", leave=False, disable=None)):
                where = f"{split_name}[{i}]" + (f" {cell[image_col].get('path')}"
                                                if cell[image_col].get("path") else "")
                if not readable(cell[image_col], max_pixels=max_pixels, name=where):
                    good[i] = False
                    bad.append(where)
        keep = np.flatnonzero(good)
        splits[split_name] = SourceSplit(HubRows(raw, image_col, keep, labels[keep], split=split_name,
                                                 max_pixels=max_pixels), labels[keep], len(bad), bad[:5])
    if names is None:
        present = np.concatenate([s.labels for s in splits.values()])
        names = [str(i) for i in range(int(present.max()) + 1)] if len(present) else []
    return Source(splits, names, origin, identity=identity, label_column="+".join(sorted(label_cols)))


def _from_folders(root: Path, scan: bool, max_pixels: int | None, layouts: str) -> Source:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders. Accepted layouts:\n{layouts}")
    index = {c: i for i, c in enumerate(classes)}
    splits, listed = {}, []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        paths, labels = [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{split_dir}: class folder {class_dir.name!r} is not among the train classes "
                                f"({len(classes)} folders under {root / 'train'}).")
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMG_EXTENSIONS:
                    paths.append(f)
                    labels.append(index[class_dir.name])
        listed += paths
        splits[split_dir.name] = scan_files(paths, labels, split=split_dir.name, scan=scan, max_pixels=max_pixels)
    return Source(splits, classes, str(root), identity=files_identity(root, listed))
