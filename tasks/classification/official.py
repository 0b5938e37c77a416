"""Local copies in their official release layouts, read from disk with the official splits (never downloading).

``task.data_dir`` may point at the folder the release unpacks to, or at its parent (torchvision's download
root, where torchvision's ``download=True`` would have put it):

========================  =====================================================================  ============
data set                  official layout (the folder passed, or its parent's subfolder)          read by
========================  =====================================================================  ============
CIFAR-10 / CIFAR-100      ``cifar-10-batches-py/`` data_batch_1..5, test_batch, batches.meta;      own (below)
                          ``cifar-100-python/`` train, test, meta
Flowers-102               ``jpg/``, ``imagelabels.mat``, ``setid.mat`` (or ``flowers-102/``)      torchvision
Oxford-IIIT Pets          ``images/``, ``annotations/trainval.txt``, ``test.txt``                  torchvision
DTD                       ``dtd/images/``, ``dtd/labels/train1.txt``, ``val1.txt``, ``test1.txt``   torchvision
FGVC-Aircraft             ``fgvc-aircraft-2013b/data/images/``, ``images_variant_*.txt``           torchvision
Stanford Cars             ``devkit/`` (cars_meta.mat, cars_train_annos.mat), ``cars_train/``,       own (below)
                          ``cars_test/``, ``cars_test_annos_withlabels.mat``
Food-101                  ``food-101/images/``, ``meta/train.json``, ``meta/test.json``           torchvision
Caltech-101               ``101_ObjectCategories/<class>/*.jpg``                                   own (below)
SUN397                    ``SUN397/<l>/<class>/sun_*.jpg``, ``ClassName.txt``,                     own (below)
                          ``Partitions/Training_01.txt``, ``Testing_01.txt``
========================  =====================================================================  ============

torchvision 0.29's readers parse these layouts and are reused from a local root: each small subclass below only
points the reader's folder at the one found (torchvision hard-codes a subfolder name, e.g. ``root/food-101``) and
never downloads. Four are written here, each for a reason:

- CIFAR: torchvision unpickles the batches with :func:`pickle.load`, which runs any code a file holds; the
  house rule is that untrusted files are never unpickled, so the batches are read by an unpickler that only
  rebuilds numpy arrays, lists, dicts and strings (:class:`ArraysOnlyUnpickler`). File names come from
  torchvision's ``CIFAR10`` / ``CIFAR100`` class attributes.
- Stanford Cars: torchvision's ``StanfordCars`` reads ``cars_meta.mat`` from the fixed path
  ``root/stanford_cars/devkit``, so only a folder of that name could be read; the same scipy parsing is done here.
- Caltech-101: torchvision's reader drops ``BACKGROUND_Google`` and has no split; the protocol (SimCLR arXiv
  2002.05709 App. B.8, BYOL arXiv 2006.07733 Table 10: 3,060 = 30 x 102 training images) keeps all 102
  folders and draws 30 training images per class, the rest being the test set. The draw is seeded by
  ``task.split_seed``.
- SUN397: torchvision's reader lists every image and knows no partition; the protocol uses split 1 of the
  official partitions (``Training_01.txt`` / ``Testing_01.txt``, 50 + 50 images per class; BYOL Table 10).

Every reader ends as :class:`transfer.image_sources.Source` splits named ``train`` / ``validation`` /
``test``: image files go through :func:`transfer.image_sources.scan_files` (unreadable or missing files are
skipped and counted like those of every other layout). Each reader declares in ``Source.files`` every file it read
besides the images (split lists, label files, CIFAR's batch files); :func:`transfer.image_sources.
with_local_identity`, which every local copy goes through, digests those and every image file into the source's
``identity`` (part of the feature cache key).
"""
from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, DTD, FGVCAircraft, Flowers102, Food101, OxfordIIITPet
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer.errors import DataError
from transfer.image_sources import ArrayImages, Source, SourceSplit, scan_files

log = logging.getLogger(__name__)


def _has(base: Path, required: str) -> bool:
    """``required`` is a path under ``base``, or alternatives joined by ``|`` (one of them is enough)."""
    return any((base / alt.rstrip("/")).exists() for alt in required.split("|"))


def _shown(required: str) -> str:
    first, *others = required.split("|")
    return first + "".join(f" (or {o})" for o in others)


@dataclass(frozen=True)
class OfficialLayout:
    """One official release layout: ``find(root)`` says where in ``root`` it is (None when it is not there);
    ``read(where, scan=, max_pixels=, seed=)`` returns its splits, every image decoded under ``max_pixels``
    (``task.max_image_pixels``) and every file read besides the images listed in ``Source.files``.
    ``describe`` is the line listed in errors. ``required`` are the paths the layout needs (``dir/`` for a
    folder, ``a|b`` for either), looked for in ``root`` and each of ``subfolders``, so that :meth:`partial` can say
    which are missing from a partial copy; empty where the layout is too varied to say (SUN397).
    """

    describe: str
    find: Callable[[Path], Any]
    read: Callable[..., Source]
    required: tuple[str, ...] = ()
    subfolders: tuple[str, ...] = ()

    def partial(self, root: Path) -> tuple[list[str], list[str]] | None:
        """(present, missing) required paths of the folder (``root`` or a subfolder) holding the most of them, when
        it holds some but not all; None otherwise."""
        best: tuple[list[str], list[str]] | None = None
        for base in (root, *(root / s for s in self.subfolders)):
            present = [_shown(r) for r in self.required if _has(base, r)]
            missing = [_shown(r) for r in self.required if not _has(base, r)]
            if present and missing and (best is None or len(present) > len(best[0])):
                best = (present, missing)
        return best


def _layout(describe: str, subfolders: tuple[str, ...], required: tuple[str, ...],
            read: Callable[..., Source]) -> OfficialLayout:
    """A layout found in ``root`` or the first ``root/<subfolder>`` holding every ``required`` path."""
    return OfficialLayout(describe, lambda root: _under(root, subfolders, required), read, required, subfolders)


def _under(root: Path, subfolders: tuple[str, ...], required: tuple[str, ...]) -> Path | None:
    """The first of ``root`` and ``root/<subfolder>`` holding every ``required`` path."""
    for base in (root, *(root / s for s in subfolders)):
        if all(_has(base, r) for r in required):
            return base
    return None


def _unreadable(what: str, path: Path, e: Exception, fix: str) -> DataError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return DataError(f"{path}: cannot read the {what} ({type(e).__name__}: {first}). {fix}")


def _torchvision(cls: type, where: Path, what: str, fix: str, **kwargs):
    """``cls`` (a local subclass below) on ``where``; a damaged split file becomes a :class:`DataError`."""
    try:
        return cls(where, **kwargs)
    except Exception as e:  # noqa: BLE001 - scipy / json / int parsing raise many types for a damaged file
        raise _unreadable(what, where, e, fix) from None


def _files_source(where: Path, splits: dict[str, tuple[list, list]], classes: list[str], what: str, *, scan: bool,
                  max_pixels: int | None, extra_files: list[Path]) -> Source:
    """Scan the image files of each split; ``extra_files`` (the split and label files read) go to ``Source.files``
    for the identity (:func:`transfer.image_sources.with_local_identity`)."""
    out = {name: scan_files(files, labels, split=name, scan=scan, max_pixels=max_pixels)
           for name, (files, labels) in splits.items()}
    return Source(out, classes, f"{where} ({what})", files=list(extra_files))


# --- CIFAR-10 / CIFAR-100: the python pickles -------------------------------------------------------------------

class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, numbers and strings, and refuses every other global: a batch file
    cannot run code. The CIFAR batches were written by Python 2 (``encoding="latin1"`` reads their strings)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 name, without its deprecation warning
        return getattr(importlib.import_module(module), name)


def read_batch(path: Path) -> dict:
    """One CIFAR batch or meta file as a dict with ``str`` keys; a damaged or foreign file is a DataError."""
    try:
        with open(path, "rb") as f:
            out = ArraysOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
        raise _unreadable("CIFAR batch file", path, e, "Re-download the python version of the data set from "
                          "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it.") from None
    if not isinstance(out, dict):
        raise DataError(f"{path}: not a CIFAR batch file (holds a {type(out).__name__}, not a dict).")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in out.items()}


def _cifar_layout(cls: type[CIFAR10], label_key: str) -> OfficialLayout:
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def read(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
        classes = [str(c) for c in read_batch(where / cls.meta["filename"])[cls.meta["key"]]]
        splits = {}
        for split, files in (("train", cls.train_list), ("test", cls.test_list)):
            images, labels, ids = [], [], []
            for name, _ in files:
                batch = read_batch(where / name)
                data, found = np.asarray(batch.get("data")), batch.get(label_key)
                if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or found is None \
                        or len(found) != len(data):
                    raise DataError(f"{where / name}: expected 'data' uint8 (N, 3072) and {len(data)} "
                                    f"'{label_key}'; found {data.dtype} {data.shape} and "
                                    f"{'none' if found is None else len(found)}. Re-download the file.")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3) RGB
                labels += [int(x) for x in found]
                ids += [f"{name}[{i}]" for i in range(len(data))]
            labels = np.asarray(labels, dtype=np.int64)
            # The arrays are the pixels: nothing to decode, so nothing can be skipped.
            splits[split] = SourceSplit(ArrayImages(np.concatenate(images), labels, ids), labels)
        return Source(splits, classes, f"{where} (official {cls.__name__} python batches)",
                      label_column=label_key, files=[where / n for n in names])

    return _layout(f"the official python version: {cls.base_folder}/ with {', '.join(names)} (as unpacked from "
                   f"{cls.filename}; DATA_DIR is that folder or the one holding it, torchvision's download root)",
                   (cls.base_folder,), tuple(names), read)


# --- Flowers-102 -------------------------------------------------------------------------------------------------

FLOWERS_FILES = ("jpg/", "imagelabels.mat", "setid.mat")
# The suite's split names for torchvision's: train / val / test read from setid.mat's trnid / valid / tstid.
FLOWERS_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class _LocalFlowers102(Flowers102):
    """torchvision's Flowers-102 reader on ``where``; the two ``.mat`` files are accepted without torchvision's
    md5 of the official download (a re-saved but equal ``setid.mat`` is fine: split sizes are checked after)."""

    def _check_integrity(self) -> bool:  # called by torchvision's __init__ before it reads the .mat files
        self._base_folder, self._images_folder = Path(self.root), Path(self.root) / "jpg"
        return True


def read_flowers102(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """The official Flowers-102 splits (train 1,020 / val 1,020 / test 6,149) from ``setid.mat``."""
    splits = {}
    for ours, theirs in FLOWERS_SPLITS.items():
        ds = _torchvision(_LocalFlowers102, where, "Flowers-102 split files setid.mat / imagelabels.mat",
                          "Re-download them from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/.", split=theirs)
        splits[ours] = (list(ds._image_files), list(ds._labels))  # torchvision 0.29 keeps them private
    return _files_source(where, splits, list(Flowers102.classes), "official Flowers-102 files", scan=scan,
                         max_pixels=max_pixels, extra_files=[where / "setid.mat", where / "imagelabels.mat"])


# --- Oxford-IIIT Pets --------------------------------------------------------------------------------------------

class _LocalPets(OxfordIIITPet):
    def _check_exists(self) -> bool:  # torchvision looks in root/oxford-iiit-pet; the layout is in root itself
        self._base_folder = Path(self.root)
        self._images_folder, self._anns_folder = self._base_folder / "images", self._base_folder / "annotations"
        self._segs_folder = self._anns_folder / "trimaps"
        return super()._check_exists()


def read_pets(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """Oxford-IIIT Pets: ``annotations/trainval.txt`` (3,680) is train, ``test.txt`` (3,669) test; 37 breeds."""
    splits, classes = {}, []
    for ours, theirs in (("train", "trainval"), ("test", "test")):
        ds = _torchvision(_LocalPets, where, f"Oxford-IIIT Pets split file annotations/{theirs}.txt",
                          "Re-download annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/.",
                          split=theirs)
        splits[ours] = ([str(p) for p in ds._images], list(ds._labels))
        classes = classes or list(ds.classes)
    return _files_source(where, splits, classes, "official Oxford-IIIT Pets files", scan=scan, max_pixels=max_pixels,
                         extra_files=[where / "annotations" / f for f in ("trainval.txt", "test.txt")])


# --- DTD ---------------------------------------------------------------------------------------------------------

class _LocalDTD(DTD):
    def _check_exists(self) -> bool:  # torchvision looks in root/dtd/dtd; the layout is in root itself
        self._base_folder = self._data_folder = Path(self.root)
        self._meta_folder, self._images_folder = self._data_folder / "labels", self._data_folder / "images"
        return super()._check_exists()


def read_dtd(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """DTD split 1: ``labels/train1.txt``, ``val1.txt``, ``test1.txt`` (1,880 each; BYOL Table 10), 47 textures.

    torchvision numbers the classes of each split file on its own; here one numbering (the sorted texture
    names of all three files) serves every split.
    """
    listed = {}
    for ours, theirs in (("train", "train"), ("validation", "val"), ("test", "test")):
        ds = _torchvision(_LocalDTD, where, f"DTD split file labels/{theirs}1.txt",
                          "Re-download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/.",
                          split=theirs, partition=1)
        listed[ours] = list(ds._image_files)
    classes = sorted({Path(f).parent.name for files in listed.values() for f in files})
    index = {c: i for i, c in enumerate(classes)}
    splits = {k: (files, [index[Path(f).parent.name] for f in files]) for k, files in listed.items()}
    return _files_source(where, splits, classes, "official DTD files, split 1", scan=scan, max_pixels=max_pixels,
                         extra_files=[where / "labels" / f"{s}1.txt" for s in ("train", "val", "test")])


# --- FGVC-Aircraft -----------------------------------------------------------------------------------------------

class _LocalAircraft(FGVCAircraft):
    def _check_exists(self) -> bool:  # torchvision looks in root/fgvc-aircraft-2013b; the layout is in root itself
        self._data_path = str(self.root)
        return super()._check_exists()


def read_aircraft(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """FGVC-Aircraft 2013b, 100 variants: ``data/images_variant_train.txt`` / ``_val.txt`` / ``_test.txt``."""
    splits, classes = {}, []
    for ours, theirs in (("train", "train"), ("validation", "val"), ("test", "test")):
        ds = _torchvision(_LocalAircraft, where, f"FGVC-Aircraft list data/images_variant_{theirs}.txt",
                          "Re-download fgvc-aircraft-2013b.tar.gz from "
                          "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/.", split=theirs,
                          annotation_level="variant")
        splits[ours] = (list(ds._image_files), list(ds._labels))
        classes = classes or list(ds.classes)
    lists = [where / "data" / f"images_variant_{s}.txt" for s in ("train", "val", "test")]
    return _files_source(where, splits, classes, "official FGVC-Aircraft 2013b files", scan=scan,
                         max_pixels=max_pixels, extra_files=[where / "data" / "variants.txt", *lists])


# --- Stanford Cars -----------------------------------------------------------------------------------------------

CARS_TEST_ANNOS = "cars_test_annos_withlabels.mat"


def _cars_test_annos(where: Path) -> Path:
    """The labelled test annotations came as a separate download: beside ``devkit/`` or inside it."""
    return next((p for p in (where / CARS_TEST_ANNOS, where / "devkit" / CARS_TEST_ANNOS) if p.exists()),
                where / CARS_TEST_ANNOS)


def read_cars(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """Stanford Cars, 196 classes: ``devkit/cars_train_annos.mat`` (8,144) and ``cars_test_annos_withlabels.mat``
    (8,041), class names from ``devkit/cars_meta.mat``.

    Read here with scipy as torchvision's ``StanfordCars`` reads them (``annotations`` records: ``fname`` and the
    1-based ``class``), because that reader takes ``cars_meta.mat`` from the fixed path ``root/stanford_cars/
    devkit``, so a copy in a folder of any other name could not be read through it.
    """
    import scipy.io

    mats = {"train": where / "devkit" / "cars_train_annos.mat", "test": _cars_test_annos(where)}
    meta = where / "devkit" / "cars_meta.mat"
    splits = {}
    try:
        classes = [str(c) for c in scipy.io.loadmat(meta, squeeze_me=True)["class_names"].tolist()]
        for split, mat in mats.items():
            records = np.atleast_1d(scipy.io.loadmat(mat, squeeze_me=True)["annotations"])
            splits[split] = ([where / f"cars_{split}" / str(r["fname"]) for r in records],
                             [int(r["class"]) - 1 for r in records])
    except Exception as e:  # noqa: BLE001 - scipy raises many types for a damaged .mat file
        raise _unreadable("Stanford Cars annotations (devkit/cars_meta.mat, cars_train_annos.mat, "
                          f"{CARS_TEST_ANNOS})", where, e, "Re-download car_devkit.tgz and "
                          f"{CARS_TEST_ANNOS}.") from None
    for split, (_, labels) in splits.items():
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise DataError(f"{mats[split]}: classes outside 1..{len(classes)} of {meta}; the files do not belong "
                            "together.")
    return _files_source(where, splits, classes, "official Stanford Cars files", scan=scan, max_pixels=max_pixels,
                         extra_files=[meta, *mats.values()])


# --- Food-101 ----------------------------------------------------------------------------------------------------

class _LocalFood101(Food101):
    def _check_exists(self) -> bool:  # torchvision looks in root/food-101; the layout is in root itself
        self._base_folder = Path(self.root)
        self._meta_folder, self._images_folder = self._base_folder / "meta", self._base_folder / "images"
        return super()._check_exists()


def read_food101(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """Food-101: ``meta/train.json`` (75,750) and ``meta/test.json`` (25,250), 101 dishes."""
    splits, classes = {}, []
    for split in ("train", "test"):
        ds = _torchvision(_LocalFood101, where, f"Food-101 split file meta/{split}.json",
                          "Re-download food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/.",
                          split=split)
        splits[split] = (list(ds._image_files), list(ds._labels))
        classes = classes or list(ds.classes)
    return _files_source(where, splits, classes, "official Food-101 files", scan=scan, max_pixels=max_pixels,
                         extra_files=[where / "meta" / f"{s}.json" for s in ("train", "test")])


# --- Caltech-101 -------------------------------------------------------------------------------------------------

CALTECH_TRAIN_PER_CLASS = 30  # SimCLR App. B.8; BYOL Table 10: 3,060 = 30 x 102


def read_caltech101(where: Path, *, scan: bool = True, max_pixels: int | None = None, seed: int = 0) -> Source:
    """Caltech-101: all 102 folders of ``101_ObjectCategories`` (with ``BACKGROUND_Google``); per class 30
    training images drawn with ``seed`` (``task.split_seed``), the others are the test set."""
    folder = where / "101_ObjectCategories"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; unpack 101_ObjectCategories.tar.gz there.")
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        files = sorted(f for f in (folder / name).iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
        chosen = set(rng.permutation(len(files))[:CALTECH_TRAIN_PER_CLASS].tolist())
        for i, f in enumerate(files):
            paths, labels = splits["train" if i in chosen else "test"]
            paths.append(f)
            labels.append(label)
    return _files_source(where, splits, classes, f"official Caltech-101 folders, {CALTECH_TRAIN_PER_CLASS} "
                         f"training images per class drawn with task.split_seed={seed}", scan=scan,
                         max_pixels=max_pixels, extra_files=[folder / name for name in classes])  # the folders listed


# --- SUN397 ------------------------------------------------------------------------------------------------------

SUN_PARTITION = ("Training_01.txt", "Testing_01.txt")


def _find_sun397(root: Path) -> tuple[Path, Path] | None:
    """(images folder holding ``<l>/<class>/``, folder holding ClassName.txt and the split-1 partition files)."""
    for images in (root / "SUN397", root):
        if not images.is_dir():
            continue
        for parts in (images / "Partitions", images, root / "Partitions", root):
            if all((parts / f).exists() for f in (*SUN_PARTITION, "ClassName.txt")):
                return images, parts
    return None


def read_sun397(where: tuple[Path, Path], *, scan: bool = True, max_pixels: int | None = None,
                seed: int = 0) -> Source:
    """SUN397 split 1: ``Training_01.txt`` / ``Testing_01.txt`` (19,850 each), classes from ``ClassName.txt``.

    Each line of the partition files is an image path under the images folder, ``/a/abbey/sun_aaa.jpg``; its
    folder (``/a/abbey``) is the class as listed in ``ClassName.txt``.
    """
    images, parts = where
    try:
        classes = [line.strip() for line in (parts / "ClassName.txt").read_text().splitlines() if line.strip()]
        lists = {split: [line.strip() for line in (parts / name).read_text().splitlines() if line.strip()]
                 for split, name in zip(("train", "test"), SUN_PARTITION)}
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable("SUN397 partition files", parts, e, "Re-download Partitions.zip from "
                          "https://vision.princeton.edu/projects/2010/SUN/.") from None
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, lines in lists.items():
        unknown = sorted({line.rsplit("/", 1)[0] for line in lines} - set(index))
        if unknown:
            raise DataError(f"{parts / SUN_PARTITION[split == 'test']}: classes {unknown[:5]} are not in "
                            f"{parts / 'ClassName.txt'}; the partition and class files do not belong together.")
        splits[split] = ([images / line.lstrip("/") for line in lines],
                         [index[line.rsplit("/", 1)[0]] for line in lines])
    source = _files_source(images, splits, classes, "official SUN397 images, partition 1", scan=scan,
                           max_pixels=max_pixels, extra_files=[parts / f for f in (*SUN_PARTITION, "ClassName.txt")])
    source.label_column = "partition 1"
    return source


# --- the layouts of each data set --------------------------------------------------------------------------------

OFFICIAL_LAYOUTS: dict[str, OfficialLayout] = {
    "cifar10": _cifar_layout(CIFAR10, "labels"),
    "cifar100": _cifar_layout(CIFAR100, "fine_labels"),
    "flowers102": _layout(
        "the official Flowers-102 files: jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat (or under flowers-102/, "
        "torchvision's download folder)", ("flowers-102",), FLOWERS_FILES, read_flowers102),
    "oxford_pets": _layout(
        "the official Oxford-IIIT Pets files: images/*.jpg, annotations/trainval.txt and test.txt (or under "
        "oxford-iiit-pet/)", ("oxford-iiit-pet",), ("images/", "annotations/trainval.txt", "annotations/test.txt"),
        read_pets),
    "dtd": _layout(
        "the official DTD files: dtd/images/<texture>/*.jpg, dtd/labels/train1.txt, val1.txt, test1.txt (DATA_DIR "
        "is dtd/, the folder holding it, or torchvision's root holding dtd/dtd/)", ("dtd", "dtd/dtd"),
        ("images/", "labels/train1.txt", "labels/val1.txt", "labels/test1.txt"), read_dtd),
    "fgvc_aircraft": _layout(
        "the official FGVC-Aircraft files: fgvc-aircraft-2013b/data/images/*.jpg, data/variants.txt, "
        "data/images_variant_train.txt, _val.txt, _test.txt", ("fgvc-aircraft-2013b",),
        ("data/images/", "data/variants.txt", *(f"data/images_variant_{s}.txt" for s in ("train", "val", "test"))),
        read_aircraft),
    "stanford_cars": _layout(
        "the official Stanford Cars files: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
        "cars_test/, cars_test_annos_withlabels.mat (beside devkit/ or in it; or all under stanford_cars/)",
        ("stanford_cars",), ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_train/", "cars_test/",
                             f"{CARS_TEST_ANNOS}|devkit/{CARS_TEST_ANNOS}"), read_cars),
    "food101": _layout(
        "the official Food-101 files: food-101/images/<dish>/*.jpg, food-101/meta/train.json and test.json",
        ("food-101",), ("images/", "meta/train.json", "meta/test.json"), read_food101),
    "caltech101": _layout(
        "the official Caltech-101 folders: 101_ObjectCategories/<class>/*.jpg, BACKGROUND_Google included (or "
        "under caltech101/, torchvision's download folder)", ("caltech101", "caltech-101"),
        ("101_ObjectCategories/",), read_caltech101),
    # SUN397's partition files may sit in several places (_find_sun397): no required list, so no partial hint.
    "sun397": OfficialLayout(
        "the official SUN397 files: SUN397/<letter>/<class>/sun_*.jpg and ClassName.txt, with Partitions/"
        "Training_01.txt and Testing_01.txt (in SUN397/, beside it, or in DATA_DIR)", _find_sun397, read_sun397),
}
