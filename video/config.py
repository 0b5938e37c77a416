"""Typed settings of a video task recipe (recipes/task/kinetics400.yaml, kinetics600.yaml), the video adapter's
fine-tune protocol (:class:`VideoFinetuneProtocolConfig`: the 3D training recipe) and :func:`check`, the checks of
the whole run config that the video adapter makes before any run directory exists."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from transfer.data_settings import check_data_settings
from transfer.errors import ConfigError
from transfer.protocols import check_sgd_momentum
from video.data import LAYOUTS
from video.inflate import InflationConfig

if TYPE_CHECKING:
    from transfer.config import RunConfig

# How a training clip is cropped (video.transforms.build_train_transform); here, not there, so that validating a
# config needs no torchvision.
TRAIN_CROPS = ("resized", "jitter")


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
class VideoFinetuneProtocolConfig:
    """``protocol=finetune`` of the video adapter: the inflated network trained on clips, SGD with warmup and cosine.

    The defaults are the 3D ResNet-RS-50 recipe, tensorflow/models official/vision/configs/experiments/
    video_classification/k400_resnet3drs_50_tpu.yaml ("Expected accuracy: 78.2% top-1"), unless noted; a run that
    changes one is not comparable (:func:`transfer.compare.protocol_deviations`). Stochastic depth is
    ``backbone.drop_path_rate`` (the Kinetics recipes set the published 0.1). ``freeze_backbone=true`` trains only
    the classifier on the inflated backbone's features (its weights and batch-norm statistics stay as loaded).
    """

    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "freeze_backbone": "frozen and fine-tuned transfer are compared with different rows (a frozen run is "
                           "treated as frozen transfer)",
    }

    name: str = "finetune"
    lr: float = 0.8  # cosine initial_learning_rate 0.8 ...
    # ... at global_batch_size 1024; scaled linearly to the actual global batch
    lr_reference_batch: int = 1024
    weight_decay: float = 4e-5  # l2_weight_decay 4e-5
    # The yaml keeps the optimizer of its experiment factory: SGD, momentum 0.9, nesterov true
    # (official/vision/configs/video_classification.py add_trainer).
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float = 5.0  # 1,050 linear warmup steps of 73,682 (= 4.99 epochs, computed)
    label_smoothing: float = 0.1  # label_smoothing 0.1
    dropout: float = 0.5  # head dropout_rate 0.5
    # ema average_decay 0.9999, trainable_weights_only false (BN statistics too); 0 = off
    ema_decay: float = 0.9999
    # EMAConfig dynamic_decay (default true): decay min(ema_decay, (1 + n) / (10 + n)) at update n
    ema_warmup: bool = True
    # norm_momentum 0.0 in TF's convention (moving stats = the batch's; the EMA averages them). PyTorch convention
    # here (1 = the last batch's statistics); null: the backbone's own.
    bn_momentum: float | None = 1.0
    freeze_backbone: bool = False  # true: only the classifier trains; backbone weights and BN statistics kept

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_reference_batch < 1 or self.weight_decay < 0:
            raise ConfigError(f"protocol.lr={self.lr} must be > 0, protocol.lr_reference_batch="
                              f"{self.lr_reference_batch} >= 1 and protocol.weight_decay={self.weight_decay} >= 0.")
        if not 0 <= self.dropout < 1 or not 0 <= self.ema_decay < 1 or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"protocol.dropout={self.dropout}, protocol.ema_decay={self.ema_decay} and "
                              f"protocol.label_smoothing={self.label_smoothing} must each be in [0, 1).")
        if not 0 <= self.momentum < 1 or self.warmup_epochs < 0:
            raise ConfigError(f"protocol.momentum={self.momentum} must be in [0, 1) and protocol.warmup_epochs="
                              f"{self.warmup_epochs} >= 0.")
        check_sgd_momentum(self.momentum, self.nesterov)
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"protocol.bn_momentum={self.bn_momentum} must be in (0, 1] (PyTorch convention: "
                              "the weight of the current batch; TF's norm_momentum m is 1 - m here) or null.")


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
    decode_short_side: int | None = 256  # train frames decoded at this short side (jitter: at its max); null: as stored
    train_crop: str = "resized"  # resized | jitter
    crop_area: list = field(default_factory=lambda: [0.08, 1.0])
    crop_aspect: list = field(default_factory=lambda: [0.5, 2.0])
    scale_jitter: list = field(default_factory=lambda: [256, 320])
    randaugment: list | None = None  # [num_ops, magnitude]; null = off
    test_clips: int = 10
    test_crops: int = 3
    max_bad_fraction: float = 0.2  # missing + undecodable above this fraction of a split stops the run
    inflation: InflationSettings = field(default_factory=InflationSettings)
    # The published from-scratch recipe these values follow, if any: a run from random weights is then
    # compared with the published from-scratch rows (transfer.compare); null: no published recipe.
    scratch_recipe: str | None = None
    # Epochs of the published schedule (trainer.max_epochs of a run that follows it); null: none published.
    # A run that trains another schedule is marked not comparable (video.task.not_comparable).
    published_epochs: int | None = None
    # Stochastic depth of the published recipe: the task recipe sets backbone.drop_path_rate to it (a CLI
    # backbone.drop_path_rate=... wins); a run with another rate is marked not comparable. null: none published.
    published_drop_path_rate: float | None = None

    def __post_init__(self) -> None:
        if self.data_dir is None and self.manifest is None:
            raise ConfigError(f"task {self.name!r} needs task.data_dir=/path/to/kinetics (or task.manifest=DIR "
                              "written by python -m video.scan). See docs/video.md for the layouts read.")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"task.layout={self.layout!r}; valid: {', '.join(LAYOUTS)} (docs/video.md).")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"task.num_classes={self.num_classes} must be at least 1, or null (from the data).")
        if self.train_crop not in TRAIN_CROPS:
            raise ConfigError(f"task.train_crop={self.train_crop!r}; valid: {', '.join(TRAIN_CROPS)}.")
        for key in ("frames", "stride", "train_size", "eval_size", "test_clips", "test_crops", "decode_short_side"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"task.{key}={getattr(self, key)} must be at least 1.")
        if self.fps <= 0:
            raise ConfigError(f"task.fps={self.fps} must be > 0 (the frame rate clips are sampled at).")
        check_data_settings(max_bad_fraction=self.max_bad_fraction)
        if self.randaugment is not None and len(self.randaugment) != 2:
            raise ConfigError(f"task.randaugment={self.randaugment} must be [num_ops, magnitude] or null.")
        self.inflation.build()  # raises on a bad inflation setting before any data or model work


def _check_pair(key: str, pair, *, low: float, high: float | None = None) -> tuple:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ConfigError(f"task.{key}={pair} must be a pair [min, max].")
    lo, hi = pair
    if not low < lo <= hi or (high is not None and hi > high):
        bound = f" <= {high}" if high is not None else ""
        raise ConfigError(f"task.{key}={list(pair)} must satisfy {low} < min <= max{bound}.")
    return lo, hi


def check(cfg: RunConfig) -> None:
    """Refuse impossible video settings before any run directory or W&B run exists (``TaskAdapter.check``)."""
    from transfer.backbones import BACKBONES
    from transfer.data_settings import check_directory

    task: VideoTaskConfig = cfg.task
    check_directory("task.data_dir", task.data_dir, "a Kinetics copy (layouts: docs/video.md)")
    check_directory("task.manifest", task.manifest, "the <split>.manifest.json files of python -m video.scan")
    stages = len(BACKBONES.get(cfg.backbone.name).feature_strides) - 1  # the levels after the stem
    kernels = task.inflation.stage_temporal_kernels
    if len(kernels) != stages:
        raise ConfigError(f"task.inflation.stage_temporal_kernels={list(kernels)} has {len(kernels)} entries; backbone "
                          f"{cfg.backbone.name!r} has {stages} stages: give one kernel (or list) per stage, e.g. "
                          "[1,1,3,3].")
    if task.train_crop == "jitter":
        lo, hi = _check_pair("scale_jitter", task.scale_jitter, low=0)
        if lo < task.train_size:
            raise ConfigError(f"task.scale_jitter={list(task.scale_jitter)} resizes the short side below the "
                              f"{task.train_size} px crop (task.train_size); pass a range starting at "
                              f"{task.train_size} or more, e.g. task.scale_jitter=[256,320].")
    else:
        _check_pair("crop_area", task.crop_area, low=0, high=1)
        _check_pair("crop_aspect", task.crop_aspect, low=0)
    if task.randaugment is not None and not (task.randaugment[0] >= 0 and 0 <= task.randaugment[1] <= 30):
        raise ConfigError(f"task.randaugment={task.randaugment}: num_ops must be >= 0 and magnitude in 0..30 "
                          "(torchvision's 31 magnitude bins).")
    o = cfg.protocol
    if o.bn_momentum is not None and o.bn_momentum > 0.5 and not o.ema_decay and not o.freeze_backbone:
        raise ConfigError(f"protocol.bn_momentum={o.bn_momentum} keeps (mostly) the last batch's BN statistics; "
                          "they are averaged only by the EMA (protocol.ema_decay > 0, as in the 3D ResNet-RS "
                          "recipe). Turn the EMA on or pass protocol.bn_momentum=0.1 (or null).")
