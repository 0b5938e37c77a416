"""Semantic-segmentation transfer runs: detectron2's trainer and ``SemSegEvaluator``, started through ``launch``.

The launching process checks the configuration, scans the splits and resolves the weights, then
``launch`` runs :func:`train_worker` once per device. The detection package provides the pieces both
tasks share: the trainer's log-period hook, the multi-machine launch settings and the reading of
detectron2's ``metrics.json`` (:mod:`tasks.detection.train`).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import launch
from detectron2.evaluation import SemSegEvaluator
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from tasks.detection import backbone as _registers_fpn_builders  # noqa: F401  (BACKBONE_REGISTRY entries)
from tasks.detection.schema import detection_devices
from tasks.detection.train import DetectionTrainer, launch_settings, log_training, read_metrics_log
from tasks.segmentation.config import SegmentationInputConfig, build_segmentation_config, data_root, is_frozen
from tasks.segmentation.data import IGNORE, LAYOUTS, SplitList, layout_classes, read_targets, register_split, scan_split
from transfer.backbones import build_backbone_from_config
from transfer.engine import CHECKPOINT_DIR
from transfer.errors import DataError, TransferError
from transfer.images import ImageDecodeError, decode_image
from transfer.io import atomic_write_json
from transfer.tasks import RunContext, TaskOutput
from transfer.tracking import is_global_zero

METRICS_LOG = "metrics.json"
# Recorded as extra.head: the published VOC rows' condition head=... tells a Semantic FPN run from their FCN.
HEAD = "semantic_fpn"
START_RECORD = "transfer_start.json"  # where this process's training started (iteration, checkpoint)
# SemSegEvaluator's scalars (percent) -> suite metric keys.
METRIC_KEYS = {"mIoU": "test/miou", "fwIoU": "test/fwiou", "mACC": "test/mean_acc", "pACC": "test/pixel_acc"}


class RandomRescale(T.Augmentation):
    """Resize by a ratio drawn uniformly from ``ratio``, relative to the image (``target`` None) or to the
    size that fits it into ``target`` = (short, long) keeping its aspect ratio (mmsegmentation's
    ``RandomResize(scale=(long, short), ratio_range=...)``). detectron2 has no ratio-of-own-size resize."""

    def __init__(self, ratio: tuple[float, float], target: tuple[int, int] | None = None):
        super().__init__()
        self.ratio, self.target = ratio, target

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        base = 1.0 if self.target is None else min(self.target[0] / min(h, w), self.target[1] / max(h, w))
        scale = base * random.uniform(*self.ratio)
        return T.ResizeTransform(h, w, max(1, round(h * scale)), max(1, round(w * scale)))


def build_augmentations(cfg: SegmentationInputConfig, *, train: bool) -> list[T.Augmentation]:
    if not train:
        target = cfg.test_target
        return [RandomRescale((1.0, 1.0), tuple(target))] if target else []
    augs: list[T.Augmentation] = [RandomRescale(tuple(cfg.train_ratio), tuple(cfg.train_target) if cfg.train_target
                                                else None),
                                  T.RandomCrop_CategoryAreaConstraint("absolute", tuple(cfg.crop), cfg.cat_max_ratio,
                                                                      IGNORE)]
    if cfg.flip:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    return augs


class SemSegMapper:
    """A dataset record -> the model input: RGB image tensor (3, H, W) 0-255 and ``sem_seg`` (H, W) int64.

    Labels are read by the data set's layout (palette PNG, SBD ``.mat``, ADE20K's shift by one), so the
    model always sees classes 0..K-1 and 255 for pixels that are not scored. A file that no longer
    decodes (the scan only parsed its header) stops the run with its name.
    """

    def __init__(self, layout_name: str, augmentations: list[T.Augmentation], *, train: bool = True,
                 num_classes: int):
        self.layout, self.num_classes = LAYOUTS.get(layout_name), num_classes
        self.augmentations = T.AugmentationList(augmentations)
        self.train = train  # the evaluator reads test labels itself, at their own size

    def __call__(self, record: dict) -> dict:
        try:
            image = np.asarray(decode_image(record["file_name"]))  # (H, W, 3) uint8, every mode, EXIF applied
            label = read_targets(self.layout, record["sem_seg_file_name"], self.num_classes) if self.train else None
        except (OSError, ImageDecodeError) as e:
            raise DataError(f"{record['file_name']} or its label {record['sem_seg_file_name']} no longer decodes "
                            f"({type(e).__name__}: {e}); replace the file or remove it from the split list.") from None
        aug = T.AugInput(image, sem_seg=label)
        self.augmentations(aug)
        out = {**record, "image": torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))}  # (3, H, W)
        if self.train:
            out["sem_seg"] = torch.as_tensor(aug.sem_seg.astype(np.int64))  # (H, W)
        return out


def _layout_of(dataset_name: str) -> str:
    return MetadataCatalog.get(dataset_name).transfer_layout


def _num_classes(dataset_name: str) -> int:
    return len(MetadataCatalog.get(dataset_name).stuff_classes)


class SegmentationTrainer(DetectionTrainer):
    """detectron2's DefaultTrainer (with the detection package's log period) for Semantic FPN.

    Train and test loaders map records through :class:`SemSegMapper`; the evaluator is detectron2's
    ``SemSegEvaluator`` reading labels the way the layout does; the poly schedule is the DeepLab
    project's ``WarmupPolyLR`` (detectron2 core has only step and cosine schedules).
    """

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        name = cfg.DATASETS.TRAIN[0]
        mapper = SemSegMapper(_layout_of(name), build_augmentations(cfg.TRANSFER.INPUT, train=True),
                              num_classes=_num_classes(name))
        return build_detection_train_loader(DatasetCatalog.get(name), mapper=mapper,
                                            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=False,
                                            num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = SemSegMapper(_layout_of(dataset_name), build_augmentations(cfg.TRANSFER.INPUT, train=False),
                              train=False, num_classes=_num_classes(dataset_name))
        return build_detection_test_loader(DatasetCatalog.get(dataset_name), mapper=mapper,
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str):
        return build_evaluator(dataset_name, Path(cfg.OUTPUT_DIR) / "inference")

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def build_evaluator(dataset_name: str, output_dir: Path | None = None) -> SemSegEvaluator:
    """detectron2's SemSegEvaluator (confusion matrix over every pixel of the split) with the layout's labels,
    each checked by :func:`tasks.segmentation.data.check_targets` (a value outside the classes and 255 raises
    DataError naming the file, rather than counting as a class of its own)."""
    layout, num_classes = LAYOUTS.get(_layout_of(dataset_name)), _num_classes(dataset_name)

    def load(path: str, dtype=int) -> np.ndarray:
        return read_targets(layout, path, num_classes).astype(dtype)

    return SemSegEvaluator(dataset_name, output_dir=str(output_dir) if output_dir else None, sem_seg_loading_fn=load)


def train_worker(d2cfg: CfgNode, layout_name: str, data_dir: str, splits: list[SplitList], classes: list[str],
                 resume: bool) -> SegmentationTrainer:
    """One process of a (possibly distributed) run: register the scanned splits, train, evaluate at the end."""
    layout = LAYOUTS.get(layout_name)
    for listed in splits:  # detectron2's catalogs live in each process; the scan is not repeated
        register_split(layout, Path(data_dir), listed, classes)
    seed_all_rng(None if d2cfg.SEED < 0 else d2cfg.SEED + comm.get_rank())
    if comm.is_main_process():
        Path(d2cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(d2cfg.OUTPUT_DIR) / "config.yaml").write_text(d2cfg.dump())
    trainer = SegmentationTrainer(d2cfg)
    resumed_from = trainer.checkpointer.get_checkpoint_file() if resume and trainer.checkpointer.has_checkpoint() \
        else None
    trainer.resume_or_load(resume=resume)
    if comm.is_main_process():  # read back by run(): results.json says where training (re)started
        atomic_write_json(Path(d2cfg.OUTPUT_DIR) / START_RECORD,
                          {"start_iter": trainer.start_iter, "resumed_from": resumed_from})
    trainer.train()
    return trainer


def split_metrics(record: dict) -> tuple[dict[str, float], dict[str, dict[str, float]], list[str]]:
    """``sem_seg/*`` scalars of one metrics.json record -> (headline metrics, per-class IoU/accuracy, absent).

    A class with no labelled pixel in the evaluation split has no IoU (detectron2 reports NaN and leaves
    it out of the mean); those classes are listed, not reported as numbers.
    """
    metrics, per_class, absent = {}, {"iou": {}, "acc": {}}, []
    for key, value in record.items():
        task, _, name = key.partition("/")
        if task != "sem_seg" or not isinstance(value, (int, float)):
            continue
        if name in METRIC_KEYS:
            metrics[METRIC_KEYS[name]] = float(value)
        for prefix, kind in (("IoU-", "iou"), ("ACC-", "acc")):
            if name.startswith(prefix):
                cls = name[len(prefix):]
                if math.isnan(value):
                    if kind == "iou":
                        absent.append(cls)
                else:
                    per_class[kind][cls] = float(value)
    return metrics, per_class, absent


def not_comparable(cfg, layout, train: SplitList, max_iter: int) -> dict[str, list[str]]:
    """``extra.not_comparable`` (read by :mod:`transfer.compare`): a subset, another training set, another
    schedule length. Empty when the run followed its recipe on the full data."""
    task, reasons = cfg.task, []
    if task.limit_per_split is not None:
        reasons.append(f"task.limit_per_split={task.limit_per_split}: a subset of each split")
    resolved = train.note.split(" ", 1)[0] or train.name
    if layout.published_train and resolved != layout.published_train:
        reasons.append(f"trained on {train.note or train.name}; the published protocol trains on "
                       f"{layout.published_train}")
    if max_iter != task.solver.max_iter:
        reasons.append(f"trainer.max_steps={max_iter} replaces the recipe's {task.solver.max_iter} iterations")
    return {"not_comparable": reasons} if reasons else {}


def scan(cfg) -> tuple[list[SplitList], list[str]]:
    """Scan the training and evaluation splits (the evaluation split fully decoded) -> (splits, classes)."""
    task = cfg.task
    layout, root = LAYOUTS.get(task.dataset), data_root(task)
    if not root.is_dir():
        raise DataError(f"task.data_dir={str(root)!r} is not a directory. Point it at a {layout.name} copy laid "
                        f"out as:\n{layout.tree}")
    classes = list(layout_classes(layout))
    train = scan_split(layout, root, task.train_split, decode=False, max_bad_fraction=task.max_bad_fraction,
                       limit=task.limit_per_split)
    test = scan_split(layout, root, task.test_split, decode=True, max_bad_fraction=task.max_bad_fraction,
                      limit=task.limit_per_split, num_classes=len(classes))
    return [train, test], classes


def run(ctx: RunContext) -> TaskOutput:
    """Train Semantic FPN on the registry backbone and evaluate mIoU on the test split."""
    cfg = ctx.cfg
    task = cfg.task
    (train, test), classes = scan(cfg)  # data first: a missing or damaged copy fails before model work
    layout = LAYOUTS.get(task.dataset)
    names = [register_split(layout, data_root(task), s, classes) for s in (train, test)]
    output_dir = ctx.run_dir / CHECKPOINT_DIR
    d2cfg = build_segmentation_config(cfg, output_dir, *names)
    # Resolve (and download) the weights once here, so a bad source fails with one message, not per process.
    weights = build_backbone_from_config(cfg.backbone).weights
    machine_rank, dist_url = launch_settings(cfg.trainer.num_nodes)
    launch(train_worker, detection_devices(cfg), num_machines=cfg.trainer.num_nodes, machine_rank=machine_rank,
           dist_url=dist_url, args=(d2cfg, task.dataset, str(data_root(task)), [train, test], classes, cfg.resume))
    counts = {**train.counts("train"), **test.counts("test")}
    if not is_global_zero():
        return TaskOutput(metrics={}, weights=weights.as_dict(), counts=counts)
    records = read_metrics_log(output_dir / METRICS_LOG)
    log_training(records, ctx.logger)
    evaluated = [r for r in records if "sem_seg/mIoU" in r]
    if not evaluated:
        raise TransferError(f"detectron2 wrote no evaluation to {str(output_dir / METRICS_LOG)!r}; see its log above.")
    metrics, per_class, absent = split_metrics(evaluated[-1])
    start = json.loads((output_dir / START_RECORD).read_text())
    if "test/miou" not in metrics:
        raise TransferError(f"the evaluation in {str(output_dir / METRICS_LOG)!r} has no mIoU: no test pixel carried "
                            "a class label (all 255). Check the test split's label files.")
    ctx.logger.log(metrics, step=int(evaluated[-1].get("iteration", d2cfg.SOLVER.MAX_ITER)))
    if per_class["iou"]:
        ctx.logger.table("test/per_class_iou", ["class", "iou", "acc"],
                         [[c, v, per_class["acc"].get(c)] for c, v in per_class["iou"].items()])
    recipe = {"architecture": "Semantic FPN (detectron2 SemanticSegmentor + SemSegFPNHead)",
              "freeze_backbone": is_frozen(cfg), "train_split": train.note,
              "train_images": len(train.pairs), "test_split": test.note, "test_images": len(test.pairs),
              "ims_per_batch": d2cfg.SOLVER.IMS_PER_BATCH, "base_lr": d2cfg.SOLVER.BASE_LR,
              "max_iter": d2cfg.SOLVER.MAX_ITER, "lr_scheduler": d2cfg.SOLVER.LR_SCHEDULER_NAME,
              "steps": list(d2cfg.SOLVER.STEPS), "weight_decay": d2cfg.SOLVER.WEIGHT_DECAY,
              "momentum": d2cfg.SOLVER.MOMENTUM, "warmup_iters": d2cfg.SOLVER.WARMUP_ITERS,
              "freeze_at": d2cfg.MODEL.BACKBONE.FREEZE_AT, "backbone_norm": task.backbone_norm,
              "head_norm": task.head_norm, "input": dict(d2cfg.TRANSFER.INPUT), "amp": d2cfg.SOLVER.AMP.ENABLED}
    return TaskOutput(metrics=metrics, weights=weights.as_dict(), primary_metric="test/miou",
                      counts={**counts, "test/absent_classes": len(absent)}, recipe=recipe,
                      extra={"head": HEAD, **not_comparable(cfg, layout, train, d2cfg.SOLVER.MAX_ITER),
                             "per_class_iou": per_class["iou"], "per_class_acc": per_class["acc"],
                             "absent_classes": absent, "classes": len(classes),
                             "detectron2_config": str(output_dir / "config.yaml"), **start,
                             "scan_examples": (train.examples + test.examples)[:20]})
