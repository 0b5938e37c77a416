"""ImageNet-1k evaluation of a backbone's own classifier: are these weights what they claim to be?

``python -m transfer.run task=imagenet backbone=rs152 task.data_dir=/data/imagenet`` reports
``val/top1`` and ``val/top5`` at the checkpoint's own test resolution and crop, next to the published
top-1 of the registry entry (``published/top1``).
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from tasks.imagenet.data import EXPECTED_TREE, WNIDS, build_imagenet
from transfer.backbones import BACKBONES, build_backbone
from transfer.engine import build_trainer, seed_everything
from transfer.errors import ConfigError, WeightsError
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput

SPLITS = ("val", "train")


@dataclass
class ImageNetTaskConfig:
    name: str = "imagenet"
    adapter: str = "imagenet"
    data_dir: str | None = None  # val/<wnid>/*.JPEG tree, or a Hugging Face copy of ILSVRC/imagenet-1k
    split: str = "val"
    resolution: int | None = None  # default: the checkpoint's own test resolution
    allow_partial: bool = False  # evaluate even when some of the 1000 class folders are missing

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ConfigError(f"task=imagenet needs task.data_dir=PATH, a local copy of ImageNet-1k:\n{EXPECTED_TREE}")
        if self.split not in SPLITS:
            raise ConfigError(f"task.split={self.split!r}; valid: {', '.join(SPLITS)}.")
        if self.resolution is not None and self.resolution < 32:
            raise ConfigError(f"task.resolution={self.resolution} is too small; use 32 or more, or leave it unset.")


class ClassifierEval(L.LightningModule):
    """Top-1 and top-5 accuracy (percent) of a model that outputs ImageNet-1k logits."""

    def __init__(self, model: torch.nn.Module, split: str):
        super().__init__()
        self.model, self.split = model, split
        self.top1 = MulticlassAccuracy(num_classes=len(WNIDS), top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=len(WNIDS), top_k=5, average="micro")

    def test_step(self, batch, batch_idx) -> None:
        x, y = batch
        logits = self.model(x).float()  # (B, 3, H, W) -> (B, 1000)
        self.top1.update(logits, y)
        self.top5.update(logits, y)

    def on_test_epoch_end(self) -> None:
        self.log(f"{self.split}/top1", 100.0 * self.top1.compute(), sync_dist=False)
        self.log(f"{self.split}/top5", 100.0 * self.top5.compute(), sync_dist=False)


def run(ctx: RunContext) -> TaskOutput:
    cfg, task = ctx.cfg, ctx.cfg.task
    seed_everything(cfg.trainer)
    dataset, counts = build_imagenet(task.data_dir, split=task.split, allow_partial=task.allow_partial)
    try:
        backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, strict=cfg.backbone.strict,
                                  keep_classifier=True)
    except WeightsError as e:
        raise WeightsError(f"{e} task=imagenet evaluates the weights' own 1000-class ImageNet classifier "
                           f"({BACKBONES.get(cfg.backbone.name).classifier_prefix}*), so the file must include "
                           "it.") from None
    resolution = task.resolution or backbone.spec.test_res
    data_config = backbone.data_config(resolution=resolution)
    dataset.transform = create_transform(**data_config, is_training=False)
    loader = DataLoader(dataset, batch_size=cfg.trainer.eval_batch_size, num_workers=cfg.trainer.num_workers,
                        shuffle=False, pin_memory=torch.cuda.is_available())
    module = ClassifierEval(backbone, task.split)
    trainer = build_trainer(ctx)
    tested = trainer.test(module, dataloaders=loader, verbose=False)
    metrics = {k: float(v) for k, v in tested[0].items()}
    published = backbone.spec.top1
    if published is not None:
        metrics["published/top1"] = published
        metrics[f"{task.split}/top1_minus_published"] = metrics[f"{task.split}/top1"] - published
    partial = [f"task.allow_partial=true: {counts['classes']} of {len(WNIDS)} ImageNet-1k classes evaluated"] \
        if counts.get("classes", len(WNIDS)) < len(WNIDS) else []
    return TaskOutput(metrics=metrics, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric=f"{task.split}/top1",
                      extra={"resolution": resolution, "data_config": data_config,
                             "published_top1_source": backbone.spec.source,
                             **({"not_comparable": partial} if partial else {})})


TASKS.add("imagenet", TaskAdapter(config_class=ImageNetTaskConfig, run=run, protocols=("eval",),
                                  metrics=tuple(f"{s}/top{k}" for s in SPLITS for k in (1, 5))))
