"""Typed settings of a semantic-segmentation recipe, and their translation into a detectron2 config.

The architecture is detectron2's Semantic FPN (``Misc/semantic_R_50_FPN_1x.yaml``: FPN + ``SemSegFPNHead``
in a ``SemanticSegmentor``) with its ResNet-50 replaced by the registry backbone through the detection
package's FPN builder (:func:`tasks.detection.translate.use_registry_backbone`). detectron2 is imported only
inside :func:`build_segmentation_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.segmentation.data import LAYOUTS
from transfer.data_settings import check_data_settings, local_data_dir
from transfer.errors import ConfigError

if TYPE_CHECKING:
    from detectron2.config import CfgNode

    from transfer.config import RunConfig

BASE_CONFIG = "Misc/semantic_R_50_FPN_1x.yaml"
SCHEDULERS = {"multistep": "WarmupMultiStepLR", "poly": "WarmupPolyLR", "cosine": "WarmupCosineLR"}
BACKBONE_NORMS = ("FrozenBN", "BN", "SyncBN")
HEAD_NORMS = ("", "GN", "BN", "SyncBN")


@dataclass
class SegmentationSolverConfig:
    """SGD and its schedule, in detectron2's terms (iterations, images per iteration over all processes)."""

    ims_per_batch: int = 16
    base_lr: float = 0.01
    max_iter: int = 30000
    lr_scheduler: str = "multistep"  # multistep | poly | cosine
    steps: list[float] = field(default_factory=lambda: [0.7, 0.9])  # multistep: LR drops, fractions of max_iter
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    checkpoint_period: int = 5000

    def __post_init__(self) -> None:
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"task.solver.lr_scheduler={self.lr_scheduler!r}; valid: {', '.join(SCHEDULERS)}.")
        if not all(0 < s < 1 for s in self.steps) or sorted(self.steps) != list(self.steps):
            raise ConfigError(f"task.solver.steps={self.steps} must be increasing fractions of max_iter in (0, 1), "
                              "e.g. [0.7, 0.9] for drops at 70% and 90% of training.")
        for key in ("ims_per_batch", "max_iter", "checkpoint_period"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.solver.{key}={getattr(self, key)} must be at least 1.")
        if self.base_lr <= 0 or self.weight_decay < 0 or self.warmup_iters < 0:
            raise ConfigError(f"task.solver: base_lr={self.base_lr} must be > 0, weight_decay={self.weight_decay} and "
                              f"warmup_iters={self.warmup_iters} >= 0.")


@dataclass
class SegmentationInputConfig:
    """Augmentation and resizing, in pixels.

    Training rescales each image by a random ratio in ``train_ratio``, relative to its own size
    (``train_target`` null) or to the size that fits it into ``train_target`` = [short, long] (the
    mmsegmentation rule); then a random ``crop`` = [height, width] and a horizontal flip. Testing
    resizes into ``test_target`` when set (the prediction is scored at the label's own size).
    """

    train_ratio: list[float] = field(default_factory=lambda: [0.5, 2.0])
    train_target: list[int] | None = None
    crop: list[int] = field(default_factory=lambda: [513, 513])
    cat_max_ratio: float = 1.0  # crop retried (up to 10 times) while one class covers more than this; 1 = off
    flip: bool = True
    test_target: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.train_ratio) != 2 or not 0 < self.train_ratio[0] <= self.train_ratio[1]:
            raise ConfigError(f"task.input.train_ratio={self.train_ratio} must be [low, high] with 0 < low <= high.")
        for key in ("train_target", "test_target", "crop"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ConfigError(f"task.input.{key}={value} must be two positive sizes in pixels.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(f"task.input.cat_max_ratio={self.cat_max_ratio} must be in (0, 1].")


@dataclass
class SegmentationTaskConfig:
    name: str
    dataset: str  # a layout of tasks/segmentation/data.py: voc2012 | ade20k
    train_split: str
    test_split: str
    adapter: str = "segmentation"
    data_dir: str | None = None
    base_config: str = BASE_CONFIG
    freeze_at: int = 2  # levels fixed when fine-tuning: 1 = stem, 2 = stem + res2 (detectron2's default)
    backbone_norm: str = "FrozenBN"  # FrozenBN | BN | SyncBN
    head_norm: str = "GN"  # FPN is left as the base config has it; this is the SemSegFPNHead norm
    conv_dims: int = 128  # SemSegFPNHead channels
    max_bad_fraction: float = 0.01  # damaged images above this fraction of a split stop the run
    limit_per_split: int | None = None  # use only the first N listed images of each split (smoke tests)
    eval_period: int = 0  # also evaluate every N iterations; 0: only at the end
    solver: SegmentationSolverConfig = field(default_factory=SegmentationSolverConfig)
    input: SegmentationInputConfig = field(default_factory=SegmentationInputConfig)
    opts: list[str] = field(default_factory=list)  # further detectron2 KEY VALUE pairs, applied last

    def __post_init__(self) -> None:
        LAYOUTS.get(self.dataset)
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ConfigError(f"task.backbone_norm={self.backbone_norm!r}; valid: {', '.join(BACKBONE_NORMS)}.")
        if self.head_norm not in HEAD_NORMS:
            raise ConfigError(f"task.head_norm={self.head_norm!r}; valid: {', '.join(map(repr, HEAD_NORMS))}.")
        if self.freeze_at < 0 or self.eval_period < 0 or self.conv_dims < 1:
            raise ConfigError(f"task.freeze_at={self.freeze_at}, task.eval_period={self.eval_period} must be >= 0 "
                              f"and task.conv_dims={self.conv_dims} >= 1.")
        if self.head_norm == "GN" and self.conv_dims % 32:
            raise ConfigError(f"task.conv_dims={self.conv_dims} must be a multiple of 32 with task.head_norm=GN "
                              "(detectron2's GroupNorm has 32 groups).")
        check_data_settings(max_bad_fraction=self.max_bad_fraction, limit_per_split=self.limit_per_split)
        if len(self.opts) % 2:
            raise ConfigError(f"task.opts={self.opts} must be detectron2 KEY VALUE pairs (an even number of items).")


def data_root(task: SegmentationTaskConfig) -> Path:
    layout = LAYOUTS.get(task.dataset)
    return local_data_dir(task.data_dir, task=task.name, copy=layout.name, tree=layout.tree)


def check(cfg: RunConfig) -> None:
    """Checks of the whole run config that need no detectron2 (called by ``transfer.config.validate``).

    Segmentation takes its training values from ``task.solver`` and ``task.input``; ``protocol=finetune``
    trains the backbone from ``task.freeze_at`` on, ``protocol=frozen`` (or ``protocol.freeze_backbone=true``)
    keeps every level fixed. The fine-tune protocol has no other key.
    """
    task = cfg.task
    data_root(task)
    from transfer.backbones import BACKBONES

    levels = len(BACKBONES.get(cfg.backbone.name).feature_strides)
    if task.freeze_at > levels:
        raise ConfigError(f"task.freeze_at={task.freeze_at} exceeds the {levels} levels of backbone "
                          f"{cfg.backbone.name!r}.")
    if cfg.trainer.precision not in ("auto", "32", "32-true", "16-mixed"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is not available for segmentation: "
                          "detectron2 trains in float32 or, on CUDA, float16 mixed precision. Use trainer.precision="
                          "auto, 32 or 16-mixed.")


def is_frozen(cfg: RunConfig) -> bool:
    """``protocol=frozen``: every backbone level fixed, only FPN and head train."""
    return cfg.protocol.name == "frozen"


def device_of(cfg: RunConfig) -> str:
    from transfer.config import resolve_accelerator

    device = resolve_accelerator(cfg.trainer)
    return "cuda" if device in ("cuda", "gpu") else device


def use_amp(cfg: RunConfig, device: str) -> bool:
    """detectron2's AMP trainer runs float16 with a grad scaler, on CUDA only."""
    precision = cfg.trainer.precision
    if precision == "16-mixed" and device != "cuda":
        raise ConfigError(f"trainer.precision=16-mixed needs a CUDA device for segmentation (device: {device}).")
    return device == "cuda" and precision in ("auto", "16-mixed")


def build_segmentation_config(cfg: RunConfig, output_dir: Path, train: str, test: str) -> CfgNode:
    """The detectron2 config of a run: Semantic FPN + registry backbone + registered splits + schedule."""
    from detectron2 import model_zoo
    from detectron2.config import CfgNode, get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from tasks.detection.backbone import add_transfer_backbone_config
    from tasks.detection.schema import detection_devices
    from tasks.detection.translate import FPN_BUILDERS, use_registry_backbone
    from tasks.segmentation.data import IGNORE, LAYOUTS, layout_classes

    task = cfg.task
    d2 = get_cfg()
    add_transfer_backbone_config(d2)
    add_deeplab_config(d2)  # SOLVER.POLY_LR_POWER for the poly schedule
    try:
        d2.merge_from_file(model_zoo.get_config_file(task.base_config))
    except RuntimeError:
        raise ConfigError(f"task.base_config={task.base_config!r} is not a detectron2 model-zoo config; the "
                          f"segmentation recipes use {BASE_CONFIG!r}.") from None
    if d2.MODEL.META_ARCHITECTURE != "SemanticSegmentor" or d2.MODEL.BACKBONE.NAME not in FPN_BUILDERS:
        raise ConfigError(f"task.base_config={task.base_config!r} is not a SemanticSegmentor on an FPN builder "
                          f"({sorted(FPN_BUILDERS)}); use {BASE_CONFIG!r}.")
    from transfer.backbones import BACKBONES

    levels = len(BACKBONES.get(cfg.backbone.name).feature_strides)
    use_registry_backbone(d2, cfg.backbone, norm=task.backbone_norm,
                          freeze_at=levels if is_frozen(cfg) else task.freeze_at)
    head = d2.MODEL.SEM_SEG_HEAD
    head.NUM_CLASSES = len(layout_classes(LAYOUTS.get(task.dataset)))
    head.IGNORE_VALUE = IGNORE
    head.NORM = task.head_norm
    head.CONVS_DIM = task.conv_dims
    d2.DATASETS.TRAIN, d2.DATASETS.TEST = (train,), (test,)

    solver, n_iter = task.solver, cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else task.solver.max_iter
    scale = n_iter / solver.max_iter  # trainer.max_steps shortens the schedule and keeps its shape
    d2.SOLVER.IMS_PER_BATCH = solver.ims_per_batch
    d2.SOLVER.BASE_LR = solver.base_lr
    d2.SOLVER.MAX_ITER = n_iter
    d2.SOLVER.LR_SCHEDULER_NAME = SCHEDULERS[solver.lr_scheduler]
    d2.SOLVER.STEPS = tuple(sorted({s for s in (round(f * n_iter) for f in solver.steps) if 0 < s < n_iter}))
    d2.SOLVER.GAMMA = solver.gamma
    d2.SOLVER.POLY_LR_POWER = solver.poly_power
    d2.SOLVER.WARMUP_ITERS = round(solver.warmup_iters * scale)
    d2.SOLVER.WEIGHT_DECAY = solver.weight_decay
    d2.SOLVER.MOMENTUM = solver.momentum
    d2.SOLVER.CHECKPOINT_PERIOD = solver.checkpoint_period
    d2.TEST.EVAL_PERIOD = task.eval_period
    d2.MODEL.DEVICE = device_of(cfg)
    if "SyncBN" in (task.backbone_norm, task.head_norm) and d2.MODEL.DEVICE != "cuda":
        raise ConfigError(f"task.backbone_norm={task.backbone_norm!r} / task.head_norm={task.head_norm!r}: SyncBN "
                          f"needs CUDA devices (device: {d2.MODEL.DEVICE}); use BN, FrozenBN or GN.")
    d2.SOLVER.AMP.ENABLED = use_amp(cfg, d2.MODEL.DEVICE)
    d2.DATALOADER.NUM_WORKERS = cfg.trainer.num_workers
    inp = task.input  # read by SegmentationTrainer's data loaders
    d2.TRANSFER = CfgNode({"LOG_PERIOD": cfg.trainer.log_every_n_steps,  # read by DetectionTrainer's writer hook
                           "INPUT": CfgNode({"train_ratio": list(inp.train_ratio), "train_target": inp.train_target,
                                             "crop": list(inp.crop), "cat_max_ratio": inp.cat_max_ratio,
                                             "flip": inp.flip, "test_target": inp.test_target})})
    d2.SEED = cfg.trainer.seed
    d2.OUTPUT_DIR = str(output_dir)
    try:
        d2.merge_from_list(list(task.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"task.opts={task.opts} could not be applied to the detectron2 config: {e}") from None
    n = detection_devices(cfg) * cfg.trainer.num_nodes
    if n > 1 and d2.MODEL.DEVICE != "cuda":
        raise ConfigError(f"trainer.devices x trainer.num_nodes = {n} processes on {d2.MODEL.DEVICE}: detectron2 "
                          "trains on several processes only with CUDA devices. Use trainer.devices=1 on CPU.")
    if d2.SOLVER.IMS_PER_BATCH % n:
        raise ConfigError(f"task.solver.ims_per_batch={d2.SOLVER.IMS_PER_BATCH} is not divisible by the {n} "
                          "processes (trainer.devices x trainer.num_nodes); detectron2 splits it evenly.")
    d2.freeze()
    return d2
