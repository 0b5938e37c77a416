"""Typed settings of the ImageNet-1k weight check (recipes/task/imagenet.yaml) and its one protocol, ``eval``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transfer.data_settings import check_data_settings
from transfer.errors import ConfigError

SPLITS = ("val", "train")
EXPECTED_TREE = """\
  DATA_DIR/
    val/
      n01440764/ILSVRC2012_val_00000293.JPEG
      n01440764/...
      n01443537/...
      ... (1000 wnid folders, 50,000 images)
or a Hugging Face copy of ILSVRC/imagenet-1k: a datasets.save_to_disk folder, or its parquet files
(DATA_DIR/data/validation-*.parquet)."""


@dataclass
class ImageNetTaskConfig:
    name: str = "imagenet"
    adapter: str = "imagenet"
    data_dir: str | None = None  # val/<wnid>/*.JPEG tree, or a Hugging Face copy of ILSVRC/imagenet-1k
    split: str = "val"
    resolution: int | None = None  # default: the checkpoint's own test resolution
    allow_partial: bool = False  # evaluate even when some of the 1000 class folders are missing
    # Undecodable images above this fraction stop the run (0.001 of the 50,000 val images: 50 at most).
    max_bad_fraction: float = 0.001
    max_image_pixels: int | None = None  # images above this are refused as too large; default Pillow's limit

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ConfigError(f"task=imagenet needs task.data_dir=PATH, a local copy of ImageNet-1k:\n{EXPECTED_TREE}")
        from transfer.data_settings import check_directory

        check_directory("task.data_dir", self.data_dir, "a copy of ImageNet-1k (val/<wnid>/*.JPEG folders, or a "
                        "Hugging Face copy of ILSVRC/imagenet-1k)")
        if self.split not in SPLITS:
            raise ConfigError(f"task.split={self.split!r}; valid: {', '.join(SPLITS)}.")
        if self.resolution is not None and self.resolution < 32:
            raise ConfigError(f"task.resolution={self.resolution} is too small; use 32 or more, or leave it unset.")
        check_data_settings(max_bad_fraction=self.max_bad_fraction)
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"task.max_image_pixels={self.max_image_pixels} must be a positive pixel count, "
                              "or null for Pillow's limit.")


@dataclass
class PretrainedEvalConfig:
    """Evaluate the checkpoint's own classifier as it is: nothing is trained. Its published counterpart is the
    baselines file's ``supervised`` rows (the checkpoint's own ImageNet accuracy)."""

    FROZEN: ClassVar[bool] = True  # random weights score nothing published
    BASELINE_PROTOCOL: ClassVar[str] = "supervised"  # the baselines file's name for this measurement

    name: str = "eval"
