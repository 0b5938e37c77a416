"""The video adapter: inflate a registry backbone, train it on Kinetics clips, test with multi-view averaging."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from omegaconf import OmegaConf

from transfer.config import RECIPES_DIR
from transfer.engine import build_trainer, resume_path
from transfer.errors import DataError
from transfer.tasks import RunContext, TaskOutput, attach_output
from video.config import VideoFinetuneProtocolConfig, VideoTaskConfig
from video.data import ClipSpec, TrainClips, VideoList, check_bad_fraction, load_split
from video.model import VideoClassifier, build_video_backbone
from video.module import VideoData, VideoModule, WarmupEMA
from video.multiview import MultiViewClips
from video.transforms import MultiCropEval, build_train_transform

log = logging.getLogger(__name__)


def _load(task: VideoTaskConfig) -> tuple[VideoList, VideoList]:
    train = load_split(task.data_dir, task.train_split, layout=task.layout, num_classes=task.num_classes,
                       manifest=task.manifest)
    test = load_split(task.data_dir, task.eval_split, layout=task.layout, classes=train.classes,
                      num_classes=len(train.classes), manifest=task.manifest)
    if task.num_classes is not None and task.num_classes != len(train.classes):
        raise DataError(f"task.num_classes={task.num_classes} but split {task.train_split!r} has "
                        f"{len(train.classes)} classes. Check task.data_dir or set task.num_classes=null.")
    return train, test


def _counts(task: VideoTaskConfig, seen: dict) -> dict[str, int]:
    """The counts of results.json from what the run has seen so far (``seen``: the listed splits, the module)."""
    counts = {}
    if "train" in seen:
        counts.update(seen["train"].counts(task.train_split))
    if "test" in seen:
        counts.update(seen["test"].counts(task.eval_split))
    module = seen.get("module")
    if module is not None:
        counts.update(module.totals)
        if module.scores is not None:
            scores = module.scores
            counts.update({"test/skipped_views": int(scores.failed.sum()),
                           "test/videos_with_failed_views": len(scores.failed_videos()),
                           "test/videos_without_views": int((scores.views == 0).sum())})
    return counts


def train_short_side(task: VideoTaskConfig) -> int | None:
    """Short side the training frames are decoded at: the top of the scale jitter, else ``decode_short_side``."""
    return task.scale_jitter[1] if task.train_crop == "jitter" else task.decode_short_side


def build_classifier(cfg, num_classes: int) -> VideoClassifier:
    """The run's network: backbone ``cfg.backbone`` (its weights, ``drop_path_rate`` spread per stage as Model
    Garden does) inflated per ``task.inflation``, BN momentum and head dropout from the protocol."""
    backbone = build_video_backbone(cfg.backbone, inflation=cfg.task.inflation.build(),
                                    drop_path_rate=cfg.backbone.drop_path_rate, bn_momentum=cfg.protocol.bn_momentum)
    return VideoClassifier(backbone, num_classes, dropout=cfg.protocol.dropout)


def run(ctx: RunContext) -> TaskOutput:
    """Train and test. A run stopped by bad data (:class:`DataError`) once its splits are listed carries the counts
    made so far, which ``transfer.run`` writes to results.json with status ``failed``; an error before that (no
    data root, an unknown layout) has nothing counted and leaves no results.json."""
    seen: dict = {}
    try:
        return _run(ctx, seen)
    except DataError as e:
        if seen:
            weights = seen["backbone"].weights.as_dict() if "backbone" in seen else {}
            attach_output(e, TaskOutput(metrics={}, weights=weights, counts=_counts(ctx.cfg.task, seen)))
        raise


def _run(ctx: RunContext, seen: dict) -> TaskOutput:
    cfg, task = ctx.cfg, ctx.cfg.task
    train, test = _load(task)  # data first: a missing data set fails before model work
    seen.update(train=train, test=test)
    for split, listed in ((task.train_split, train), (task.eval_split, test)):
        check_bad_fraction(split, listed, task.max_bad_fraction)
    optim: VideoFinetuneProtocolConfig = cfg.protocol
    model = build_classifier(cfg, len(train.classes))
    backbone = seen["backbone"] = model.backbone
    spec = ClipSpec(task.frames, task.stride, task.fps)
    mean, std = backbone.spec.mean, backbone.spec.std  # normalisation of the weights being inflated
    train_tf = build_train_transform(size=task.train_size, mean=mean, std=std, crop=task.train_crop,
                                     area=tuple(task.crop_area), aspect=tuple(task.crop_aspect),
                                     jitter=tuple(task.scale_jitter),
                                     randaugment=tuple(task.randaugment) if task.randaugment else None)
    views = MultiViewClips(test.videos, spec, MultiCropEval(size=task.eval_size, mean=mean, std=std,
                                                            crops=task.test_crops),
                           clips=task.test_clips, short_side=task.eval_size)
    # trainer.eval_batch_size counts clips (network inputs); one test item is a temporal clip with all its crops.
    eval_items = max(1, cfg.trainer.eval_batch_size // task.test_crops)
    data = VideoData(TrainClips(train.videos, spec, train_tf, short_side=train_short_side(task)), views,
                     batch_size=cfg.trainer.batch_size, eval_batch_size=eval_items,
                     num_workers=cfg.trainer.num_workers)
    callbacks = [WarmupEMA(optim.ema_decay, optim.ema_warmup)] if optim.ema_decay else []
    trainer = build_trainer(ctx, callbacks=callbacks)  # channels_last becomes channels_last_3d for 3D weights

    def check_train(failed: list[int]) -> None:
        check_bad_fraction(task.train_split, train, task.max_bad_fraction, [train.videos[i][0] for i in failed])

    module = VideoModule(model, optim, eval_labels=[label for _, label in test.videos],
                         train_videos=len(train.videos), global_batch=cfg.trainer.batch_size * trainer.world_size,
                         check_train=check_train)
    seen["module"] = module
    trainer.fit(module, datamodule=data, ckpt_path=resume_path(ctx))
    trainer.test(module, datamodule=data, verbose=False)

    scores = module.scores
    if scores is None:
        raise DataError(f"the test of split {task.eval_split!r} did not run (trainer.limit_eval_batches="
                        f"{cfg.trainer.limit_eval_batches}); a video run needs its test metric.")
    failed = scores.failed_videos()
    metrics, _ = scores.metrics("test")
    counts = _counts(task, seen)
    check_bad_fraction(task.eval_split, test, task.max_bad_fraction, [test.videos[i][0] for i in failed])
    if not metrics:
        raise DataError(f"no test view of split {task.eval_split!r} reached the model ({counts}); nothing to score. "
                        "Run python -m video.scan on the data for the reasons.")
    never_scored = int(((scores.views == 0) & (scores.failed == 0)).sum())
    return TaskOutput(metrics=metrics, counts=counts, weights=backbone.weights.as_dict(), primary_metric="test/top1",
                      recipe=recipe_used(task, optim, module, backbone.training_layers, trainer.world_size),
                      extra={"classes": len(train.classes), "global_step": trainer.global_step,
                             "clip": [task.frames, task.stride], "views": [task.test_clips, task.test_crops],
                             **({"scratch_recipe": task.scratch_recipe} if task.scratch_recipe else {}),
                             **not_comparable(cfg, classes=len(train.classes), test_videos=len(test.videos),
                                              never_scored=never_scored)})


# Task keys that place the data or guard it, not part of the training and test recipe.
NOT_RECIPE_KEYS = ("name", "adapter", "data_dir", "layout", "manifest", "max_bad_fraction", "num_classes",
                   "scratch_recipe", "published_epochs", "published_drop_path_rate")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def recipe_deviations(task: VideoTaskConfig, recipe: dict) -> list[str]:
    """``task.<key>=value differs from the recipe's value`` for each training or test value of ``task`` that is not
    the task recipe's (``recipe``: recipes/task/<name>.yaml as a dict). Crop keys the chosen crop does not use are
    left out."""
    used, published = _flat(dataclasses.asdict(task)), _flat({k: v for k, v in recipe.items() if k != "defaults"})
    unused = {"resized": ("scale_jitter",), "jitter": ("crop_area", "crop_aspect")}
    skip = {*NOT_RECIPE_KEYS, *unused.get(task.train_crop, ())}
    out = []
    for key, value in used.items():
        if key.split(".")[0] in skip or key not in published:
            continue
        want = published[key]
        same = (list(value) == list(want) if isinstance(value, (list, tuple)) and isinstance(want, (list, tuple))
                else value == want)
        if not same:
            out.append(f"task.{key}={value!r} differs from the {task.name} recipe's {want!r}")
    return out


def not_comparable(cfg, *, classes: int, test_videos: int, never_scored: int) -> dict[str, list[str]]:
    """``extra.not_comparable`` (read by :mod:`transfer.compare`): why the run's scores cannot stand next to published
    ones. A subset of the classes, part of the test videos never scored (``trainer.limit_eval_batches``), a schedule
    other than the published one (``task.published_epochs``; ``trainer.max_steps``, ``limit_train_batches``), a
    ``backbone.drop_path_rate`` other than ``task.published_drop_path_rate``, and any training or test value changed
    from the task recipe (:func:`recipe_deviations`; changed protocol values are :mod:`transfer.compare`'s). Empty
    when none applies."""
    task, trainer, reasons = cfg.task, cfg.trainer, []
    recipe_file = Path(RECIPES_DIR) / "task" / f"{task.name}.yaml"
    recipe = OmegaConf.to_container(OmegaConf.load(recipe_file), resolve=True) if recipe_file.is_file() else None
    if recipe is None:
        reasons.append(f"no task recipe {str(recipe_file)!r}: the run's values cannot be checked against one")
    published_classes = (recipe or {}).get("num_classes")
    if published_classes and classes != published_classes:
        reasons.append(f"{classes} classes, not the {published_classes} of {task.name}: a subset of the data")
    if never_scored:
        reasons.append(f"{never_scored} of {test_videos} test videos were never scored (trainer.limit_eval_batches="
                       f"{trainer.limit_eval_batches:g}): a partial evaluation")
    if task.published_epochs is not None and trainer.max_epochs != task.published_epochs:
        reasons.append(f"trainer.max_epochs={trainer.max_epochs}; the published schedule trains "
                       f"{task.published_epochs} epochs")
    published_rate = task.published_drop_path_rate
    if published_rate is not None and cfg.backbone.drop_path_rate != published_rate:
        reasons.append(f"backbone.drop_path_rate={cfg.backbone.drop_path_rate:g} differs from the {task.name} "
                       f"recipe's {published_rate:g}")
    if trainer.max_steps != -1:
        reasons.append(f"trainer.max_steps={trainer.max_steps} stops training before the schedule's end")
    if trainer.limit_train_batches != 1.0:
        reasons.append(f"trainer.limit_train_batches={trainer.limit_train_batches:g}: part of each epoch is trained")
    if recipe is not None:
        reasons += recipe_deviations(task, recipe)
    return {"not_comparable": reasons} if reasons else {}


def recipe_used(task: VideoTaskConfig, o: VideoFinetuneProtocolConfig, module: VideoModule, layers: dict,
                world_size: int) -> dict:
    """The training and test values this run used (results.json ``recipe``). A frozen backbone runs in eval
    mode: neither stochastic depth nor a batch-norm momentum applies to it (both recorded as None)."""
    frozen = o.freeze_backbone
    return {
        "freeze_backbone": o.freeze_backbone,
        "optimizer": "sgd", "nesterov": o.nesterov, "momentum": o.momentum, "schedule": "warmup + cosine",
        "lr": module.lr, "lr_recipe": o.lr, "lr_reference_batch": o.lr_reference_batch,
        "global_batch": module.global_batch, "world_size": world_size, "weight_decay": o.weight_decay,
        "warmup_epochs": o.warmup_epochs, "label_smoothing": o.label_smoothing, "dropout": o.dropout,
        "drop_path_per_stage": None if frozen else layers.get("drop_path_per_stage"),
        "bn_momentum": None if frozen else layers.get("bn_momentum"),
        "ema_decay": o.ema_decay, "ema_warmup": o.ema_warmup if o.ema_decay else None,
        "clip": {"frames": task.frames, "stride": task.stride, "fps": task.fps},
        "train_crop": task.train_crop, "train_size": task.train_size,
        "crop_area": list(task.crop_area) if task.train_crop == "resized" else None,
        "crop_aspect": list(task.crop_aspect) if task.train_crop == "resized" else None,
        "scale_jitter": list(task.scale_jitter) if task.train_crop == "jitter" else None,
        "train_decode_short_side": train_short_side(task), "randaugment": task.randaugment,
        "eval_size": task.eval_size, "views": [task.test_clips, task.test_crops],
        "inflation": dataclasses.asdict(task.inflation), "self_gating": "2*sigmoid, zero-initialised (identity)",
    }
