"""Typed settings of a detection task recipe, and their translation into a detectron2 config.

A recipe names a detectron2 model-zoo config (``base_config``) for the architecture, heads and 1x
schedule; this module swaps its ImageNet R-50 for the chosen registry backbone (with that
backbone's own normalisation), points it at the local data and applies the recipe's overrides.
detectron2 is imported only inside :func:`build_detectron2_config`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.detection.data import LAYOUTS, check_layout, register_split, split_classes
from transfer.errors import ConfigError

if TYPE_CHECKING:
    from detectron2.config import CfgNode

    from transfer.config import RunConfig

HEAD_NORMS = ("", "GN", "SyncBN", "BN")
# detectron2's FPN builders and the builders of tasks/detection/backbone.py that replace them.
FPN_BUILDERS = {"build_resnet_fpn_backbone": "build_transfer_fpn_backbone",
                "build_retinanet_resnet_fpn_backbone": "build_transfer_retinanet_fpn_backbone"}
DETECTRON2_OUTPUT = "detectron2"  # sub-folder of the run directory for checkpoints, metrics.json, evaluation files


@dataclass
class SolverConfig:
    """SGD and schedule; ``None`` keeps the base config's value (its 1x schedule)."""

    ims_per_batch: int | None = None  # images per iteration over all processes (detectron2's meaning)
    base_lr: float | None = None
    max_iter: int | None = None
    steps: list[int] | None = None
    warmup_iters: int | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    checkpoint_period: int = 5000


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
    freeze_at: int = 2  # levels kept fixed when fine-tuning: 1 = stem, 2 = stem + res2 (detectron2's default)
    backbone_norm: str = "FrozenBN"  # FrozenBN | BN | SyncBN
    head_norm: str = ""  # FPN and heads: "" (none) | GN | SyncBN | BN
    eval_period: int = 0  # also evaluate every N iterations; 0: only at the end
    solver: SolverConfig = field(default_factory=SolverConfig)
    input: InputConfig = field(default_factory=InputConfig)
    opts: list[str] = field(default_factory=list)  # further detectron2 KEY VALUE pairs, applied last

    def __post_init__(self) -> None:
        LAYOUTS.get(self.dataset)
        if not self.train_splits:
            raise ConfigError(f"task.train_splits is empty for task {self.name!r}; name at least one split.")
        if self.head_norm not in HEAD_NORMS:
            raise ConfigError(f"task.head_norm={self.head_norm!r}; valid: {', '.join(map(repr, HEAD_NORMS))}.")
        if self.freeze_at < 0 or self.eval_period < 0:
            raise ConfigError(f"task.freeze_at={self.freeze_at} and task.eval_period={self.eval_period} must be >= 0.")
        if len(self.opts) % 2:
            raise ConfigError(f"task.opts={self.opts} must be detectron2 KEY VALUE pairs (an even number of items).")


def data_root(task: DetectionTaskConfig) -> Path:
    if not task.data_dir:
        layout = LAYOUTS.get(task.dataset)
        raise ConfigError(f"task {task.name!r} needs task.data_dir=PATH, a local {layout.name} copy laid out as:\n"
                          f"{layout.tree}")
    return Path(os.path.expanduser(task.data_dir))


def register_data(task: DetectionTaskConfig) -> tuple[list[str], str, list[str]]:
    """Check the layout and register every split in this process: (train names, test name, classes)."""
    layout, root = LAYOUTS.get(task.dataset), data_root(task)
    splits = [*task.train_splits, task.test_split]
    check_layout(layout, root, splits)
    classes = split_classes(layout, root, splits, task.class_names)
    names = [register_split(layout, root, split, classes) for split in splits]
    return names[:-1], names[-1], classes


def world_size(cfg: RunConfig) -> int:
    return detection_devices(cfg) * cfg.trainer.num_nodes


def detection_devices(cfg: RunConfig) -> int:
    """Processes per machine: trainer.devices, or every visible GPU for ``auto`` (one process on CPU)."""
    import torch

    if cfg.trainer.devices != "auto":
        return int(cfg.trainer.devices)
    return max(torch.cuda.device_count(), 1) if _device(cfg) == "cuda" else 1


def build_detectron2_config(cfg: RunConfig, output_dir: Path) -> CfgNode:
    """The detectron2 config of a run: model-zoo base + registry backbone + local data + overrides."""
    from detectron2 import model_zoo
    from detectron2.config import CfgNode, get_cfg

    from tasks.detection.backbone import add_transfer_backbone_config
    from transfer.backbones import BACKBONES

    task = cfg.task
    d2 = get_cfg()
    add_transfer_backbone_config(d2)
    try:
        d2.merge_from_file(model_zoo.get_config_file(task.base_config))
    except RuntimeError:
        raise ConfigError(f"task.base_config={task.base_config!r} is not a detectron2 model-zoo config. Use a path "
                          "under detectron2's configs/ folder, e.g. COCO-InstanceSegmentation/"
                          "mask_rcnn_R_50_FPN_1x.yaml.") from None
    if d2.MODEL.BACKBONE.NAME not in FPN_BUILDERS:
        raise ConfigError(f"task.base_config={task.base_config!r} uses backbone builder {d2.MODEL.BACKBONE.NAME!r}; "
                          f"registry backbones replace only the FPN builders {sorted(FPN_BUILDERS)}.")
    spec = BACKBONES.get(cfg.backbone.name)
    levels = len(spec.feature_strides)
    if task.freeze_at > levels:
        raise ConfigError(f"task.freeze_at={task.freeze_at} exceeds the {levels} levels of backbone {spec.name!r}.")

    use_registry_backbone(d2, spec.name, weights=cfg.backbone.weights, strict=cfg.backbone.strict,
                          drop_path_rate=cfg.backbone.drop_path_rate, norm=task.backbone_norm,
                          freeze_at=levels if cfg.protocol.freeze_backbone else task.freeze_at)
    if task.head_norm:
        _set_head_norm(d2, task.head_norm)

    train, test, classes = register_data(task)
    d2.DATASETS.TRAIN, d2.DATASETS.TEST = tuple(train), (test,)
    d2.MODEL.ROI_HEADS.NUM_CLASSES = d2.MODEL.RETINANET.NUM_CLASSES = len(classes)

    _apply_solver(d2, task.solver, cfg.trainer.max_steps)
    for key, value in (("MIN_SIZE_TRAIN", task.input.min_size_train), ("MAX_SIZE_TRAIN", task.input.max_size_train),
                       ("MIN_SIZE_TEST", task.input.min_size_test), ("MAX_SIZE_TEST", task.input.max_size_test)):
        if value is not None:
            d2.INPUT[key] = tuple(value) if isinstance(value, list) else value
    d2.TEST.EVAL_PERIOD = task.eval_period
    d2.MODEL.DEVICE = _device(cfg)
    d2.SOLVER.AMP.ENABLED = _amp(cfg, d2.MODEL.DEVICE)
    d2.DATALOADER.NUM_WORKERS = cfg.trainer.num_workers
    d2.TRANSFER = CfgNode({"LOG_PERIOD": cfg.trainer.log_every_n_steps})  # read by DetectionTrainer
    d2.SEED = cfg.trainer.seed
    d2.OUTPUT_DIR = str(output_dir)
    try:
        d2.merge_from_list(list(task.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"task.opts={task.opts} could not be applied to the detectron2 config: {e}") from None
    n = world_size(cfg)
    if n > 1 and d2.MODEL.DEVICE != "cuda":
        # detectron2's DefaultTrainer wraps the model in DDP with a GPU device id, which CPU modules refuse.
        raise ConfigError(f"trainer.devices x trainer.num_nodes = {n} processes on {d2.MODEL.DEVICE}: detectron2 "
                          "trains on several processes only with CUDA devices. Use trainer.devices=1 on CPU.")
    if d2.SOLVER.IMS_PER_BATCH % n:
        raise ConfigError(f"task.solver.ims_per_batch={d2.SOLVER.IMS_PER_BATCH} is not divisible by the {n} "
                          "processes (trainer.devices x trainer.num_nodes); detectron2 splits it evenly.")
    d2.freeze()
    return d2


def use_registry_backbone(d2: CfgNode, name: str, *, weights: str = "pretrained", strict: bool = True,
                          drop_path_rate: float = 0.0, norm: str = "FrozenBN", freeze_at: int = 2) -> None:
    """Swap the FPN builder of a detectron2 config for its registry-backbone twin and that backbone's normalisation."""
    from transfer.backbones import BACKBONES

    spec = BACKBONES.get(name)
    d2.MODEL.BACKBONE.NAME = FPN_BUILDERS[d2.MODEL.BACKBONE.NAME]
    d2.MODEL.WEIGHTS = ""  # the builder loads the registry weights; nothing else is loaded over them
    tb = d2.MODEL.TRANSFER_BACKBONE
    tb.NAME, tb.WEIGHTS, tb.STRICT, tb.DROP_PATH_RATE, tb.NORM = name, weights, strict, drop_path_rate, norm
    d2.MODEL.BACKBONE.FREEZE_AT = freeze_at
    # detectron2 normalises raw 0-255 pixels, in the channel order of INPUT.FORMAT.
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [255.0 * m for m in spec.mean]
    d2.MODEL.PIXEL_STD = [255.0 * s for s in spec.std]


def _set_head_norm(d2: CfgNode, norm: str) -> None:
    d2.MODEL.FPN.NORM = d2.MODEL.ROI_BOX_HEAD.NORM = d2.MODEL.ROI_MASK_HEAD.NORM = d2.MODEL.RETINANET.NORM = norm
    if d2.MODEL.ROI_BOX_HEAD.NUM_CONV == 0:
        # Norms act on convolutions; with a norm the box head becomes 4 conv + 1 fc, as in detectron2's
        # configs/Misc/mask_rcnn_R_50_FPN_3x_gn.yaml and mask_rcnn_R_50_FPN_3x_syncbn.yaml.
        d2.MODEL.ROI_BOX_HEAD.NUM_CONV, d2.MODEL.ROI_BOX_HEAD.NUM_FC = 4, 1


def _apply_solver(d2: CfgNode, solver: SolverConfig, max_steps: int) -> None:
    for key, value in (("IMS_PER_BATCH", solver.ims_per_batch), ("BASE_LR", solver.base_lr),
                       ("MAX_ITER", solver.max_iter), ("WARMUP_ITERS", solver.warmup_iters),
                       ("WEIGHT_DECAY", solver.weight_decay), ("MOMENTUM", solver.momentum)):
        if value is not None:
            d2.SOLVER[key] = value
    if solver.steps is not None:
        d2.SOLVER.STEPS = tuple(solver.steps)
    d2.SOLVER.CHECKPOINT_PERIOD = solver.checkpoint_period
    if max_steps > 0:
        # trainer.max_steps shortens the schedule and keeps its shape: LR drops and warmup scale with it.
        scale = max_steps / d2.SOLVER.MAX_ITER
        # detectron2's scheduler needs strictly increasing drops before the last iteration.
        steps = {max(1, round(s * scale)) for s in d2.SOLVER.STEPS}
        d2.SOLVER.STEPS = tuple(sorted(s for s in steps if s < max_steps))
        d2.SOLVER.WARMUP_ITERS = round(d2.SOLVER.WARMUP_ITERS * scale)
        d2.SOLVER.MAX_ITER = max_steps


def _device(cfg: RunConfig) -> str:
    from transfer.engine import resolve_accelerator

    device = resolve_accelerator(cfg.trainer)
    return "cuda" if device in ("cuda", "gpu") else device


def _amp(cfg: RunConfig, device: str) -> bool:
    """detectron2's AMP trainer runs float16 with a grad scaler on CUDA; other precisions run float32."""
    precision = cfg.trainer.precision
    if precision == "auto":
        return device == "cuda"
    if precision in ("32", "32-true"):
        return False
    if precision == "16-mixed" and device == "cuda":
        return True
    raise ConfigError(f"trainer.precision={precision!r} is not available for detection on {device}: detectron2 "
                      "trains in float32 or, on CUDA, float16 mixed precision. Use trainer.precision=auto, 32 or "
                      "16-mixed.")
