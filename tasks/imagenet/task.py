"""ImageNet-1k evaluation of a backbone's own classifier: are these weights what they claim to be?

``python -m transfer.run task=imagenet backbone=rs152 task.data_dir=/data/imagenet`` reports
``val/top1`` and ``val/top5`` at the checkpoint's own test resolution and crop, next to the published
top-1 of the registry entry (``published/top1``).

Under DDP the images are padded to a multiple of the number of processes with placeholders
(:class:`transfer.images.PaddedToRanks`), so no image is scored twice. Images that fail to decode are
skipped, named in the log, counted (``counts.undecodable_images``) and checked against
``task.max_bad_fraction``; ``counts.images_scored`` is what the accuracy is over.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from timm.data import create_transform
from torchmetrics.classification import MulticlassAccuracy

from tasks.imagenet.config import ImageNetTaskConfig
from tasks.imagenet.data import WNIDS, build_imagenet
from transfer.backbones import BACKBONES, build_backbone_from_config
from transfer.engine import build_trainer
from transfer.errors import DataError, WeightsError
from transfer.images import PaddedToRanks, collate_images, gather_names, unpack
from transfer.loaders import build_loader
from transfer.tasks import RunContext, TaskOutput

log = logging.getLogger(__name__)


class ClassifierEval(L.LightningModule):
    """Top-1 and top-5 accuracy (percent) of a model that outputs ImageNet-1k logits."""

    def __init__(self, model: torch.nn.Module, split: str):
        super().__init__()
        self.model, self.split = model, split
        self.top1 = MulticlassAccuracy(num_classes=len(WNIDS), top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=len(WNIDS), top_k=5, average="micro")
        self.undecodable: set[str] = set()  # gathered over processes at the end
        self.scored = 0  # images scored, over all processes, after the epoch
        self.hits = {1: 0, 5: 0}  # images whose class is among the top k logits, over all processes after the epoch
        self.percent: dict[str, float] = {}  # {split}/top{k}: hits / scored * 100 in float64 (Lightning logs float32)

    def test_step(self, batch, batch_idx) -> None:
        x, y, undecodable = unpack(batch)
        self.undecodable.update(undecodable)
        self.scored += len(y)
        if not len(x):
            return
        logits = self.model(x).float()  # (B, 3, H, W) -> (B, 1000)
        self.top1.update(logits, y)
        self.top5.update(logits, y)
        ranked = logits.topk(5, dim=1).indices == y[:, None]  # (B, 5)
        self.hits[1] += int(ranked[:, 0].sum())
        self.hits[5] += int(ranked.any(1).sum())

    def on_test_epoch_end(self) -> None:
        # torchmetrics sums its states over processes in compute(); the padding placeholders never reach it.
        self.log(f"{self.split}/top1", 100.0 * self.top1.compute(), sync_dist=False)
        self.log(f"{self.split}/top5", 100.0 * self.top5.compute(), sync_dist=False)
        total = lambda n: int(self.trainer.strategy.reduce(torch.tensor(n, device=self.device), reduce_op="sum"))  # noqa: E731
        self.scored = total(self.scored)
        self.hits = {k: total(n) for k, n in self.hits.items()}
        if self.scored:  # counts divided in float64: float32 would leave noise in the seventh digit
            self.percent = {f"{self.split}/top{k}": 100.0 * n / self.scored for k, n in self.hits.items()}
        self.undecodable = gather_names(self.undecodable)


def run(ctx: RunContext) -> TaskOutput:
    cfg, task = ctx.cfg, ctx.cfg.task
    dataset, counts = build_imagenet(task.data_dir, split=task.split, allow_partial=task.allow_partial,
                                     max_pixels=task.max_image_pixels)
    try:
        backbone = build_backbone_from_config(cfg.backbone, keep_classifier=True)
    except WeightsError as e:
        raise WeightsError(f"{e} task=imagenet evaluates the weights' own 1000-class ImageNet classifier "
                           f"({BACKBONES.get(cfg.backbone.name).classifier_prefix}*), so the file must include "
                           "it.") from None
    resolution = task.resolution or backbone.spec.test_res
    data_config = backbone.data_config(resolution=resolution)
    dataset.transform = create_transform(**data_config, is_training=False)
    module = ClassifierEval(backbone, task.split)
    trainer = build_trainer(ctx)
    # Padded to the world size: the sampler Lightning adds repeats no image.
    loader = build_loader(PaddedToRanks(dataset, trainer.world_size), batch_size=cfg.trainer.eval_batch_size,
                          num_workers=cfg.trainer.num_workers, train=False, collate_fn=collate_images)
    tested = trainer.test(module, dataloaders=loader, verbose=False)
    _check_damage(module.undecodable, len(dataset), task)
    counts.update(undecodable_images=len(module.undecodable), images_scored=module.scored)
    metrics = {k: module.percent.get(k, float(v)) for k, v in tested[0].items()}
    published = backbone.spec.top1
    if published is not None:
        metrics["published/top1"] = published
        metrics[f"{task.split}/top1_minus_published"] = metrics[f"{task.split}/top1"] - published
    partial = [f"task.allow_partial=true: {counts['classes']} of {len(WNIDS)} ImageNet-1k classes evaluated"] \
        if counts.get("classes", len(WNIDS)) < len(WNIDS) else []
    return TaskOutput(metrics=metrics, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric=f"{task.split}/top1",
                      extra={"resolution": resolution, "data_config": data_config,
                             # matched against the baselines' checkpoint condition (transfer.compare)
                             "checkpoint": backbone.spec.checkpoint or f"registry entry {backbone.spec.name}",
                             "published_top1_source": backbone.spec.source,
                             **({"not_comparable": partial} if partial else {})})


def _check_damage(undecodable: set[str], total: int, task: ImageNetTaskConfig) -> None:
    if not undecodable:
        return
    examples = sorted(undecodable)[:5]
    if len(undecodable) > task.max_bad_fraction * total:
        raise DataError(f"{task.data_dir}: {len(undecodable)} of {total} images could not be decoded, more than "
                        f"task.max_bad_fraction={task.max_bad_fraction}; e.g. {examples}. Re-download the damaged "
                        "files, or raise task.max_bad_fraction to score the rest.")
    log.warning("%s: skipped %d undecodable image(s) of %d, e.g. %s", task.data_dir, len(undecodable), total, examples)
