"""Typed settings of a detection task recipe and the checks that need no detectron2.

The protocols are :class:`transfer.protocols.FrozenProtocolConfig` and ``RecipeFinetuneProtocolConfig`` (the
solver is the task recipe's; ``protocol=finetune protocol.freeze_backbone=true`` is the frozen protocol).
:func:`check` runs inside :func:`transfer.config.validate`, so every value it refuses fails before a run
directory or W&B run exists. The translation of these settings into a detectron2 config lives in
:mod:`tasks.detection.translate`, which is imported only where detectron2 is installed.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.detection.data import LAYOUTS, check_data
from transfer.data_settings import check_data_settings, local_data_dir
from transfer.errors import ConfigError

if TYPE_CHECKING:
    from transfer.config import RunConfig

# FrozenBN: batch statistics and affine parameters fixed, the usual choice for the small per-device batches of
# detection (detectron2 configs/Base-RCNN-FPN.yaml keeps RESNETS.NORM at its FrozenBN default). naiveSyncBN is
# detectron2's NaiveSyncBatchNorm, which MoCo's detection configs use (moco detection/configs/Base-RCNN-C4-BN.yaml).
BACKBONE_NORMS = ("FrozenBN", "BN", "SyncBN", "naiveSyncBN")
HEAD_NORMS = ("", "GN", "SyncBN", "BN")
# The model-zoo folders of detectron2 @02b5c4e (configs/); used to check task.base_config where detectron2
# is not importable. Where it is, the file itself is looked up.
MODEL_ZOO_FOLDERS = ("COCO-Detection", "COCO-InstanceSegmentation", "COCO-Keypoints", "COCO-PanopticSegmentation",
                     "Cityscapes", "Detectron1-Comparisons", "LVISv0.5-InstanceSegmentation",
                     "LVISv1-InstanceSegmentation", "Misc", "PascalVOC-Detection")
BASE_CONFIG = re.compile(r"^(?P<folder>[A-Za-z0-9.\-]+)/[A-Za-z0-9_.\-]+\.yaml$")
# Every metric key the adapter can emit: detectron2's COCO and VOC evaluators' headline numbers, lower-case.
BOX_METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
METRICS = tuple(f"test/{m}" for m in BOX_METRICS) + tuple(f"test/mask_{m}" for m in BOX_METRICS)


@dataclass
class SolverConfig:
    """SGD and schedule; ``None`` keeps the base config's value (its 1x schedule).

    Lowering ``ims_per_batch`` without setting ``base_lr`` scales the base config's LR linearly (the linear
    scaling rule of Goyal et al. 2017, arXiv 1706.02677); the run log says so.
    """

    ims_per_batch: int | None = None  # images per iteration over all processes (detectron2's meaning)
    base_lr: float | None = None
    max_iter: int | None = None
    steps: list[int] | None = None
    warmup_iters: int | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    checkpoint_period: int = 5000

    def __post_init__(self) -> None:
        for key in ("ims_per_batch", "max_iter", "checkpoint_period"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"task.solver.{key}={value} must be at least 1.")
        if self.base_lr is not None and self.base_lr <= 0:
            raise ConfigError(f"task.solver.base_lr={self.base_lr} must be > 0.")
        if self.warmup_iters is not None and self.warmup_iters < 0:
            raise ConfigError(f"task.solver.warmup_iters={self.warmup_iters} must be 0 or more.")


@dataclass
class InputConfig:
    """Resize bounds (shorter side, longer side) in pixels; ``None`` keeps the base config's value."""

    min_size_train: list[int] | None = None
    max_size_train: int | None = None
    min_size_test: int | None = None
    max_size_test: int | None = None


@dataclass
class DetectionTaskConfig:
    name: str
    dataset: str  # a data-set layout: voc | coco (tasks/detection/data.py)
    base_config: str  # detectron2 model-zoo config, e.g. PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml
    train_splits: list[str]
    test_split: str
    adapter: str = "detection"
    data_dir: str | None = None
    class_names: list[str] | None = None  # VOC-layout data with other classes than the 20 of Pascal VOC
    freeze_at: int = 2  # levels fixed under protocol=finetune: 1 = stem, 2 = stem + res2 (detectron2's default)
    frozen_freeze_at: int | None = None  # levels fixed under protocol=frozen; None: every level
    backbone_norm: str = "FrozenBN"  # FrozenBN | BN | SyncBN | naiveSyncBN
    head_norm: str = ""  # FPN and heads: "" (none) | GN | SyncBN | BN
    res5_extra_norm: bool = False  # C4 only: a norm after the res5 head (MoCo's Res5ROIHeadsExtraNorm)
    precise_bn: bool = False  # recompute trained batch-norm statistics before evaluating (detectron2 PreciseBN)
    eval_period: int = 0  # also evaluate every N iterations; 0: only at the end
    max_bad_fraction: float = 0.01  # undecodable images above this fraction of a split stop the run
    solver: SolverConfig = field(default_factory=SolverConfig)
    input: InputConfig = field(default_factory=InputConfig)
    opts: list[str] = field(default_factory=list)  # further detectron2 KEY VALUE pairs, applied last

    def __post_init__(self) -> None:
        LAYOUTS.get(self.dataset)
        if not self.train_splits:
            raise ConfigError(f"task.train_splits is empty for task {self.name!r}; name at least one split.")
        if self.head_norm not in HEAD_NORMS:
            raise ConfigError(f"task.head_norm={self.head_norm!r}; valid: {', '.join(map(repr, HEAD_NORMS))}.")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ConfigError(f"task.backbone_norm={self.backbone_norm!r}; valid: {', '.join(BACKBONE_NORMS)}. "
                              "The pretrained weights carry batch-norm statistics, so GroupNorm cannot replace them.")
        for key in ("freeze_at", "frozen_freeze_at", "eval_period"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"task.{key}={value} must be >= 0.")
        check_data_settings(max_bad_fraction=self.max_bad_fraction)
        if len(self.opts) % 2:
            raise ConfigError(f"task.opts={self.opts} must be detectron2 KEY VALUE pairs (an even number of items).")


def frozen_levels(cfg: RunConfig) -> int:
    """Backbone levels kept fixed in this run: ``task.freeze_at`` (finetune) or ``task.frozen_freeze_at`` (frozen)."""
    from transfer.backbones import BACKBONES

    levels = len(BACKBONES.get(cfg.backbone.name).feature_strides)
    if cfg.protocol.name == "frozen":
        return levels if cfg.task.frozen_freeze_at is None else cfg.task.frozen_freeze_at
    return cfg.task.freeze_at


def detector_name(base_config: str) -> str:
    """The detector design of a model-zoo config, without the zoo's backbone depth and schedule.

    ``PascalVOC-Detection/faster_rcnn_R_50_C4.yaml`` -> ``faster_rcnn_c4``,
    ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml`` -> ``mask_rcnn_fpn``: the backbone is the
    registry's, so the zoo's ``R_50`` says nothing about the run. Published rows name it in ``detector=...``.
    """
    stem = Path(base_config).stem.lower()
    stem = re.sub(r"_r_\d+", "", stem)
    return re.sub(r"(_\d+x|_\d+k)+$", "", stem)


def comparison_facts(cfg: RunConfig) -> dict:
    """What published detection rows are matched on, besides the solver in results.json ``recipe``.

    ``detector`` (:func:`detector_name`), ``freeze_backbone`` (protocol=frozen, whatever its frozen levels),
    ``train_splits`` (joined with ``+``, e.g. ``2007_trainval+2012_trainval``) and ``test_split``. The recipe
    adds ``architecture``, ``freeze_at``, ``ims_per_batch``, ``base_lr``, ``max_iter``, ``steps`` (the values
    actually trained with, so a shortened schedule no longer matches a row of the full one).
    """
    task = cfg.task
    return {"detector": detector_name(task.base_config), "freeze_backbone": cfg.protocol.name == "frozen",
            "train_splits": "+".join(task.train_splits), "test_split": task.test_split}


def check(cfg: RunConfig) -> None:
    """Every check of a detection run that can be made before a run directory exists.

    Raises :class:`ConfigError` naming the key, the valid values and the fix. Where detectron2 is installed,
    the whole translation into a detectron2 config is tried too (model-zoo file, architecture, ``task.opts``).
    """
    from tasks.detection.requirement import detectron2_available
    from transfer.backbones import BACKBONES

    task = cfg.task
    spec = BACKBONES.get(cfg.backbone.name)
    levels = len(spec.feature_strides)
    for key in ("freeze_at", "frozen_freeze_at"):
        value = getattr(task, key)
        if value is not None and value > levels:
            raise ConfigError(f"task.{key}={value} exceeds the {levels} levels of backbone {spec.name!r} "
                              f"(0 trains every level, {levels} fixes all of them).")
    check_base_config(task.base_config, detectron2=detectron2_available())
    layout = LAYOUTS.get(task.dataset)
    local_data_dir(task.data_dir, task=task.name, copy=layout.name, tree=layout.tree)
    device = detection_device(cfg)
    amp_enabled(cfg.trainer.precision, device)
    n = world_size(cfg)
    if n > 1 and device != "cuda":
        # detectron2's DefaultTrainer wraps the model in DDP with a GPU device id, which CPU modules refuse.
        raise ConfigError(f"trainer.devices x trainer.num_nodes = {n} processes on {device}: detectron2 trains on "
                          "several processes only with CUDA devices. Use trainer.devices=1 on CPU.")
    if task.solver.ims_per_batch is not None and task.solver.ims_per_batch % n:
        raise ConfigError(f"task.solver.ims_per_batch={task.solver.ims_per_batch} is not divisible by the {n} "
                          "processes (trainer.devices x trainer.num_nodes); detectron2 splits it evenly.")
    if detectron2_available():
        with warnings.catch_warnings():  # detectron2's model_zoo imports pkg_resources, which warns on import
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            from tasks.detection.translate import build_detectron2_config

        build_detectron2_config(cfg)  # model-zoo file, architecture, task.opts: all before any run folder
    check_data(task)  # layout, listed files, annotation classes: before a run folder exists (reads every XML)


def check_base_config(name: str, *, detectron2: bool) -> None:
    """``name`` must be a YAML file of detectron2's model zoo (looked up when detectron2 is importable)."""
    hint = ("Use a path under detectron2's configs/ folder, e.g. PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml or "
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml.")
    match = BASE_CONFIG.match(name)
    if not match or match.group("folder") not in MODEL_ZOO_FOLDERS:
        raise ConfigError(f"task.base_config={name!r} is not a detectron2 model-zoo config (folders: "
                          f"{', '.join(MODEL_ZOO_FOLDERS)}). {hint}")
    if detectron2:
        with warnings.catch_warnings():  # detectron2's model_zoo imports pkg_resources, which warns on import
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            from detectron2 import model_zoo

        try:
            model_zoo.get_config_file(name)
        except RuntimeError:
            raise ConfigError(f"task.base_config={name!r} is not a detectron2 model-zoo config. {hint}") from None


def detection_device(cfg: RunConfig) -> str:
    from transfer.config import resolve_accelerator

    device = resolve_accelerator(cfg.trainer)
    return "cuda" if device in ("cuda", "gpu") else device


def detection_devices(cfg: RunConfig) -> int:
    """Processes per machine: trainer.devices, or every visible GPU for ``auto`` (one process on CPU)."""
    import torch

    if cfg.trainer.devices != "auto":
        return int(cfg.trainer.devices)
    return max(torch.cuda.device_count(), 1) if detection_device(cfg) == "cuda" else 1


def world_size(cfg: RunConfig) -> int:
    return detection_devices(cfg) * cfg.trainer.num_nodes


def amp_enabled(precision: str, device: str) -> bool:
    """detectron2's AMP trainer runs float16 with a grad scaler on CUDA; other precisions run float32."""
    if precision == "auto":
        return device == "cuda"
    if precision in ("32", "32-true"):
        return False
    if precision == "16-mixed" and device == "cuda":
        return True
    raise ConfigError(f"trainer.precision={precision!r} is not available for detection on {device}: detectron2 "
                      "trains in float32 or, on CUDA, float16 mixed precision. Use trainer.precision=auto, 32 or "
                      "16-mixed.")
