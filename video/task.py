"""The video adapter: inflate a registry backbone, train it on Kinetics clips, test with multi-view averaging."""
from __future__ import annotations

import dataclasses
import logging

from lightning.pytorch.callbacks import EMAWeightAveraging

from transfer.engine import build_trainer, resume_path, seed_everything
from transfer.errors import ConfigError, DataError
from transfer.protocols import FinetuneProtocolConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput
from video.config import VideoOptimSettings, VideoTaskConfig
from video.data import ClipSpec, TrainClips, VideoList, load_split
from video.model import VideoClassifier, build_video_backbone
from video.module import VideoData, VideoModule
from video.multiview import MultiViewClips
from video.transforms import MultiCropEval, build_train_transform

log = logging.getLogger(__name__)

def _check_protocol(protocol) -> None:
    """The 3D recipe lives in task.optim; refuse protocol values that would otherwise be ignored."""
    changed = [f.name for f in dataclasses.fields(FinetuneProtocolConfig)
               if f.name != "name" and getattr(protocol, f.name) != getattr(FinetuneProtocolConfig(), f.name)]
    if changed:
        raise ConfigError(f"video tasks take their training settings from task.optim (the 3D ResNet-RS recipe); "
                          f"protocol keys {changed} would be ignored. Set them as task.optim.<key> instead "
                          f"(keys: {', '.join(f.name for f in dataclasses.fields(VideoOptimSettings))}).")


def _load(task: VideoTaskConfig) -> tuple[VideoList, VideoList]:
    train = load_split(task.data_dir or "", task.train_split, layout=task.layout, num_classes=task.num_classes,
                       manifest=task.manifest)
    test = load_split(task.data_dir or "", task.eval_split, layout=task.layout, classes=train.classes,
                      num_classes=len(train.classes), manifest=task.manifest)
    if task.num_classes is not None and task.num_classes != len(train.classes):
        raise DataError(f"task.num_classes={task.num_classes} but split {task.train_split!r} has "
                        f"{len(train.classes)} classes. Check task.data_dir or set task.num_classes=null.")
    for split, listed in ((task.train_split, train), (task.eval_split, test)):
        bad = len(listed.missing) + len(listed.undecodable)
        if bad > task.max_bad_fraction * (bad + len(listed.videos)):
            raise DataError(f"split {split!r}: {bad} of {bad + len(listed.videos)} videos are missing or undecodable, "
                            f"more than task.max_bad_fraction={task.max_bad_fraction}. First missing: "
                            f"{listed.missing[:3]}; run python -m video.scan for a full report.")
    return train, test


def run(ctx: RunContext) -> TaskOutput:
    cfg, task = ctx.cfg, ctx.cfg.task
    _check_protocol(cfg.protocol)
    seed_everything(cfg.trainer)
    train, test = _load(task)  # data first: a missing data set fails before model work
    backbone = build_video_backbone(cfg.backbone.name, weights=cfg.backbone.weights, strict=cfg.backbone.strict,
                                    inflation=task.inflation.build(), drop_path_rate=task.optim.drop_path_rate)
    model = VideoClassifier(backbone, len(train.classes), dropout=task.optim.dropout)
    if cfg.protocol.freeze_backbone:
        backbone.requires_grad_(False)
    spec = ClipSpec(task.frames, task.stride, task.fps)
    mean, std = backbone.spec.mean, backbone.spec.std  # normalisation of the weights being inflated
    train_tf = build_train_transform(size=task.train_size, mean=mean, std=std, crop=task.train_crop,
                                     area=tuple(task.crop_area), aspect=tuple(task.crop_aspect),
                                     jitter=tuple(task.scale_jitter),
                                     randaugment=tuple(task.randaugment) if task.randaugment else None)
    views = MultiViewClips(test.videos, spec, MultiCropEval(size=task.eval_size, mean=mean, std=std,
                                                            crops=task.test_crops), clips=task.test_clips)
    data = VideoData(TrainClips(train.videos, spec, train_tf), views, batch_size=cfg.trainer.batch_size,
                     eval_batch_size=cfg.trainer.eval_batch_size, num_workers=cfg.trainer.num_workers)
    callbacks = [EMAWeightAveraging(decay=task.optim.ema_decay)] if task.optim.ema_decay else []
    trainer = build_trainer(ctx, callbacks=callbacks)  # channels_last becomes channels_last_3d for 3D weights
    module = VideoModule(model, task.optim, eval_labels=[label for _, label in test.videos],
                         global_batch=cfg.trainer.batch_size * trainer.world_size)
    trainer.fit(module, datamodule=data, ckpt_path=resume_path(ctx))
    trainer.test(module, datamodule=data, verbose=False)
    counts = {**train.counts(task.train_split), **test.counts(task.eval_split),
              "train/skipped_clips": module.skipped["train"], "test/skipped_views": module.skipped["test"],
              "test/videos_without_views": module.skipped["test_videos_without_views"]}
    return TaskOutput(metrics=module.test_metrics, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric="test/top1",
                      extra={"classes": len(train.classes), "views": [task.test_clips, task.test_crops],
                             "clip": [task.frames, task.stride], "inflation": dataclasses.asdict(task.inflation),
                             "global_step": trainer.global_step,
                             **({"scratch_recipe": task.scratch_recipe} if task.scratch_recipe else {})})


TASKS.add("video", TaskAdapter(config_class=VideoTaskConfig, run=run, protocols=("finetune",),
                               metrics=("test/top1", "test/top5")))
