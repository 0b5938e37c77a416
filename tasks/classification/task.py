"""The classification adapter: linear probe and k-NN on cached features, or full fine-tuning."""
from __future__ import annotations

import dataclasses
import logging
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from timm.data import create_transform
from torch.utils.data import ConcatDataset

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS, Splits, Transformed
from tasks.classification.features import cache_key, cached_features
from tasks.classification.finetune import ClassificationData, FinetuneModule
from tasks.classification.linear import fit_logistic, l2_grid, sweep_l2
from tasks.classification.metrics import SCORERS, classification_metrics
from transfer.backbones import Backbone, build_backbone
from transfer.engine import (
    autocast_dtype,
    build_trainer,
    progress_of,
    resolve_accelerator,
    resume_path,
    seed_everything,
)
from transfer.protocols import FinetuneProtocolConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput

log = logging.getLogger(__name__)


def _build(ctx: RunContext) -> tuple[Backbone, Splits, int]:
    cfg = ctx.cfg
    seed_everything(cfg.trainer)
    splits = DATASETS.get(cfg.task.dataset)(cfg.task)  # data first: a missing data set fails before model work
    backbone = _backbone(ctx)
    resolution = cfg.task.resolution or backbone.spec.test_res
    return backbone, splits, resolution


def eval_transform(backbone: Backbone, resolution: int):
    return create_transform(**backbone.data_config(resolution=resolution), is_training=False)


def _weights_id(ctx: RunContext, backbone: Backbone) -> str:
    w = backbone.weights
    return w.sha256 or f"{w.source}-seed{ctx.cfg.trainer.seed}"


def _features(ctx: RunContext, backbone: Backbone, splits: Splits, resolution: int) -> dict:
    """Features of train, val and test, each from the cache when present."""
    cfg = ctx.cfg
    accelerator = resolve_accelerator(cfg.trainer)
    device = torch.device("cuda" if accelerator in ("cuda", "gpu") else "cpu")
    transform = eval_transform(backbone, resolution)
    out, hits = {}, 0
    for split in ("train", "val", "test"):
        key = cache_key(backbone=cfg.backbone.name, weights=_weights_id(ctx, backbone), dataset=cfg.task.name,
                        source=f"{cfg.task.data_dir}|{cfg.task.hub_id}|{cfg.task.limit_per_split}",
                        split=split, resolution=resolution, transform=transform, size=len(getattr(splits, split)),
                        held_out=f"{splits.val_held_out}-{cfg.task.val_fraction}-{cfg.task.split_seed}")
        feats, labels, hit = cached_features(
            backbone, Transformed(getattr(splits, split), transform), key=key,
            cache_dir=ctx.cache_dir if cfg.protocol.cache else None, batch_size=cfg.trainer.eval_batch_size,
            num_workers=cfg.trainer.num_workers, device=device, dtype=autocast_dtype(cfg.trainer, accelerator),
            channels_last=cfg.trainer.channels_last, desc=f"features {split}")
        hits += hit
        out[split] = (feats.to(device), labels.to(device))
    log.info("features: %d of 3 splits read from the cache", hits)
    out["cache_hits"] = hits
    return out


def run_linear(ctx: RunContext) -> TaskOutput:
    backbone, splits, resolution = _build(ctx)
    feats = _features(ctx, backbone, splits, resolution)
    p, task = ctx.cfg.protocol, ctx.cfg.task
    fit = dict(max_iter=p.max_iter, tolerance=p.tolerance)
    chosen, curve = sweep_l2(feats["train"], feats["val"], splits.num_classes,
                             l2_grid(p.l2_min, p.l2_max, p.l2_steps), SCORERS[task.metric], **fit)
    best = chosen.l2
    trainval = tuple(torch.cat([feats["train"][i], feats["val"][i]]) for i in range(2))
    model = fit_logistic(*trainval, splits.num_classes, best, init=chosen, **fit)  # warm: the train-only fit
    metrics = classification_metrics(model.logits(feats["test"][0]), feats["test"][1], splits.num_classes, "test")
    metrics["val/best"] = max(score for _, score in curve)
    ctx.logger.table("linear/l2_sweep", ["l2", f"val/{task.metric}"], [list(c) for c in curve])
    return TaskOutput(metrics=metrics, counts={**splits.counts, "feature_cache_hits": feats["cache_hits"]},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"best_l2": best, "l2_curve": curve, "resolution": resolution})


def run_knn(ctx: RunContext) -> TaskOutput:
    from tasks.classification.knn import knn_predict

    backbone, splits, resolution = _build(ctx)
    feats = _features(ctx, backbone, splits, resolution)
    p, task = ctx.cfg.protocol, ctx.cfg.task
    bank = tuple(torch.cat([feats["train"][i], feats["val"][i]]) for i in range(2))
    scores = knn_predict(bank[0], bank[1], feats["test"][0], splits.num_classes, k=p.k, temperature=p.temperature)
    metrics = classification_metrics(scores, feats["test"][1], splits.num_classes, "test")
    return TaskOutput(metrics=metrics, counts={**splits.counts, "feature_cache_hits": feats["cache_hits"]},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"resolution": resolution})


def _backbone(ctx: RunContext) -> Backbone:
    b = ctx.cfg.backbone
    return build_backbone(b.name, weights=b.weights, strict=b.strict, drop_path_rate=b.drop_path_rate)


def _fit(ctx: RunContext, backbone: Backbone, splits: Splits, resolution: int, protocol: FinetuneProtocolConfig, *,
         subdir: str = "", final: bool = False) -> tuple[FinetuneModule, L.Trainer, ClassificationData, str | None]:
    """Fine-tune ``backbone`` with ``protocol``: on train (val picks the best epoch) or, ``final``, on train+val."""
    cfg = ctx.cfg
    train_tf = create_transform(**backbone.data_config(train=True, resolution=resolution), is_training=True,
                                auto_augment=protocol.randaugment)
    test_tf = eval_transform(backbone, resolution)
    train = ConcatDataset([splits.train, splits.val]) if final else splits.train
    data = ClassificationData(Transformed(train, train_tf), Transformed(splits.val, test_tf),
                              Transformed(splits.test, test_tf), batch_size=cfg.trainer.batch_size,
                              eval_batch_size=cfg.trainer.eval_batch_size, num_workers=cfg.trainer.num_workers)
    module = FinetuneModule(backbone, splits.num_classes, protocol)
    callbacks = [EMAWeightAveraging(decay=protocol.ema_decay)] if protocol.ema_decay else []
    if final:  # val is training data now: keep the last epoch, skip validation
        trainer = build_trainer(ctx, callbacks=callbacks, monitor="train/loss_epoch", mode="min", subdir=subdir,
                                limit_val_batches=0)
    else:
        trainer = build_trainer(ctx, callbacks=callbacks, monitor=f"val/{cfg.task.metric}", subdir=subdir)
    resumed_from = resume_path(ctx, subdir)
    trainer.fit(module, datamodule=data, ckpt_path=resumed_from)
    return module, trainer, data, resumed_from


def _sweep(ctx: RunContext, splits: Splits, resolution: int) -> tuple[FinetuneProtocolConfig, list[list[float]]]:
    """Train every (lr, weight decay) of the grid on train; the pair with the best val metric wins."""
    p = ctx.cfg.protocol
    rows = []
    for lr in p.lr_grid:
        for wd in p.wd_grid:
            candidate = dataclasses.replace(p, lr=lr, weight_decay=wd, sweep=False)
            _, trainer, _, _ = _fit(ctx, _backbone(ctx), splits, resolution, candidate,
                                    subdir=f"sweep/lr{lr:g}-wd{wd:g}")
            score = trainer.checkpoint_callback.best_model_score
            rows.append([lr, wd, float(score) if score is not None else float("nan")])
            log.info("finetune sweep lr=%g wd=%g: val/%s %.2f", lr, wd, ctx.cfg.task.metric, rows[-1][2])
    lr, wd, _ = max(rows, key=lambda r: float("-inf") if math.isnan(r[2]) else r[2])
    return dataclasses.replace(p, lr=lr, weight_decay=wd, sweep=False), rows


def run_finetune(ctx: RunContext) -> TaskOutput:
    backbone, splits, resolution = _build(ctx)
    cfg = ctx.cfg
    extra: dict = {"resolution": resolution}
    if cfg.protocol.sweep:
        best, rows = _sweep(ctx, splits, resolution)
        ctx.logger.table("finetune/sweep", ["lr", "weight_decay", f"val/{cfg.task.metric}"], rows)
        extra.update(best_lr=best.lr, best_weight_decay=best.weight_decay, sweep=rows)
        module, trainer, data, resumed_from = _fit(ctx, backbone, splits, resolution, best, subdir="final",
                                                   final=True)
        tested = trainer.test(module, datamodule=data, verbose=False)
    else:
        module, trainer, data, resumed_from = _fit(ctx, backbone, splits, resolution, cfg.protocol)
        tested = trainer.test(module, datamodule=data, ckpt_path="best", verbose=False)
    metrics = {k: float(v) for k, v in tested[0].items()} if tested else {}
    if cfg.protocol.sweep:
        metrics[f"val/best_{cfg.task.metric}"] = max(r[2] for r in extra["sweep"])
    return TaskOutput(metrics=metrics, counts=dict(splits.counts), weights=backbone.weights.as_dict(),
                      primary_metric=f"test/{cfg.task.metric}", extra={**extra, "resumed_from": resumed_from,
                             **progress_of(trainer)})


PROTOCOL_RUNNERS = {"linear": run_linear, "knn": run_knn, "finetune": run_finetune}


def run(ctx: RunContext) -> TaskOutput:
    return PROTOCOL_RUNNERS[ctx.cfg.protocol.name](ctx)


TASKS.add("classification", TaskAdapter(config_class=ClassificationTaskConfig, run=run,
                                        protocols=tuple(PROTOCOL_RUNNERS),
                                        metrics=("test/top1", "test/top5", "test/mean_per_class")))
