"""The classification adapter: linear probe and k-NN on cached features, or full fine-tuning.

Linear probe and k-NN extract features in one process (under a multi-process launch each process does the
same work and rank 0 writes the results); fine-tuning runs DDP through Lightning, with val and test padded
so that no image is scored twice (``tasks/classification/finetune.py``).
"""
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
from tasks.classification.datasets import DATASETS, SPECS, Splits, Transformed
from tasks.classification.features import cache_key, cached_features, digest
from tasks.classification.finetune import ClassificationData, FinetuneModule
from tasks.classification.linear import fit_logistic, l2_grid, search_l2
from tasks.classification.metrics import SCORERS, classification_metrics
from tasks.classification.sources import check_damage, items_digest, labels_of
from transfer.backbones import Backbone, build_backbone
from transfer.engine import (
    autocast_dtype,
    build_trainer,
    progress_of,
    resolve_accelerator,
    resume_path,
    seed_everything,
)
from transfer.errors import ConfigError
from transfer.protocols import FinetuneProtocolConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput

log = logging.getLogger(__name__)
FROZEN = ("linear", "knn")
# Data sets of the SimCLR (arXiv 2002.05709, Table 8 / App. B.8), BYOL (arXiv 2006.07733, Table 3 / App. D.2) and
# ssl-transfer (linear.py) many-shot tables: their frozen-feature rows use the "paper" preprocessing.
PAPER_DATASETS = frozenset(SPECS)
# SimCLR App. B.8 / BYOL App. D.2 / ssl-transfer linear.py: resize the shorter side to 224 (bicubic), centre-crop 224.
PAPER_RESOLUTION = 224


def preprocess_of(cfg) -> str:
    """``paper`` or ``checkpoint``: ``task.preprocess``, with ``auto`` resolved by protocol and data set."""
    if cfg.task.preprocess != "auto":
        return cfg.task.preprocess
    return "paper" if cfg.protocol.name in FROZEN and cfg.task.dataset in PAPER_DATASETS else "checkpoint"


def check(cfg) -> None:
    """Checks of the whole run config that need no data (called by ``transfer.config.validate``)."""
    if cfg.task.preprocess == "paper" and cfg.protocol.name not in FROZEN:
        raise ConfigError(f"task.preprocess=paper applies to the frozen protocols ({', '.join(FROZEN)}), not "
                          f"protocol={cfg.protocol.name}; use task.preprocess=auto or checkpoint.")


def _build(ctx: RunContext) -> tuple[Backbone, Splits, int]:
    cfg = ctx.cfg
    seed_everything(cfg.trainer)
    splits = DATASETS.get(cfg.task.dataset)(cfg.task)  # data first: a missing data set fails before model work
    backbone = _backbone(ctx)
    paper = preprocess_of(cfg) == "paper"
    resolution = cfg.task.resolution or (PAPER_RESOLUTION if paper else backbone.spec.test_res)
    return backbone, splits, resolution


def eval_data_config(backbone: Backbone, resolution: int, preprocess: str = "checkpoint") -> dict:
    """timm ``create_transform`` keywords: the checkpoint's own crop, or the papers' (shorter side to
    ``resolution``, bicubic, centre crop, no margin). Mean and std always belong to the weights."""
    config = backbone.data_config(resolution=resolution)
    if preprocess == "paper":
        config.update(interpolation="bicubic", crop_pct=1.0, crop_mode="center")
    return config


def eval_transform(backbone: Backbone, resolution: int, preprocess: str = "checkpoint"):
    return create_transform(**eval_data_config(backbone, resolution, preprocess), is_training=False)


def _damage_check(ctx: RunContext, splits: Splits):
    """``check(undecodable_names)``: the images that failed at load time plus those the scan skipped, against
    ``task.max_bad_fraction`` of the images this run reads."""
    skipped = splits.counts.get("skipped_images", 0)
    total = skipped + len(splits.train) + len(splits.val) + len(splits.test)

    def check_undecodable(names) -> None:
        check_damage(bad=skipped + len(names), total=total, examples=sorted(names), what="unreadable or undecodable",
                     max_bad_fraction=ctx.cfg.task.max_bad_fraction, origin=f"task {ctx.cfg.task.name}")
    return check_undecodable


def _weights_id(ctx: RunContext, backbone: Backbone) -> str:
    w = backbone.weights
    return w.sha256 or f"{w.source}-seed{ctx.cfg.trainer.seed}"


def feature_key(ctx: RunContext, backbone: Backbone, splits: Splits, split: str, *, transform, resolution: int,
                preprocess: str, dtype: torch.dtype | None) -> dict[str, str]:
    """The feature cache key of ``split``: everything that determines its features and labels."""
    data = getattr(splits, split)
    return cache_key(backbone=ctx.cfg.backbone.name, weights=_weights_id(ctx, backbone), dataset=ctx.cfg.task.name,
                     split=split, data=splits.source_id, items=items_digest(data), labels=digest(labels_of(data)),
                     label_column=splits.label_column, classes=digest(list(splits.class_names)),
                     transform=repr(transform), resolution=resolution, preprocess=preprocess,
                     precision=str(dtype or torch.float32))


def _features(ctx: RunContext, backbone: Backbone, splits: Splits, resolution: int) -> dict:
    """Features of train, val and test, each from the cache when present (key: docs/classification.md)."""
    cfg = ctx.cfg
    accelerator = resolve_accelerator(cfg.trainer)
    device = torch.device("cuda" if accelerator in ("cuda", "gpu") else "cpu")
    preprocess = preprocess_of(cfg)
    transform = eval_transform(backbone, resolution, preprocess)
    dtype = autocast_dtype(cfg.trainer, accelerator)
    check_undecodable = _damage_check(ctx, splits)
    out, hits, undecodable = {}, 0, set()
    for split in ("train", "val", "test"):
        data = getattr(splits, split)
        labels = labels_of(data)
        key = feature_key(ctx, backbone, splits, split, transform=transform, resolution=resolution,
                          preprocess=preprocess, dtype=dtype)
        feats = cached_features(
            backbone, Transformed(data, transform), key=key, expected_labels=labels,
            cache_dir=ctx.cache_dir if cfg.protocol.cache else None, batch_size=cfg.trainer.eval_batch_size,
            num_workers=cfg.trainer.num_workers, device=device, dtype=dtype,
            channels_last=cfg.trainer.channels_last, desc=f"features {split}")
        hits += feats.cache_hit
        undecodable.update(feats.undecodable)
        check_undecodable(undecodable)  # fail before the next split's extraction, not after the whole run
        out[split] = (feats.features.to(device), feats.labels.to(device))
    log.info("features: %d of 3 splits read from the cache", hits)
    out["counts"] = {"feature_cache_hits": hits, "undecodable_images": len(undecodable),
                     "images_test_scored": len(out["test"][1])}
    return out


def _not_comparable(splits: Splits, *more: str) -> dict:
    """``extra.not_comparable``: why this run's scores cannot stand next to published ones (transfer.compare)."""
    reasons = [*splits.not_comparable, *more]
    return {"not_comparable": reasons} if reasons else {}


def nothing_scored(sizes: dict[str, int], counts: dict) -> str | None:
    """The shared check of every protocol: why the run has no number to report, or None.

    ``sizes``: images each split the protocol needs actually contributed (decoded and used), by split name
    (a key ``"train+val"`` for a k-NN bank). A split with none cannot be fitted on or scored; the run then
    returns no test metric and fails with this reason (``TaskOutput.extra["unscored"]``), keeping its counts.
    """
    empty = [name for name, n in sizes.items() if n == 0]
    if not empty:
        return None
    return (f"no image of the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} could be used (undecodable "
            f"images: {counts.get('undecodable_images', 0)}, skipped by the scan: {counts.get('skipped_images', 0)}); "
            "check the data set files")


def _unscored_output(ctx: RunContext, backbone: Backbone, splits: Splits, counts: dict, reason: str,
                     resolution: int) -> TaskOutput:
    log.error("%s", reason)
    return TaskOutput(metrics={}, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric=f"test/{ctx.cfg.task.metric}",
                      extra={"unscored": reason, "resolution": resolution, "preprocess": preprocess_of(ctx.cfg),
                             **_not_comparable(splits)})


def run_linear(ctx: RunContext) -> TaskOutput:
    backbone, splits, resolution = _build(ctx)
    feats = _features(ctx, backbone, splits, resolution)
    counts = {**splits.counts, **feats["counts"]}
    if reason := nothing_scored({s: len(feats[s][1]) for s in ("train", "val", "test")}, counts):
        return _unscored_output(ctx, backbone, splits, counts, reason, resolution)
    p, task = ctx.cfg.protocol, ctx.cfg.task
    fit = dict(max_iter=p.max_iter, tolerance=p.tolerance)
    grid = l2_grid(p.l2_min, p.l2_max, p.l2_steps)
    search = search_l2(feats["train"], feats["val"], splits.num_classes, grid, SCORERS[task.metric],
                       extend_decades=p.extend_decades, refine_steps=p.refine_steps, **fit)
    chosen, curve, best = search.best, search.curve, search.best.l2
    edge_reasons = []
    if search.edge:
        log.warning("linear: the best l2 sat at the %s end of the grid [%g, %g]; searched [%g, %g] instead, best "
                    "l2 %g", search.edge, p.l2_min, p.l2_max, *search.searched, best)
    if search.at_edge:
        edge_reasons.append(f"the val score at an end of the searched l2 range [{search.searched[0]:g}, "
                            f"{search.searched[1]:g}] is as high as at the chosen l2 {best:g} (protocol."
                            f"extend_decades={p.extend_decades:g}): a better l2 may lie outside it")
        log.warning("not comparable: %s", edge_reasons[-1])
    trainval = tuple(torch.cat([feats["train"][i], feats["val"][i]]) for i in range(2))
    model = fit_logistic(*trainval, splits.num_classes, best, init=chosen, **fit)  # warm: the train-only fit
    metrics = classification_metrics(model.logits(feats["test"][0]), feats["test"][1], splits.num_classes, "test")
    metrics["val/best"] = max(score for _, score in curve)
    ctx.logger.table("linear/l2_sweep", ["l2", f"val/{task.metric}"], [list(c) for c in curve])
    ctx.logger.summary({"linear/l2_at_grid_edge": search.edge or "none"})
    return TaskOutput(metrics=metrics, counts={**splits.counts, **feats["counts"]},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"best_l2": best, "l2_curve": curve, "l2_search": search.as_dict(),
                             "resolution": resolution, "preprocess": preprocess_of(ctx.cfg),
                             **_not_comparable(splits, *edge_reasons)})


def run_knn(ctx: RunContext) -> TaskOutput:
    from tasks.classification.knn import knn_predict

    backbone, splits, resolution = _build(ctx)
    feats = _features(ctx, backbone, splits, resolution)
    counts = {**splits.counts, **feats["counts"]}
    sizes = {"train+val": len(feats["train"][1]) + len(feats["val"][1]), "test": len(feats["test"][1])}
    if reason := nothing_scored(sizes, counts):
        return _unscored_output(ctx, backbone, splits, counts, reason, resolution)
    p, task = ctx.cfg.protocol, ctx.cfg.task
    bank = tuple(torch.cat([feats["train"][i], feats["val"][i]]) for i in range(2))
    scores = knn_predict(bank[0], bank[1], feats["test"][0], splits.num_classes, k=p.k, temperature=p.temperature)
    metrics = classification_metrics(scores, feats["test"][1], splits.num_classes, "test")
    return TaskOutput(metrics=metrics, counts={**splits.counts, **feats["counts"]},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"resolution": resolution, "preprocess": preprocess_of(ctx.cfg),
                             **_not_comparable(splits)})


def _backbone(ctx: RunContext) -> Backbone:
    b = ctx.cfg.backbone
    return build_backbone(b.name, weights=b.weights, strict=b.strict, drop_path_rate=b.drop_path_rate,
                          min_loaded_fraction=b.min_loaded_fraction)


def _finetune_transforms(backbone: Backbone, resolution: int, protocol: FinetuneProtocolConfig):
    """Train and test transforms: timm's random-resized crop + flip (+ the protocol's augmentation), and a
    centre crop at the protocol's ``test_crop_pct`` (the checkpoint's own crop when null)."""
    train_tf = create_transform(**backbone.data_config(train=True, resolution=resolution), is_training=True,
                                auto_augment=protocol.randaugment, color_jitter=protocol.color_jitter or None)
    test_config = backbone.data_config(resolution=resolution)
    if protocol.test_crop_pct is not None:
        test_config["crop_pct"] = protocol.test_crop_pct
    return train_tf, create_transform(**test_config, is_training=False)


def _set_bn_momentum(module: FinetuneModule, train_size: int, global_batch: int) -> float:
    """BN running statistics with decay ``max(1 - 10/s, 0.9)``, ``s`` steps per epoch (SimCLR B.8, BYOL D.3):
    PyTorch's momentum is one minus that decay."""
    momentum = min(0.1, 10 / max(1, train_size // global_batch))
    for m in module.backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return momentum


def _fit(ctx: RunContext, backbone: Backbone, splits: Splits, resolution: int, protocol: FinetuneProtocolConfig, *,
         subdir: str = "", final: bool = False) -> tuple[FinetuneModule, L.Trainer, ClassificationData, str | None]:
    """Fine-tune ``backbone`` with ``protocol``: on train (val scores it, after its last step or per epoch as
    ``protocol.select`` says) or, ``final``, on train+val."""
    cfg = ctx.cfg
    train_tf, test_tf = _finetune_transforms(backbone, resolution, protocol)
    train = ConcatDataset([splits.train, splits.val]) if final else splits.train
    module = FinetuneModule(backbone, splits.num_classes, protocol, check_damage=_damage_check(ctx, splits))
    callbacks = [EMAWeightAveraging(decay=protocol.ema_decay)] if protocol.ema_decay else []
    length = dict(max_steps=protocol.steps, max_epochs=-1) if protocol.steps else {}
    if final:  # val is training data now: keep the last step, skip validation
        trainer = build_trainer(ctx, callbacks=callbacks, monitor="train/loss_epoch", mode="min", subdir=subdir,
                                limit_val_batches=0, **length)
    else:
        if protocol.select == "last":  # one validation, after the last step
            length.update(dict(val_check_interval=protocol.steps, check_val_every_n_epoch=None) if protocol.steps
                          else dict(check_val_every_n_epoch=cfg.trainer.max_epochs))
        trainer = build_trainer(ctx, callbacks=callbacks, monitor=f"val/{cfg.task.metric}", subdir=subdir, **length)
    # protocol.batch_size is global: each process takes its share.
    batch = max(1, protocol.batch_size // trainer.world_size) if protocol.batch_size else cfg.trainer.batch_size
    data = ClassificationData(Transformed(train, train_tf), Transformed(splits.val, test_tf),
                              Transformed(splits.test, test_tf), batch_size=batch,
                              eval_batch_size=cfg.trainer.eval_batch_size, num_workers=cfg.trainer.num_workers)
    if protocol.bn_momentum_from_steps:
        _set_bn_momentum(module, len(train), batch * trainer.world_size)
    resumed_from = resume_path(ctx, subdir)
    trainer.fit(module, datamodule=data, ckpt_path=resumed_from)
    return module, trainer, data, resumed_from


def _sweep(ctx: RunContext, splits: Splits, resolution: int,
           undecodable: set[str]) -> tuple[FinetuneProtocolConfig, list[list[float]], list[float]]:
    """Train every (lr, weight decay) of the grid on train; the pair with the best val metric wins.

    With ``protocol.wd_over_lr`` the optimiser's weight decay is ``wd / lr`` (SimCLR B.8, BYOL D.3: the
    grid's weight decays "are divided by the learning rate"); rows ``[lr, wd, val score]`` hold the grid
    value ``wd``. Undecodable images met in any fit are added to ``undecodable``. Returns the refit's
    settings, every row and the chosen row.
    """
    p = ctx.cfg.protocol
    rows = []
    for lr in p.lr_grid:
        for wd in p.wd_grid:
            candidate = dataclasses.replace(p, lr=lr, weight_decay=wd / lr if p.wd_over_lr else wd, sweep=False)
            module, trainer, _, _ = _fit(ctx, _backbone(ctx), splits, resolution, candidate,
                                         subdir=f"sweep/lr{lr:g}-wd{wd:g}")
            undecodable.update(module.undecodable)
            score = trainer.checkpoint_callback.best_model_score
            rows.append([lr, wd, float(score) if score is not None else float("nan")])
            log.info("finetune sweep lr=%g wd=%g (optimiser weight decay %g): val/%s %.2f", lr, wd,
                     candidate.weight_decay, ctx.cfg.task.metric, rows[-1][2])
    chosen = max(rows, key=lambda r: float("-inf") if math.isnan(r[2]) else r[2])
    lr, wd, _ = chosen
    return dataclasses.replace(p, lr=lr, weight_decay=wd / lr if p.wd_over_lr else wd, sweep=False), rows, chosen


def run_finetune(ctx: RunContext) -> TaskOutput:
    backbone, splits, resolution = _build(ctx)
    cfg, p = ctx.cfg, ctx.cfg.protocol
    resolution = cfg.task.resolution or p.image_size or resolution  # an explicit task.resolution wins
    crop_pct = p.test_crop_pct if p.test_crop_pct is not None else backbone.spec.crop_pct
    # "paper": the papers' fine-tune sizes (train crops 224; test resize 256, centre crop 224), see transfer.compare.
    preprocess = "paper" if (resolution, crop_pct) == (224, 0.875) else "checkpoint"
    extra: dict = {"resolution": resolution, "test_crop_pct": crop_pct, "preprocess": preprocess}
    undecodable: set[str] = set()
    if p.sweep:
        best, rows, chosen = _sweep(ctx, splits, resolution, undecodable)
        ctx.logger.table("finetune/sweep", ["lr", "weight_decay", f"val/{cfg.task.metric}"], rows)
        extra.update(best_lr=chosen[0], best_weight_decay=chosen[1], optimiser_weight_decay=best.weight_decay,
                     sweep=rows)
        module, trainer, data, resumed_from = _fit(ctx, backbone, splits, resolution, best, subdir="final",
                                                   final=True)
        tested = trainer.test(module, datamodule=data, verbose=False)
    else:
        module, trainer, data, resumed_from = _fit(ctx, backbone, splits, resolution, p)
        tested = trainer.test(module, datamodule=data, ckpt_path="best" if p.select == "best_epoch" else None,
                              verbose=False)
    metrics = {k: float(v) for k, v in tested[0].items()} if tested else {}
    extra["global_batch"] = data.batch_size * trainer.world_size  # of the fit that was tested
    if p.sweep:
        metrics[f"val/best_{cfg.task.metric}"] = max(r[2] for r in extra["sweep"])
    undecodable.update(module.undecodable)
    counts = {**splits.counts, "undecodable_images": len(undecodable),
              "images_test_scored": module.scored.get("test", 0)}
    if reason := nothing_scored({"test": counts["images_test_scored"]}, counts):
        log.error("%s", reason)
        metrics = {k: v for k, v in metrics.items() if not k.startswith("test/")}
        extra["unscored"] = reason
    return TaskOutput(metrics=metrics, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric=f"test/{cfg.task.metric}", extra={**extra, "resumed_from": resumed_from,
                             **progress_of(trainer), **_not_comparable(splits)})


PROTOCOL_RUNNERS = {"linear": run_linear, "knn": run_knn, "finetune": run_finetune, "finetune_strong": run_finetune}


def run(ctx: RunContext) -> TaskOutput:
    return PROTOCOL_RUNNERS[ctx.cfg.protocol.name](ctx)


TASKS.add("classification", TaskAdapter(config_class=ClassificationTaskConfig, run=run, check=check,
                                        protocols=tuple(PROTOCOL_RUNNERS),
                                        metrics=("test/top1", "test/top5", "test/mean_per_class")))
