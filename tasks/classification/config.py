"""Typed settings of a classification task recipe (recipes/task/<name>.yaml) and :func:`check`, the checks of the
whole run config that the classification adapter makes before any run directory exists."""
from __future__ import annotations

from dataclasses import dataclass

from transfer.data_settings import check_data_settings, check_directory
from transfer.errors import ConfigError

METRICS = ("top1", "mean_per_class")
FROZEN = ("linear", "knn")  # the frozen-feature protocols
# auto: "paper" for linear and k-NN on the data sets of the SimCLR / BYOL / ssl-transfer tables, else "checkpoint".
PREPROCESS = ("auto", "paper", "checkpoint")


@dataclass
class ClassificationTaskConfig:
    name: str
    dataset: str  # a DATASETS registry key
    adapter: str = "classification"
    metric: str = "top1"  # what the SimCLR/BYOL transfer tables report for this data set
    # local copy: the data set's official release files (CIFAR pickles, Flowers .mat, split lists …), a save_to_disk
    # folder, parquet files or an ImageFolder tree (docs/classification.md)
    data_dir: str | None = None
    hub_id: str | None = None  # Hugging Face Hub data set id, used when data_dir is not given (default: the registry's)
    image_column: str | None = None  # default: the registry's; else the one Image column
    label_column: str | None = None  # default: the registry's; else the one ClassLabel column
    scan_images: bool = True  # check every image header first; unreadable ones are skipped and counted
    resolution: int | None = None  # default: the backbone checkpoint's own resolution
    val_fraction: float = 0.2  # held out of train (seeded) where the data set has no validation split
    split_seed: int = 0  # seeds the held-out val, task.limit_per_split's sample and Caltech-101's 30-per-class draw
    max_bad_fraction: float = 0.01  # unreadable images above this fraction stop the run
    # quick checks: keep N images of each split, a sample stratified by class and seeded by split_seed (the run is
    # marked not comparable)
    limit_per_split: int | None = None
    # Stop when the copy's split sizes differ from the published ones (tasks/classification/splits.py);
    # false runs anyway and marks the run not comparable.
    check_split_sizes: bool = True
    # Evaluation preprocessing of linear / k-NN: "paper" resizes the shorter side to 224 (task.resolution when
    # set, bicubic) and centre-crops it, as SimCLR App. B.8, BYOL App. D.2 and ssl-transfer linear.py do;
    # "checkpoint" uses the weights' own resolution and crop; "auto" (docs/classification.md). Fine-tuning: "auto"
    # tests at the protocol's sizes, "checkpoint" at the weights' own; "paper" is refused (task.py finetune_input).
    preprocess: str = "auto"
    max_image_pixels: int | None = None  # images above this are refused as too large; default Pillow's limit

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"task.metric={self.metric!r}; valid: {', '.join(METRICS)}.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"task.val_fraction={self.val_fraction} must be in (0, 1).")
        if self.resolution is not None and self.resolution < 16:
            raise ConfigError(f"task.resolution={self.resolution} is too small; use 16 or more.")
        if not 0 <= self.split_seed < 2**32:  # numpy's seed range
            raise ConfigError(f"task.split_seed={self.split_seed} must be in [0, 2**32).")
        check_data_settings(max_bad_fraction=self.max_bad_fraction, limit_per_split=self.limit_per_split)
        if self.preprocess not in PREPROCESS:
            raise ConfigError(f"task.preprocess={self.preprocess!r}; valid: {', '.join(PREPROCESS)}.")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"task.max_image_pixels={self.max_image_pixels} must be a positive pixel count, "
                              "or null for Pillow's limit.")


def check(cfg) -> None:
    """Checks of the whole run config that need no data (called by ``transfer.config.validate``)."""
    if cfg.task.preprocess == "paper" and cfg.protocol.name not in FROZEN:
        raise ConfigError(f"task.preprocess=paper applies to the frozen protocols ({', '.join(FROZEN)}), not "
                          f"protocol={cfg.protocol.name}. Fine-tuning takes task.preprocess=auto (the protocol's "
                          "own test input; protocol=finetune's is the papers' resize 256 / centre crop 224) or "
                          "checkpoint (the checkpoint's own resolution and crop).")
    check_directory("task.data_dir", cfg.task.data_dir, f"a copy of {cfg.task.dataset} (layouts: "
                    f"docs/classification.md, or python -m transfer.run --help task={cfg.task.name})")
