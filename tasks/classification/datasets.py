"""Classification data sets: a registry of builders that return fixed train/val/test splits."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.official import OFFICIAL_LAYOUTS, OfficialLayout
from tasks.classification.splits import PUBLISHED_SPLITS, FoundSizes, SplitSizes, check_split_sizes
from transfer.errors import DataError
from transfer.image_sources import (
    ArrayImages,
    Source,
    check_damage,
    labels_of,
    load_source,
    with_local_identity,
)
from transfer.images import MARKERS, Undecodable
from transfer.registry import Registry

log = logging.getLogger(__name__)


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
    # Why scores on these splits cannot stand next to published numbers (a subset, other split sizes);
    # the adapter records them as results.json extra.not_comparable.
    not_comparable: list[str] = field(default_factory=list)
    # digest of the data read (transfer.image_sources.Source.identity): part of the feature cache key
    source_id: str = ""
    label_column: str = ""  # where the labels came from: part of the feature cache key
    skipped_examples: list[str] = field(default_factory=list)  # names of a few images the scan skipped


DATASETS: Registry[Callable[[ClassificationTaskConfig], Splits]] = Registry("dataset")


class Transformed(Dataset):
    """Apply an image transform to a split: items become ``(Tensor (3, H, W), label)``."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Undecodable, int]:
        image, label = self.base[i]
        return (image if isinstance(image, MARKERS) else self.transform(image)), label


def hold_out(train: Dataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Split ``train`` into (train, val) with a seeded permutation, the same on every run."""
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(fraction * len(train))))
    return Subset(train, sorted(order[n_val:].tolist())), Subset(train, sorted(order[:n_val].tolist()))


def limit(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """``n`` items of ``ds`` (all when ``n`` is None or not smaller), stratified by label and seeded.

    Each class keeps its share of the ``n`` (largest remainder: ``n * count / len(ds)`` rounded so the shares
    add up to ``n``, the rounding ties broken by a draw from ``seed``); within a class the items kept are a
    seeded random draw. On class-sorted data the subset still spans the classes in their proportions. The
    items keep their order in ``ds``.
    """
    if n is None or n >= len(ds):
        return ds
    labels = labels_of(ds)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = n * counts / len(labels)
    quota = np.floor(share).astype(np.int64)
    remainder_order = np.lexsort((rng.random(len(classes)), -(share - quota)))  # largest remainder first
    quota[remainder_order[:n - int(quota.sum())]] += 1
    keep = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return Subset(ds, sorted(np.concatenate(keep).tolist()))


def limit_reason(n: int | None, seed: int = 0) -> list[str]:
    """``task.limit_per_split`` scores a subset: never comparable with a number measured on the whole split."""
    return [] if n is None else [f"task.limit_per_split={n}: a stratified sample of {n} images of each split "
                                 f"(seed task.split_seed={seed}) is used"]


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
    pick = lambda idx: limit(Subset(full, sorted(idx.tolist())), cfg.limit_per_split, cfg.split_seed)  # noqa: E731
    source_id = hashlib.sha256(images.tobytes() + np.asarray(digits.target, dtype=np.int64).tobytes()).hexdigest()
    return Splits(train=pick(train), val=pick(val), test=pick(test), num_classes=10,
                  class_names=[str(i) for i in range(10)],
                  not_comparable=limit_reason(cfg.limit_per_split, cfg.split_seed),
                  source_id=source_id, label_column="target")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a transfer data set comes from and how its source splits map to train / val / test.

    Split names are candidates, first match wins; when no validation split exists, ``val_fraction`` of
    train is held out with a fixed seed (ssl-transfer ``linear.py`` ``get_train_valid_loader``: 20 %, seed 0).
    ``sizes`` are the published split sizes, checked on every load (:mod:`tasks.classification.splits`);
    ``official`` reads a local copy in the data set's official release layout (:mod:`tasks.classification.official`).
    """

    hub_id: str | None
    image_column: str = "image"
    label_column: str = "label"
    train: tuple[str, ...] = ("train",)
    val: tuple[str, ...] = ("validation", "val", "valid")
    test: tuple[str, ...] = ("test",)
    num_classes: int | None = None
    sizes: SplitSizes | None = None
    official: OfficialLayout | None = None


def _pick(source: Source, candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if name in source.splits), None)


def build_from_spec(spec: DatasetSpec, cfg: ClassificationTaskConfig) -> Splits:
    """Fixed train/val/test splits of a registered data set, read from ``cfg.data_dir`` or the Hub.

    Raises :class:`DataError` when the splits' sizes differ from the published ones (``spec.sizes``) and
    ``cfg.check_split_sizes`` is true.
    """
    source = _read(spec, cfg)
    train_name, test_name = _pick(source, spec.train), _pick(source, spec.test)
    if train_name is None or test_name is None:
        raise DataError(f"{source.origin}: needs a train split (one of {list(spec.train)}) and a test split "
                        f"(one of {list(spec.test)}); found {sorted(source.splits)}.")
    val_name = _pick(source, spec.val)
    _check_damage(source, cfg.max_bad_fraction)
    num_classes = len(source.class_names)
    for name, split in source.splits.items():
        if len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise DataError(f"{source.origin}: split {name!r} has labels outside [0, {num_classes}); "
                            f"check task.label_column.")
    if spec.num_classes is not None and num_classes != spec.num_classes:
        log.warning("%s: %d classes, the published data set has %d", source.origin, num_classes, spec.num_classes)
    not_comparable = limit_reason(cfg.limit_per_split, cfg.split_seed)
    if spec.sizes is not None:
        size = lambda name: len(source.splits[name].labels) + source.splits[name].skipped  # noqa: E731
        training = [source.splits[n] for n in (train_name, val_name) if n]
        per_class = np.bincount(np.concatenate([s.labels for s in training]), minlength=num_classes)
        found = FoundSizes(train=size(train_name), test=size(test_name), val=size(val_name) if val_name else None,
                           per_class=(int(per_class.min()), int(per_class.max())) if per_class.size else None,
                           train_skipped=sum(s.skipped for s in training))
        not_comparable += check_split_sizes(cfg.name, spec.sizes, found, origin=source.origin,
                                            enforce=cfg.check_split_sizes)
    train = source.splits[train_name].dataset
    if val_name is None:
        train, val = hold_out(train, cfg.val_fraction, cfg.split_seed)
    else:
        val = source.splits[val_name].dataset
    counts = {"skipped_images": sum(s.skipped for s in source.splits.values())}
    cut = lambda ds: limit(ds, cfg.limit_per_split, cfg.split_seed)  # noqa: E731
    splits = Splits(train=cut(train), val=cut(val), test=cut(source.splits[test_name].dataset), num_classes=num_classes,
                    class_names=source.class_names, val_held_out=val_name is None, counts=counts,
                    not_comparable=not_comparable, source_id=source.identity, label_column=source.label_column,
                    skipped_examples=[e for s in source.splits.values() for e in s.skipped_examples][:5])
    counts.update({f"images_{k}": len(getattr(splits, k)) for k in ("train", "val", "test")})
    return splits


def _read(spec: DatasetSpec, cfg: ClassificationTaskConfig) -> Source:
    """The data set's official release layout when ``task.data_dir`` holds it, else a generic layout or the Hub.

    Every local copy, whatever its layout, leaves through :func:`transfer.image_sources.with_local_identity`: the
    feature cache key covers every file read. A folder in no layout is refused naming what it holds: part of this
    data set's official layout (the files missing), or another data set's official layout (``did you mean task=X``).
    """
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else None
    official = spec.official
    if root is not None and official is not None and root.is_dir():
        where = official.find(root)
        if where is not None:
            log.info("%s: reading %s", cfg.name, official.describe.split(":")[0])
            source = official.read(where, scan=cfg.scan_images, max_pixels=cfg.max_image_pixels, seed=cfg.split_seed)
            return with_local_identity(source, root)
    hints = []
    if root is not None and root.is_dir():
        partial = official.partial(root) if official is not None else None
        if partial is not None:  # a partial official copy: say what is missing
            present, missing = partial
            hints.append(f"It holds {', '.join(present)} of {cfg.dataset}'s official layout but not "
                         f"{', '.join(missing)}, which that layout needs.")
        # another data set's release: say which, rather than only "no layout"
        other = [name for name, s in SPECS.items() if s.official is not None and name != cfg.dataset
                 and s.official.find(root) is not None]
        if other:
            hints.append(f"It holds the official layout of {' / '.join(other)}: did you mean task={other[0]}?")
    source = load_source(data_dir=cfg.data_dir, hub_id=cfg.hub_id or spec.hub_id,
                         image_column=cfg.image_column or spec.image_column,
                         label_column=cfg.label_column or spec.label_column, scan=cfg.scan_images,
                         max_pixels=cfg.max_image_pixels, official=[official.describe] if official else [],
                         hint=" ".join(hints))
    return with_local_identity(source, root) if root is not None else source


def _check_damage(source: Source, max_bad_fraction: float) -> None:
    skipped = sum(s.skipped for s in source.splits.values())
    total = skipped + sum(len(s.labels) for s in source.splits.values())
    examples = [e for s in source.splits.values() for e in s.skipped_examples][:5]
    check_damage(bad=skipped, total=total, examples=examples, max_bad_fraction=max_bad_fraction,
                 origin=source.origin)


# The many-shot transfer suite of SimCLR (arXiv 2002.05709, Appendix B.8) and BYOL (arXiv 2006.07733,
# Appendix D.2). Hub ids and column names as checked for each recipe (recipes/task/<name>.yaml says how);
# published split sizes in tasks/classification/splits.py (BYOL App. D.1, Table 10).
_SPECS = {
    "cifar10": DatasetSpec("uoft-cs/cifar10", image_column="img", num_classes=10),
    "cifar100": DatasetSpec("uoft-cs/cifar100", image_column="img", label_column="fine_label", num_classes=100),
    # The Hub copy names the official 25,250-image test set "validation".
    "food101": DatasetSpec("ethz/food101", val=(), test=("test", "validation"), num_classes=101),
    # This Hub copy has the official 1,020 / 1,020 / 6,149 splits (its dataset viewer lists train 1.02k,
    # validation 1.02k, test 6.15k); nelorth/oxford-flowers, used before, has 7,169 / 1,020 and no val.
    "flowers102": DatasetSpec("dpdl-benchmark/oxford_flowers102", num_classes=102),
    "oxford_pets": DatasetSpec("timm/oxford-iiit-pet", num_classes=37),
    "dtd": DatasetSpec("tanganke/dtd", num_classes=47),
    "stanford_cars": DatasetSpec("tanganke/stanford_cars", num_classes=196),
    "fgvc_aircraft": DatasetSpec("HuggingFaceM4/FGVC-Aircraft", label_column="variant", num_classes=100),
    "caltech101": DatasetSpec("dpdl-benchmark/caltech101"),
    "sun397": DatasetSpec("tanganke/sun397", num_classes=397),
    "birdsnap": DatasetSpec(None, num_classes=500),
}
SPECS = {name: dataclasses.replace(spec, sizes=PUBLISHED_SPLITS.get(name), official=OFFICIAL_LAYOUTS.get(name))
         for name, spec in _SPECS.items()}
for _name, _spec in SPECS.items():
    DATASETS.add(_name, functools.partial(build_from_spec, _spec))
