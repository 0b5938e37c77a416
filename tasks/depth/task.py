"""The depth adapter: a registry backbone with the FCRN decoder, trained and tested on NYU Depth v2."""
from __future__ import annotations

import dataclasses

from tasks.depth.config import PUBLISHED_BATCH, PUBLISHED_STEPS, DepthTaskConfig, DepthTrainingValues, data_root
from tasks.depth.data import DepthFrames, frame_error, load_splits
from tasks.depth.metrics import EIGEN_CROP
from tasks.depth.model import DepthModel
from tasks.depth.module import DepthData, DepthModule, scaled_lr
from transfer.backbones import build_backbone_from_config
from transfer.engine import build_trainer, progress_of, resume_path
from transfer.errors import DataError, TransferError
from transfer.tasks import RunContext, TaskOutput, attach_output

# Recorded as extra.head: the published NYU rows (BYOL App. D.6) carry the condition head=fcrn.
HEAD = "fcrn"


def not_comparable(task, train, test, *, steps: int, batch: int) -> dict[str, list[str]]:
    """``extra.not_comparable`` (read by :mod:`transfer.compare`): a subset, a test split other than the official
    654 frames, or a schedule other than BYOL's 7,500 steps at batch 256. Empty when the run matches them."""
    reasons = []
    if task.limit_per_split is not None:
        reasons.append(f"task.limit_per_split={task.limit_per_split}: a subset of each split")
    if task.expected_test_images and len(test.items) != task.expected_test_images:
        reasons.append(f"the test split has {len(test.items)} frames, not the official {task.expected_test_images}")
    elif not task.expected_test_images:
        reasons.append("task.expected_test_images=null: the test split's size is not checked")
    if (steps, batch) != (PUBLISHED_STEPS, PUBLISHED_BATCH):
        reasons.append(f"trained {steps} steps at global batch {batch}; the published protocol trains "
                       f"{PUBLISHED_STEPS} steps at batch {PUBLISHED_BATCH} (BYOL App. D.6)")
    return {"not_comparable": reasons} if reasons else {}


def recipe_used(task: DepthTaskConfig, module: DepthModule, train, test) -> dict:
    """The values this run trained and tested with (results.json ``recipe``): the protocol's SGD recipe as
    ``module`` applies it (``lr`` scaled to the global batch, ``steps`` after ``trainer.max_steps``, the warmup in
    steps), whether the backbone was frozen, the decoder, the data and the evaluation settings."""
    o, batch, steps = module.optim, module.global_batch, module.total_steps
    return {"architecture": "FCRN up-projection decoder (Laina et al. 2016) on forward_features",
            "decoder_channels": list(task.decoder_channels), "skip_connections": task.skip_connections,
            "freeze_backbone": module.frozen_backbone, "source": train.source,
            "train_frames": len(train.items), "test_frames": len(test.items),
            "optimizer": "sgd", "steps": steps, "global_batch": batch, "lr": scaled_lr(o, batch),
            "lr_reference": [o.lr, o.lr_reference_batch], "weight_decay": o.weight_decay,
            "momentum": o.momentum, "nesterov": o.nesterov, "warmup_fraction": o.warmup_fraction,
            "warmup_steps": module.warmup_steps,
            "schedule": "linear warmup, cosine decay", "loss": "berHu",
            "input_scale": task.input_scale, "crop": list(task.crop), "augment": dataclasses.asdict(task.augment),
            "eval_crop": task.eval_crop, "eval_frame": list(task.eval_frame), "depth_cap_m": task.max_depth_eval,
            "min_depth_m": task.min_depth_eval, "depth_field": task.depth_field if train.source == "mat" else None}


def check_train_frames(task, train, reader, failed: list[int]) -> None:
    """DataError when the training frames the scan skipped plus those that ``failed`` to decode during training
    (indices into ``train.items``) exceed ``task.max_bad_fraction`` of the frames the split lists; the message
    names each count and, for a few failed frames, why they do not read."""
    scanned = sum(train.skipped.values())
    bad, total = scanned + len(failed), len(train.items) + scanned
    if bad > task.max_bad_fraction * total:
        examples = [f"{train.items[i]}: {frame_error(reader, train.items[i])}" for i in failed[:3]]
        raise DataError(f"NYU train split: {bad} of {total} frames are unusable ({scanned} skipped by the scan "
                        f"{train.skipped}, {len(failed)} failed to decode during training), more than "
                        f"task.max_bad_fraction={task.max_bad_fraction}; e.g. {examples + train.examples[:3]}. "
                        f"Replace the files, or raise task.max_bad_fraction to train on the rest.")


def _counts(train, test, module) -> dict[str, int]:
    counts = {**train.counts("train"), **test.counts("test")}
    if module is not None:
        counts.update(module.totals)
        counts.update(module.test_counts)
    return counts


def run(ctx: RunContext) -> TaskOutput:
    """Train and test; a DataError after the scan carries the counts made so far (results.json, status failed)."""
    seen: dict = {}
    try:
        return _run(ctx, seen)
    except DataError as e:
        if "train" in seen:
            weights = seen["backbone"].weights.as_dict() if "backbone" in seen else {}
            attach_output(e, TaskOutput(metrics={}, weights=weights,
                                        counts=_counts(seen["train"], seen["test"], seen.get("module"))))
        raise


def _run(ctx: RunContext, seen: dict) -> TaskOutput:
    cfg, task = ctx.cfg, ctx.cfg.task
    reader, train, test = load_splits(task, data_root(task))  # data first: a missing copy fails before model work
    seen.update(train=train, test=test)
    backbone = build_backbone_from_config(cfg.backbone)
    seen["backbone"] = backbone
    optim: DepthTrainingValues = cfg.protocol
    model = DepthModel(backbone, list(task.decoder_channels), skip_connections=task.skip_connections)
    mean, std = backbone.spec.mean, backbone.spec.std  # the normalisation of the weights being transferred
    data = DepthData(DepthFrames(train.items, reader, task, mean=mean, std=std, train=True),
                     DepthFrames(test.items, reader, task, mean=mean, std=std, train=False),
                     batch_size=cfg.trainer.batch_size,
                     # frames of different sizes cannot share a batch: then test one frame at a time
                     eval_batch_size=cfg.trainer.eval_batch_size if len(test.sizes) <= 1 else 1,
                     num_workers=cfg.trainer.num_workers)
    steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else optim.steps
    # A step-based schedule: epochs run until `steps`; the best-loss and last checkpoints are kept, not one per epoch.
    trainer = build_trainer(ctx, monitor="train/loss_epoch", mode="min", max_steps=steps, max_epochs=-1)
    module = DepthModule(model, task, optim, test_frames=len(test.items), global_batch=cfg.trainer.batch_size *
                         trainer.world_size, total_steps=steps, train_frames=len(train.items),
                         check_train=lambda failed: check_train_frames(task, train, reader, failed))
    seen["module"] = module
    ckpt = resume_path(ctx)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if trainer.global_step > module.start_step and module.trained_total == 0:
        raise DataError(f"no training step of this run had data ({trainer.global_step - module.start_step} steps, "
                        f"every batch empty: {_counts(train, test, module)}), so the decoder was never trained and "
                        "its test scores would mean nothing. Replace the training frames that fail to decode (the "
                        "warnings name them and the error).")
    trainer.test(module, datamodule=data, verbose=False)
    if not module.test_metrics and trainer.is_global_zero:
        raise TransferError(f"no NYU test frame had a depth value inside ({task.min_depth_eval}, "
                            f"{task.max_depth_eval}) m within the evaluation crop; check task.depth_scale="
                            f"{task.depth_scale} (PNG values per metre) and the depth files.")
    counts = _counts(train, test, module)
    return TaskOutput(metrics=module.test_metrics, counts=counts, weights=backbone.weights.as_dict(),
                      primary_metric="test/delta1", recipe=recipe_used(task, module, train, test),
                      extra={"head": HEAD, **not_comparable(task, train, test, steps=steps, batch=module.global_batch),
                             "units": {"test/delta1": "%", "test/delta2": "%", "test/delta3": "%", "test/rms": "m"},
                             "eigen_crop_default": list(EIGEN_CROP), "resumed_from": ckpt,
                             "scan_examples": (train.examples + test.examples)[:20], **progress_of(trainer)})
