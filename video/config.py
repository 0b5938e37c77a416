"""Typed settings of a video task recipe (recipes/task/kinetics400.yaml, kinetics600.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer.errors import ConfigError
from video.inflate import InflationConfig
from video.transforms import TRAIN_CROPS


@dataclass
class InflationSettings:
    mode: str = "mean"  # mean (I3D) | center
    stem_temporal_kernel: int = 5
    stem_temporal_stride: int = 2
    stage_temporal_kernels: list = field(default_factory=lambda: [1, 1, 3, 3])
    self_gating: str = "last"  # none | last | all

    def build(self) -> InflationConfig:
        kernels = tuple(tuple(k) if isinstance(k, list) else k for k in self.stage_temporal_kernels)
        return InflationConfig(mode=self.mode, stem_temporal_kernel=self.stem_temporal_kernel,
                               stem_temporal_stride=self.stem_temporal_stride, stage_temporal_kernels=kernels,
                               self_gating=self.self_gating)


@dataclass
class VideoOptimSettings:
    """The training recipe of the 3D network (values and sources in the task recipe)."""

    lr: float = 0.8  # at a global batch of lr_reference_batch; scaled linearly to the actual global batch
    lr_reference_batch: int = 1024
    weight_decay: float = 4e-5
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    dropout: float = 0.5
    drop_path_rate: float = 0.1
    ema_decay: float = 0.0  # 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_reference_batch < 1 or self.weight_decay < 0:
            raise ConfigError(f"task.optim: lr={self.lr} must be > 0, lr_reference_batch={self.lr_reference_batch} "
                              f">= 1 and weight_decay={self.weight_decay} >= 0.")
        if not 0 <= self.dropout < 1 or not 0 <= self.drop_path_rate < 1 or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"task.optim: dropout={self.dropout}, drop_path_rate={self.drop_path_rate} and "
                              f"ema_decay={self.ema_decay} must each be in [0, 1).")


@dataclass
class VideoTaskConfig:
    name: str
    adapter: str = "video"
    data_dir: str | None = None  # the Kinetics copy (layouts in docs/video.md)
    layout: str = "auto"  # auto | csv | list | folders
    manifest: str | None = None  # folder of <split>.manifest.json from python -m video.scan
    train_split: str = "train"
    eval_split: str = "val"
    num_classes: int | None = None  # checked against the data when given
    frames: int = 32
    stride: int = 2
    fps: float = 30.0  # the rate clips are measured at: frames x stride / fps seconds per clip
    train_size: int = 224
    eval_size: int = 256
    train_crop: str = "resized"  # resized | jitter
    crop_area: list = field(default_factory=lambda: [0.08, 1.0])
    crop_aspect: list = field(default_factory=lambda: [0.5, 2.0])
    scale_jitter: list = field(default_factory=lambda: [256, 320])
    randaugment: list | None = None  # [num_ops, magnitude]; null = off
    test_clips: int = 10
    test_crops: int = 3
    max_bad_fraction: float = 0.2  # missing + undecodable above this fraction of a split stops the run
    inflation: InflationSettings = field(default_factory=InflationSettings)
    optim: VideoOptimSettings = field(default_factory=VideoOptimSettings)
    # The published from-scratch recipe these values follow, if any: a run from random weights is then
    # compared with the published from-scratch rows (transfer.compare); null: no published recipe.
    scratch_recipe: str | None = None

    def __post_init__(self) -> None:
        if self.data_dir is None and self.manifest is None:
            raise ConfigError(f"task {self.name!r} needs task.data_dir=/path/to/kinetics (or task.manifest=DIR "
                              "written by python -m video.scan). See docs/video.md for the layouts read.")
        if self.train_crop not in TRAIN_CROPS:
            raise ConfigError(f"task.train_crop={self.train_crop!r}; valid: {', '.join(TRAIN_CROPS)}.")
        for key in ("frames", "stride", "train_size", "eval_size", "test_clips", "test_crops"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}={getattr(self, key)} must be at least 1.")
        if self.fps <= 0 or not 0 <= self.max_bad_fraction < 1:
            raise ConfigError(f"task.fps={self.fps} must be > 0 and task.max_bad_fraction={self.max_bad_fraction} "
                              "in [0, 1).")
        if self.randaugment is not None and len(self.randaugment) != 2:
            raise ConfigError(f"task.randaugment={self.randaugment} must be [num_ops, magnitude] or null.")
        self.inflation.build()  # raises on a bad inflation setting before any data or model work
