"""The classification adapter: linear probe and k-NN on cached features, or full fine-tuning.

Linear probe and k-NN extract features through the shared Lightning engine (``trainer.predict``; under DDP
each process extracts whole shards of its own, ``tasks/classification/features.py``), then every process
fits on the shards, streamed in bounded chunks, and rank 0 writes the results; fine-tuning runs DDP through
Lightning, with val and test padded so that no image is scored twice (``tasks/classification/finetune.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import weakref

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from timm.data import create_transform
from torch.utils.data import ConcatDataset

from tasks.classification.config import FROZEN
from tasks.classification.datasets import DATASETS, SPECS, Splits, Transformed
from tasks.classification.features import cache_key, cache_path, digest, extract_split
from tasks.classification.finetune import ClassificationData, FinetuneModule
from tasks.classification.linear import NEAR_TIE_MARGIN, fit_logistic, l2_grid, near_ties, search_l2
from tasks.classification.metrics import SCORERS, classification_metrics
from tasks.classification.protocols import FinetuneProtocolConfig
from tasks.classification.rows import concat
from transfer.backbones import Backbone, build_backbone_from_config
from transfer.engine import (
    autocast_dtype,
    build_trainer,
    progress_of,
    resolve_accelerator,
    resume_path,
)
from transfer.image_sources import check_damage, items_digest, labels_of
from transfer.tasks import RunContext, TaskOutput

log = logging.getLogger(__name__)
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


def finetune_input(cfg, backbone: Backbone) -> tuple[int, float, str]:
    """(resolution, test crop fraction, ``extra.preprocess``) of a fine-tuning run.

    ``task.preprocess=auto``: the protocol's ``image_size`` and ``test_crop_pct`` (the checkpoint's own where
    null); ``checkpoint``: the checkpoint's own test resolution and crop (``BackboneSpec.test_res``,
    ``crop_pct``), whatever the protocol says. ``task.resolution`` wins over both. The recorded preprocess is
    ``paper`` when the result is the papers' fine-tune test input (224, i.e. resize 256 / crop 224: BYOL
    App. D.3), else ``checkpoint``.
    """
    p, spec = cfg.protocol, backbone.spec
    if cfg.task.preprocess == "checkpoint":
        resolution, crop_pct = spec.test_res, spec.crop_pct
    else:
        resolution = p.image_size or spec.test_res
        crop_pct = p.test_crop_pct if p.test_crop_pct is not None else spec.crop_pct
    resolution = cfg.task.resolution or resolution
    return resolution, crop_pct, "paper" if (resolution, crop_pct) == (224, 0.875) else "checkpoint"


def _build(ctx: RunContext) -> tuple[Backbone, Splits, int]:
    cfg = ctx.cfg
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
    ``task.max_bad_fraction`` of the images this run reads.

    The scan's skipped images were reported when the data set was read: the check warns (or raises) only when
    images that failed to decode add to them, once per new count, naming the skipped and the failed files.
    """
    skipped = splits.counts.get("skipped_images", 0)
    total = skipped + len(splits.train) + len(splits.val) + len(splits.test)
    reported = [skipped]

    def check_undecodable(names) -> None:
        bad = skipped + len(names)
        if bad == reported[0]:
            return
        reported[0] = bad
        check_damage(bad=bad, total=total, examples=[*sorted(names), *splits.skipped_examples],
                     what="unreadable or undecodable", max_bad_fraction=ctx.cfg.task.max_bad_fraction,
                     origin=f"task {ctx.cfg.task.name}")
    return check_undecodable


# task.* values that cannot change which images and labels are read, nor how they are decoded: only these are
# left out of the feature cache key. Every other task value (image and label column, data_dir, hub_id,
# limit_per_split, val_fraction, split_seed, scan_images, max_image_pixels, … and any value added later) is in it,
# so a new option that changes what is read cannot be forgotten.
NOT_IN_FEATURE_KEY = frozenset({"metric", "max_bad_fraction", "check_split_sizes"})


def _reads(task_cfg) -> str:
    """What the data part of the feature key holds of ``task.*``: every value but :data:`NOT_IN_FEATURE_KEY`."""
    values = {k: v for k, v in dataclasses.asdict(task_cfg).items() if k not in NOT_IN_FEATURE_KEY}
    return json.dumps(values, sort_keys=True, default=str)


_WEIGHTS_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per backbone: its tensors do not change


def _weights_id(ctx: RunContext, backbone: Backbone) -> str:
    """The weights part of the feature key: the file's sha256 and what the load took from it. When any backbone
    tensor did not come from a file (``backbone.weights=random``, a non-strict partial load, a folder with no
    single sha256), those tensors are random and depend on ``trainer.seed``: the seed and a digest of the
    tensors themselves join the key."""
    if backbone in _WEIGHTS_IDS:
        return _WEIGHTS_IDS[backbone]
    w = backbone.weights
    load = dataclasses.asdict(w.load) if w.load else None
    parts = {"source": w.source, "sha256": w.sha256, "load": load}
    if w.sha256 is None or w.load is None or w.load.missing:
        parts["seed"] = ctx.cfg.trainer.seed
        h = hashlib.sha256()
        for name, t in backbone.model.state_dict().items():
            h.update(name.encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        parts["tensors"] = h.hexdigest()
    _WEIGHTS_IDS[backbone] = json.dumps(parts, sort_keys=True)
    return _WEIGHTS_IDS[backbone]


def feature_key(ctx: RunContext, backbone: Backbone, splits: Splits, split: str, *, transform, resolution: int,
                preprocess: str, dtype: torch.dtype | None) -> dict[str, str]:
    """The feature cache key of ``split``: everything that determines its features and labels, and the shard size.

    Data: the data's identity, the split's items in order, its labels, the class names, and every ``task.*``
    value that can change what is read (:func:`_reads`). Weights: :func:`_weights_id`. Input: transform,
    resolution, preprocessing, autocast precision.
    """
    data = getattr(splits, split)
    return cache_key(backbone=ctx.cfg.backbone.name, weights=_weights_id(ctx, backbone), dataset=ctx.cfg.task.name,
                     split=split, data=splits.source_id, items=items_digest(data), labels=digest(labels_of(data)),
                     label_column=splits.label_column, classes=digest(list(splits.class_names)),
                     reads=_reads(ctx.cfg.task), transform=repr(transform), resolution=resolution,
                     preprocess=preprocess, precision=str(dtype or torch.float32),
                     shard_images=ctx.cfg.protocol.shard_images)


def _features(ctx: RunContext, backbone: Backbone, splits: Splits, resolution: int) -> dict:
    """Features of train, val and test as :class:`~tasks.classification.rows.Rows` on this process's device,
    each split's shards reused from the cache when they check out (key: docs/classification.md).

    Extraction runs through one trainer of the shared engine (``trainer.devices`` / ``num_nodes`` /
    ``precision``). Rows up to ``protocol.resident_mb`` are loaded onto the device once; larger ones are read
    from the shards ``protocol.chunk_rows`` rows at a time on every pass.
    """
    cfg, p = ctx.cfg, ctx.cfg.protocol
    accelerator = resolve_accelerator(cfg.trainer)
    preprocess = preprocess_of(cfg)
    transform = eval_transform(backbone, resolution, preprocess)
    dtype = autocast_dtype(cfg.trainer, accelerator)
    check_undecodable = _damage_check(ctx, splits)
    # protocol.cache=false: the shards live in this run's folder, never shared with another run.
    root = ctx.cache_dir if p.cache else ctx.run_dir
    trainer = build_trainer(ctx, subdir="features", logger=False, use_distributed_sampler=False)
    out, hits, undecodable = {}, 0, set()
    for split in ("train", "val", "test"):
        data = getattr(splits, split)
        key = feature_key(ctx, backbone, splits, split, transform=transform, resolution=resolution,
                          preprocess=preprocess, dtype=dtype)
        feats = extract_split(trainer, backbone, Transformed(data, transform), directory=cache_path(root, key),
                              key=key, expected_labels=labels_of(data), shard_images=p.shard_images,
                              batch_size=cfg.trainer.eval_batch_size, num_workers=cfg.trainer.num_workers,
                              channels_last=cfg.trainer.channels_last, desc=f"features {split}")
        hits += feats.cache_hit
        undecodable.update(feats.undecodable)
        check_undecodable(undecodable)  # fail before the next split's extraction, not after the whole run
        out[split] = feats
    device = trainer.strategy.root_device  # this process's own device
    budget = p.resident_mb * 2**20
    rows = {split: out[split].rows(device=device, chunk_rows=p.chunk_rows) for split in ("train", "val", "test")}
    streamed = [s for s, r in rows.items() if r.nbytes() > budget]
    log.info("features: %d of 3 splits read from the cache; %s", hits,
             f"streamed from the shards: {', '.join(streamed)}" if streamed else "held in memory")
    return {**{s: r.resident(budget) for s, r in rows.items()},
            "counts": {"feature_cache_hits": hits, "undecodable_images": len(undecodable),
                       "images_test_scored": len(out["test"].labels),
                       "feature_shards_reused": sum(f.reused for f in out.values()),
                       "feature_shards": sum(len(f.paths) for f in out.values())}}


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
    if reason := nothing_scored({s: len(feats[s]) for s in ("train", "val", "test")}, counts):
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
    trainval = concat(feats["train"], feats["val"])
    model = fit_logistic(trainval, None, splits.num_classes, best, init=chosen, **fit)  # warm: the train-only fit
    logits = model.logits(feats["test"])  # (N_test, C)
    metrics = classification_metrics(logits, feats["test"].labels, splits.num_classes, "test")
    ties = near_ties(logits)
    if ties:
        log.warning("linear: %d of %d test predictions are near ties (top-2 logit margin below %g): the fit's "
                    "float32 precision, chunking or device may predict them the other way", ties, len(logits),
                    NEAR_TIE_MARGIN)
    metrics["val/best"] = max(score for _, score in curve)
    ctx.logger.table("linear/l2_sweep", ["l2", f"val/{task.metric}"], [list(c) for c in curve])
    ctx.logger.summary({"linear/l2_at_grid_edge": search.edge or "none"})
    return TaskOutput(metrics=metrics, counts={**splits.counts, **feats["counts"], "test_near_ties": ties},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"best_l2": best, "l2_curve": curve, "l2_search": search.as_dict(),
                             "resolution": resolution, "preprocess": preprocess_of(ctx.cfg),
                             **_not_comparable(splits, *edge_reasons)})


def run_knn(ctx: RunContext) -> TaskOutput:
    from tasks.classification.knn import knn_predict

    backbone, splits, resolution = _build(ctx)
    feats = _features(ctx, backbone, splits, resolution)
    counts = {**splits.counts, **feats["counts"]}
    sizes = {"train+val": len(feats["train"]) + len(feats["val"]), "test": len(feats["test"])}
    if reason := nothing_scored(sizes, counts):
        return _unscored_output(ctx, backbone, splits, counts, reason, resolution)
    p, task = ctx.cfg.protocol, ctx.cfg.task
    bank = concat(feats["train"], feats["val"])
    scores = knn_predict(bank, None, feats["test"], splits.num_classes, k=p.k, temperature=p.temperature)
    metrics = classification_metrics(scores, feats["test"].labels, splits.num_classes, "test")
    return TaskOutput(metrics=metrics, counts={**splits.counts, **feats["counts"]},
                      weights=backbone.weights.as_dict(), primary_metric=f"test/{task.metric}",
                      extra={"resolution": resolution, "preprocess": preprocess_of(ctx.cfg),
                             **_not_comparable(splits)})


def _backbone(ctx: RunContext) -> Backbone:
    return build_backbone_from_config(ctx.cfg.backbone)


def _finetune_transforms(backbone: Backbone, resolution: int, protocol: FinetuneProtocolConfig, crop_pct: float):
    """Train and test transforms: timm's random-resized crop + flip (+ the protocol's augmentation), and a
    centre crop of ``crop_pct`` (:func:`finetune_input`)."""
    train_tf = create_transform(**backbone.data_config(train=True, resolution=resolution), is_training=True,
                                auto_augment=protocol.randaugment, color_jitter=protocol.color_jitter or None)
    test_config = backbone.data_config(resolution=resolution)
    test_config["crop_pct"] = crop_pct
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
    train_tf, test_tf = _finetune_transforms(backbone, resolution, protocol, finetune_input(cfg, backbone)[1])
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
    resolution, crop_pct, preprocess = finetune_input(cfg, backbone)  # task.preprocess: auto or checkpoint
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
    metrics = {k: module.percent.get(k, float(v)) for k, v in tested[0].items()} if tested else {}
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
