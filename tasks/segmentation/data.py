"""Semantic-segmentation data sets on disk: Pascal VOC 2012 (+ SBD) and ADE20K SceneParsing.

A layout lists the (image, label) pairs of a split, reads a label file into class indices (``uint8``,
``IGNORE`` = 255 for pixels that are not scored) and names the classes. Every split is scanned before
any model work: missing files, unreadable headers and images whose label has another size are skipped
and counted, and above ``max_bad_fraction`` the run stops naming examples. The evaluation split is
decoded completely (label values included), so a damaged test file never stops or skews the score.
detectron2 is imported only by :func:`register_split`.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from transfer.errors import DataError
from transfer.images import ImageDecodeError, ImageTooLargeError, decode_image, oriented_size
from transfer.registry import Registry

log = logging.getLogger(__name__)
IGNORE = 255  # label value of pixels that are not scored (VOC object borders, ADE20K "other")

# Pascal VOC class order: background, then detectron2's (and the devkit's) 20 object classes.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

VOC_LAYOUT = """\
<data_dir>/VOCdevkit/VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClass/<id>.png            index PNG (palette): 0 background, 1-20 classes, 255 = not scored
  ImageSets/Segmentation/train.txt      one image id per line (1,464 ids); val.txt (1,449 ids)
  SegmentationClassAug/<id>.png         optional: SBD-augmented masks as index PNGs (train_aug set)
  ImageSets/Segmentation/train_aug.txt  optional: the 10,582 train_aug ids
<data_dir>/benchmark_RELEASE/dataset/   optional: SBD as released (Hariharan et al. 2011)
  cls/<id>.mat                          MATLAB struct GTcls with field Segmentation (0-20)
  img/<id>.jpg, train.txt, val.txt"""

ADE20K_LAYOUT = """\
<data_dir>/ADEChallengeData2016/        (or data_dir is that folder itself)
  images/training/ADE_train_<n>.jpg       and images/validation/ADE_val_<n>.jpg
  annotations/training/ADE_train_<n>.png  greyscale PNG: 0 = other (not scored), 1-150 = classes"""


@dataclass(frozen=True)
class Pair:
    """One labelled image: file paths and size (height, width) in pixels."""

    image: str
    label: str
    height: int
    width: int


@dataclass
class SplitList:
    """The usable pairs of one split after the scan, and what the scan skipped."""

    name: str
    pairs: list[Pair]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: list[str] = field(default_factory=list)
    note: str = ""  # e.g. which training set "auto" resolved to

    def counts(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/images": len(self.pairs), **{f"{prefix}/{k}": v for k, v in self.skipped.items()}}


@dataclass(frozen=True)
class SegmentationLayout:
    """How to find the splits of one data set family and read its labels."""

    name: str
    tree: str  # the expected layout, shown in every error
    classes: Callable[[], tuple[str, ...]]  # class names in label order (ADE20K's are read from detectron2)
    list_split: Callable[[Path, str], tuple[list[tuple[str, str]], str]]  # -> ((image, label) paths, note)
    read_label: Callable[[str], np.ndarray]  # label file -> (H, W) uint8 class indices, IGNORE not scored
    # The training set of the published protocol (a split that resolves to another is marked not comparable).
    published_train: str = ""


LAYOUTS: Registry[SegmentationLayout] = Registry("segmentation data set layout")


def _check_values(label: np.ndarray, valid: int, path: str, meaning: str, *, ignore: bool) -> np.ndarray:
    """``label`` when its values are 0..``valid`` (and :data:`IGNORE` where ``ignore``: the file's own value
    for pixels not scored); else DataError naming the file and the values found."""
    outside = label > valid
    if ignore:
        outside &= label != IGNORE
    bad = np.unique(label[outside]) if label.size else np.array([])
    if bad.size:
        raise DataError(f"label file {path!r} has values {bad[:10].tolist()}; {meaning}")
    return label


def check_targets(label: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    """The training/evaluation guard: ``label`` (H, W) as the model and evaluator take it, classes
    0..``num_classes``-1 and :data:`IGNORE`. Any other value (a layout's reader letting one through) raises
    DataError naming the file, instead of becoming a phantom class or an index past the logits."""
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE)]) if label.size else np.array([])
    if bad.size or (label.size and label.min() < 0):
        found = sorted(set(bad.tolist()) | set(np.unique(label[label < 0]).tolist()))
        raise DataError(f"label file {path!r} gives targets {found[:10]} after reading, outside classes "
                        f"0-{num_classes - 1} and {IGNORE} (not scored); the file or its layout reader is wrong.")
    return label


def read_targets(layout: SegmentationLayout, path: str, num_classes: int) -> np.ndarray:
    """``layout.read_label(path)`` checked by :func:`check_targets`: what training and evaluation read."""
    return check_targets(layout.read_label(path), num_classes, path)


def _read_index_png(path: str, what: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise DataError(f"label file {path!r} is a {im.mode} image; {what} labels are index PNGs (palette or "
                            "greyscale) whose pixel values are class numbers, not colours.")
        return np.array(im, dtype=np.uint8)


# ---- Pascal VOC 2012 (+ SBD) ------------------------------------------------------------------------------

VOC_SPLITS = ("train", "val", "trainval", "train_aug", "auto")


def read_voc_label(path: str) -> np.ndarray:
    """A VOC ``SegmentationClass(Aug)`` index PNG or an SBD ``cls/*.mat`` -> (H, W) uint8 in 0-20 or 255."""
    if path.endswith(".mat"):
        from scipy.io import loadmat

        try:
            label = np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise DataError(f"SBD label file {path!r} has no GTcls.Segmentation ({type(e).__name__}: {e}); "
                            "the SBD release stores each mask as a MATLAB struct GTcls.") from None
    else:
        label = _read_index_png(path, "Pascal VOC")
    return _check_values(label, len(VOC_CLASSES) - 1, path, "Pascal VOC labels are 0-20 and 255 (not scored).",
                         ignore=True)


def _read_ids(path: Path) -> list[str]:
    """Image ids, one per line; DeepLab-style lines ("/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png") too."""
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def _voc_split(data_dir: Path, split: str) -> tuple[list[tuple[str, str]], str]:
    if split not in VOC_SPLITS:
        raise DataError(f"Pascal VOC split {split!r}; valid: {', '.join(VOC_SPLITS)} (auto = train_aug when the SBD "
                        "masks are present, else train).")
    voc = data_dir / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sbd = data_dir / "benchmark_RELEASE" / "dataset"
    required = [voc / "JPEGImages", voc / "SegmentationClass", sets / "val.txt"]
    if split != "val":
        required.append(sets / "train.txt")
    missing = [str(p) for p in required if not p.exists()]
    if missing:
        raise DataError(f"task.data_dir={str(data_dir)!r} is missing {', '.join(missing)}. Expected layout:\n"
                        f"{VOC_LAYOUT}")
    has_aug = (voc / "SegmentationClassAug").is_dir() or (sbd / "cls").is_dir()
    note = split
    if split == "auto":
        split = "train_aug" if has_aug else "train"
        note = split if has_aug else ("train (1,464 VOC images: neither SegmentationClassAug/ nor the SBD "
                                      "release was found, so the 10,582-image train_aug set is not used)")
        if not has_aug:
            log.warning("task.train_split=auto: no SBD masks under %s; training on VOC2012 train only", data_dir)
    if split == "train_aug" and not has_aug:
        raise DataError(f"task.train_split=train_aug needs the SBD masks: VOC2012/SegmentationClassAug/ or "
                        f"benchmark_RELEASE/dataset/cls/ under {str(data_dir)!r}. Expected layout:\n{VOC_LAYOUT}")
    if split == "trainval":
        ids = _read_ids(sets / "train.txt") + _read_ids(sets / "val.txt")
    elif split == "train_aug":
        listed = sets / "train_aug.txt"
        if listed.exists():
            ids = _read_ids(listed)
        else:  # the usual definition: VOC train + SBD train + SBD val, minus every VOC val image
            val = set(_read_ids(sets / "val.txt"))
            extra = [i for f in ("train.txt", "val.txt") if (sbd / f).exists() for i in _read_ids(sbd / f)]
            extra += sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png"))
            ids = [i for i in dict.fromkeys(_read_ids(sets / "train.txt") + extra) if i not in val]
    else:
        ids = _read_ids(sets / f"{split}.txt")
    pairs = []
    for i in ids:
        image = voc / "JPEGImages" / f"{i}.jpg"
        if not image.exists() and (sbd / "img" / f"{i}.jpg").exists():
            image = sbd / "img" / f"{i}.jpg"
        # VOC's own masks (with their 255 borders) first, then the SBD ones.
        candidates = [voc / "SegmentationClass" / f"{i}.png", voc / "SegmentationClassAug" / f"{i}.png",
                      sbd / "cls" / f"{i}.mat"]
        label = next((c for c in candidates if c.exists()), candidates[0])
        pairs.append((str(image), str(label)))
    return pairs, note


LAYOUTS.add("voc2012", SegmentationLayout("voc2012", VOC_LAYOUT, lambda: VOC_CLASSES, _voc_split,
                                                 read_voc_label, published_train="train_aug"))  # BYOL App. D.4


# ---- ADE20K SceneParsing ----------------------------------------------------------------------------------

def _ade_root(data_dir: Path) -> Path:
    nested = data_dir / "ADEChallengeData2016"
    return nested if nested.is_dir() or not (data_dir / "images").is_dir() else data_dir


def read_ade20k_label(path: str) -> np.ndarray:
    """An ADE20K annotation PNG (0 = other, 1-150) -> (H, W) uint8 with classes 0-149 and 255 for "other".

    The shift by one is the benchmark's own rule (class 0 is not scored); detectron2's
    ``prepare_ade20k_sem_seg.py`` and mmsegmentation's ``reduce_zero_label`` apply the same mapping.
    Values above 150, 255 included (it is no "not scored" value in these files), raise DataError: shifted
    by one, 255 would become a class 254 that does not exist.
    """
    label = _read_index_png(path, "ADE20K")
    _check_values(label, 150, path, "ADE20K annotations are 0 (other) to 150; 255 is no valid value in them "
                  "(is this a file converted for another tool, already shifted by one?).", ignore=False)
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 -> 255 (not scored), k -> k - 1


def _ade_split(data_dir: Path, split: str) -> tuple[list[tuple[str, str]], str]:
    root = _ade_root(data_dir)
    images, labels = root / "images" / split, root / "annotations" / split
    missing = [str(p) for p in (images, labels) if not p.is_dir()]
    if missing:
        raise DataError(f"task.data_dir={str(data_dir)!r} is missing {', '.join(missing)} (split {split!r}; the "
                        f"release has 'training' and 'validation'). Expected layout:\n{ADE20K_LAYOUT}")
    stems = sorted(p.stem for p in images.glob("*.jpg"))
    return [(str(images / f"{s}.jpg"), str(labels / f"{s}.png")) for s in stems], split


def _ade_classes() -> tuple[str, ...]:
    # The 150 SceneParsing classes in label order, as detectron2 lists them (data/datasets/builtin_meta.py).
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    return tuple(c.strip() for c in ADE20K_SEM_SEG_CATEGORIES)


LAYOUTS.add("ade20k", SegmentationLayout("ade20k", ADE20K_LAYOUT, _ade_classes, _ade_split, read_ade20k_label,
                                        published_train="training"))


def layout_classes(layout: SegmentationLayout) -> tuple[str, ...]:
    """The class names of ``layout`` in label order."""
    return layout.classes()


# ---- scanning ---------------------------------------------------------------------------------------------

def _size(path: str, *, image: bool = False) -> tuple[int, int]:
    """(height, width) from the header; raises OSError/ValueError when the header does not parse.

    ``image``: the size of the input as :func:`transfer.images.decode_image` gives it, EXIF orientation
    applied (labels are read as stored)."""
    if path.endswith(".mat"):  # SBD masks are small: the size comes from the decoded label
        label = read_voc_label(path)
        return label.shape[0], label.shape[1]
    with Image.open(path) as im:
        im.verify()
    if image:
        width, height = oriented_size(path)
        return height, width
    with Image.open(path) as im:
        return im.height, im.width


def scan_split(layout: SegmentationLayout, data_dir: Path, split: str, *, decode: bool,
               max_bad_fraction: float, limit: int | None = None, num_classes: int | None = None) -> SplitList:
    """List and check the pairs of ``split``; ``decode`` also reads every pixel (the evaluation split), and with
    ``num_classes`` checks the targets too (:func:`check_targets`).

    Raises :class:`DataError` when the split is empty or more than ``max_bad_fraction`` of it is damaged.
    """
    listed, note = layout.list_split(data_dir, split)
    if limit is not None:
        listed = listed[:limit]
    if not listed:
        raise DataError(f"split {split!r} under {str(data_dir)!r} lists no images. Expected layout:\n{layout.tree}")
    out = SplitList(split, [], {"missing": 0, "unreadable": 0, "size_mismatch": 0}, note=note)
    for image, label in tqdm(listed, desc=f"scan {split}", unit="img", leave=False, mininterval=2.0):
        reason = None
        if not (Path(image).exists() and Path(label).exists()):
            reason = "missing"
        else:
            try:
                (h, w), (lh, lw) = _size(image, image=True), _size(label)
                if decode:
                    decode_image(image)
                    check_targets(layout.read_label(label), num_classes, label) if num_classes else \
                        layout.read_label(label)
                if (h, w) != (lh, lw):
                    reason = "size_mismatch"
            except ImageTooLargeError:
                raise  # not damaged: the error names the limit
            except ImageDecodeError as e:
                reason = "unreadable"
                out.examples.append(f"{image} / {label}: {e.reason}")
            except DataError as e:  # a label in the wrong format: every file of the copy is likely affected
                raise DataError(f"{e} Expected layout:\n{layout.tree}") from None
            except (OSError, ValueError, SyntaxError, NotImplementedError) as e:  # PIL / scipy on damaged files
                reason = "unreadable"
                out.examples.append(f"{image} / {label}: {type(e).__name__}: {e}")
        if reason is None:
            out.pairs.append(Pair(image, label, h, w))
        else:
            out.skipped[reason] += 1
            if reason != "unreadable":
                out.examples.append(f"{image} ({reason})")
    bad = sum(out.skipped.values())
    if bad:
        log.warning("split %s: skipped %d of %d images (%s), e.g. %s", split, bad, len(listed), out.skipped,
                    out.examples[:3])
    if bad > max_bad_fraction * len(listed) or not out.pairs:
        raise DataError(f"split {split!r} under {str(data_dir)!r}: {bad} of {len(listed)} images are missing, "
                        f"unreadable or differ in size from their label ({out.skipped}), more than "
                        f"task.max_bad_fraction={max_bad_fraction}; e.g. {out.examples[:3]}. Expected layout:\n"
                        f"{layout.tree}")
    return out


def register_split(layout: SegmentationLayout, data_dir: Path, listed: SplitList, classes: Sequence[str]) -> str:
    """Register ``listed`` with detectron2's catalogs (once per process); returns its catalog name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    key = "|".join(f"{p.image}:{p.label}" for p in listed.pairs)
    digest = hashlib.sha1(f"{Path(data_dir).resolve()}|{key}".encode()).hexdigest()[:8]
    name = f"transfer_semseg_{layout.name}_{listed.name}_{digest}"
    if name not in DatasetCatalog.list():
        records = [{"file_name": p.image, "sem_seg_file_name": p.label, "height": p.height, "width": p.width,
                    "image_id": i} for i, p in enumerate(listed.pairs)]
        DatasetCatalog.register(name, lambda records=records: records)
        MetadataCatalog.get(name).set(stuff_classes=list(classes), ignore_label=IGNORE, evaluator_type="sem_seg",
                                      transfer_layout=layout.name)
    return name
