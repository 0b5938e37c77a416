"""Published split sizes of the many-shot transfer sets, checked whenever a copy is loaded; Flowers-102's
official split files.

A score stands next to a published number only when it was measured on the same images. Every data set
below has the train / val / test sizes its transfer protocol used; a copy whose splits differ (the common
Hub copy of Flowers-102 puts official test images in train) stops the run with a :class:`DataError` that
names the sizes found, the published ones and the opt-out, ``task.check_split_sizes=false``. A run that
opted out, or that keeps only ``task.limit_per_split`` images, is marked not comparable in results.json.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import Flowers102

from tasks.classification.sources import OfficialLayout, Source, scan_files
from transfer.errors import DataError

log = logging.getLogger(__name__)

# The one table that lists, for the SimCLR / BYOL transfer suite, the original train, the train / valid
# split and the test sizes: BYOL (arXiv 2006.07733) Appendix D.1, Table 10, read from the ar5iv copy
# https://ar5iv.labs.arxiv.org/html/2006.07733. BYOL uses "the same set of datasets as [SimCLR]" with the
# official validation splits of Aircraft, DTD and Flowers (App. D.1 text); SimCLR App. B.8 describes the same.
BYOL_TABLE_10 = "BYOL (arXiv 2006.07733) App. D.1, Table 10"


@dataclass(frozen=True)
class SplitSizes:
    """Published image counts of one data set's splits.

    ``train`` is the published training set: the official train split when ``val`` is given (an official
    validation split the protocol selects hyper-parameters on), else the whole original training set, of
    which the suite holds out ``task.val_fraction`` for selection (the final fit uses all of it).
    """

    train: int
    test: int
    val: int | None = None
    train_per_class: int | None = None  # every class has exactly this many training (train+val) images
    source: str = BYOL_TABLE_10
    where: str = ""  # how to get a copy with these splits, for the error message


# Counts from BYOL Table 10 ("Original train examples", "Valid. examples" where the dataset ships one,
# "Test examples"). The column values quoted in comments where Table 10 splits them further.
PUBLISHED_SPLITS: dict[str, SplitSizes] = {
    "food101": SplitSizes(75_750, 25_250),
    "cifar10": SplitSizes(50_000, 10_000),
    "cifar100": SplitSizes(50_000, 10_000),
    # Birdsnap is distributed as image URLs; 47,386 / 2,443 are the images SimCLR/BYOL could download.
    "birdsnap": SplitSizes(47_386, 2_443, where="Birdsnap is a list of URLs, many dead: a copy with other "
                                               "sizes cannot reproduce the published test set."),
    "sun397": SplitSizes(19_850, 19_850, where="SUN397 split 1 (Partitions/Training_01.txt, Testing_01.txt: "
                                               "50 + 50 images per class)."),
    "stanford_cars": SplitSizes(8_144, 8_041),
    "fgvc_aircraft": SplitSizes(3_334, 3_333, val=3_333, where="FGVC-Aircraft 2013b: images_variant_train.txt, "
                                                               "_val.txt and _test.txt."),
    "dtd": SplitSizes(1_880, 1_880, val=1_880, where="DTD split 1: labels/train1.txt, val1.txt, test1.txt."),
    "oxford_pets": SplitSizes(3_680, 3_669, where="Oxford-IIIT Pet: annotations/trainval.txt and test.txt."),
    # 3,060 = 30 training images per class x 102 classes (101 + background); the remaining 6,084 are test.
    "caltech101": SplitSizes(3_060, 6_084, train_per_class=30,
                             where="Caltech-101 with 30 training images per class and the rest as test (SimCLR "
                                   "App. B.8; the ssl-transfer repository ships such a split, caltech101-splits/)."),
    "flowers102": SplitSizes(1_020, 6_149, val=1_020,
                             where="the official files: task.data_dir=PATH holding setid.mat, imagelabels.mat "
                                   "and jpg/ from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, or the default "
                                   "Hub copy with the official splits, dpdl-benchmark/oxford_flowers102."),
}


@dataclass(frozen=True)
class FoundSizes:
    """Images in each source split of a copy, counting the unreadable ones the scan skipped."""

    train: int
    test: int
    val: int | None = None  # None: the copy has no validation split
    # Fewest and most readable training (train+val) images of a class, and how many training images were
    # unreadable (their class is unknown): checked against SplitSizes.train_per_class.
    per_class: tuple[int, int] | None = None
    train_skipped: int = 0


def size_differences(expected: SplitSizes, found: FoundSizes) -> list[str]:
    """Each split whose size differs, as ``"train 7,169 (published 1,020)"``; empty when they match.

    Without a published val the copy's own train+val, if it has a val split, must make up the published
    training set: the final fit uses train+val, so the images scored and trained on are the same.
    """
    out = []
    if expected.val is None:
        total = found.train + (found.val or 0)
        if total != expected.train:
            out.append(f"{'train+val' if found.val is not None else 'train'} {total:,} (published {expected.train:,})")
    else:
        if found.train != expected.train:
            out.append(f"train {found.train:,} (published {expected.train:,})")
        if found.val != expected.val:
            out.append(f"val {'none' if found.val is None else f'{found.val:,}'} (published {expected.val:,})")
    if found.test != expected.test:
        out.append(f"test {found.test:,} (published {expected.test:,})")
    if expected.train_per_class is not None and found.per_class is not None:
        fewest, most = found.per_class
        # An unreadable image lowers its (unknown) class's count: allow that many missing, never more.
        if most != expected.train_per_class or fewest < expected.train_per_class - found.train_skipped:
            out.append(f"{fewest}-{most} training images per class (published {expected.train_per_class})")
    return out


def check_split_sizes(task: str, expected: SplitSizes, found: FoundSizes, *, origin: str, enforce: bool) -> list[str]:
    """Compare a copy's split sizes with the published ones.

    Returns the reasons this run is not comparable (empty when the sizes match). A mismatch raises
    :class:`DataError` unless ``enforce`` is False (``task.check_split_sizes=false``); then it is logged
    and returned as a reason.
    """
    differences = size_differences(expected, found)
    if not differences:
        return []
    where = f" Get {expected.where}" if expected.where else ""
    if enforce:
        raise DataError(f"{task}: the copy {origin} has other splits than the published protocol: "
                        f"{'; '.join(differences)} (published sizes: {expected.source}).{where} Scores on other "
                        f"splits cannot stand next to published numbers. To run anyway, pass "
                        f"task.check_split_sizes=false; the run is then marked not comparable.")
    reason = (f"task.check_split_sizes=false: {task} copy {origin} differs from the published splits: "
              f"{'; '.join(differences)} ({expected.source})")
    log.warning("not comparable: %s", reason)
    return [reason]


# --- Flowers-102 from its official files ---------------------------------------------------------------------

FLOWERS_FILES = ("setid.mat", "imagelabels.mat", "jpg")
# The suite's split names for torchvision's: train / val / test read from setid.mat's trnid / valid / tstid.
FLOWERS_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class _LocalFlowers102(Flowers102):
    """torchvision's Flowers-102 reader on a local copy, never downloading.

    torchvision looks in ``root/flowers-102`` and accepts the two ``.mat`` files only with the md5 of the
    official download; here the files may also sit in ``root`` itself (the official tarball unpacked), and a
    re-saved but equal ``setid.mat`` is accepted: the published split sizes are checked on the result instead.
    """

    def _check_integrity(self) -> bool:
        # Called by torchvision's __init__ before it reads the .mat files from self._base_folder.
        for base in (Path(self._base_folder), Path(self.root)):
            if all((base / f).exists() for f in FLOWERS_FILES):
                self._base_folder, self._images_folder = base, base / "jpg"
                return True
        return False


def find_flowers102(root: Path) -> Path | None:
    """``root`` or ``root/flowers-102`` when it holds every official file, else None."""
    return next((base for base in (root, root / "flowers-102") if all((base / f).exists() for f in FLOWERS_FILES)),
                None)


def has_flowers102_files(root: Path) -> bool:
    return find_flowers102(root) is not None


def flowers102_official(root: Path, scan: bool = True, *, max_pixels: int | None = None, seed: int = 0) -> Source:
    """The official Flowers-102 splits (train 1,020 / val 1,020 / test 6,149) from ``setid.mat``.

    ``root`` holds ``setid.mat``, ``imagelabels.mat`` and ``jpg/image_NNNNN.jpg`` (the official download),
    directly or under ``root/flowers-102`` (torchvision's layout). Images are scanned and decoded under
    ``max_pixels`` (``task.max_image_pixels``). Raises :class:`DataError` for unreadable ``.mat`` files.
    """
    splits, base = {}, find_flowers102(root) or root
    for ours, theirs in FLOWERS_SPLITS.items():
        try:
            ds = _LocalFlowers102(str(root), split=theirs)
        except Exception as e:  # noqa: BLE001 - scipy raises many types for a damaged .mat file
            raise DataError(f"{root}: cannot read the Flowers-102 split files setid.mat / imagelabels.mat "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Re-download "
                            "them from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/.") from None
        # torchvision keeps the file list private; it is the one attribute read here (torchvision 0.29).
        splits[ours] = scan_files(ds._image_files, ds._labels, split=ours, scan=scan, max_pixels=max_pixels)
    return Source(splits, list(Flowers102.classes), f"{root} (official Flowers-102 files)",
                  files=[base / "setid.mat", base / "imagelabels.mat"])


FLOWERS102_LAYOUT = OfficialLayout(
    "Flowers-102's official files: DATA_DIR/jpg/image_NNNNN.jpg, DATA_DIR/imagelabels.mat and DATA_DIR/setid.mat "
    "(or under DATA_DIR/flowers-102/, torchvision's download folder), from "
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/;", find_flowers102, flowers102_official,
    required=("jpg/", "imagelabels.mat", "setid.mat"))
