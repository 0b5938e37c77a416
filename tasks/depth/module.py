"""Lightning pieces of the depth task: the module (berHu training, per-frame test errors) and its data."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tasks.depth.config import DepthTaskConfig, DepthTrainingValues
from tasks.depth.metrics import METRIC_NAMES, berhu_loss, depth_errors, eval_mask
from tasks.depth.model import DepthModel
from transfer.engine import FreezesBackbone
from transfer.loaders import build_loader
from transfer.optim import sgd_warmup_cosine
from transfer.protocols import is_frozen_protocol
from transfer.train_failures import CountsTrainFailures, TrainFailures


class DepthModule(FreezesBackbone, CountsTrainFailures, L.LightningModule):
    """Trains :class:`DepthModel` with the berHu loss and the protocol's SGD recipe ``optim``; tests with per-frame
    errors keyed by frame index.

    Under a frozen protocol (``protocol=frozen``, or a finetune section with ``freeze_backbone=true``) only the
    decoder trains: the backbone takes no gradient and is held in eval mode for the whole fit
    (:class:`transfer.engine.FreezesBackbone`), so its weights and batch-norm statistics stay as loaded.

    Test errors land in a (frames, metrics + 1) table summed over processes, so frames that a
    distributed sampler repeats to even out the shards are averaged with themselves, not counted twice.
    Training frames that fail to decode are counted per frame: ``check_train(failed_indices)`` (summed over
    DDP ranks) runs after every epoch and at the end of training and raises when they are too many.
    """

    failures_checkpoint_key = "depth_decode_failures"

    def __init__(self, model: DepthModel, task: DepthTaskConfig, optim: DepthTrainingValues, *, test_frames: int,
                 global_batch: int, total_steps: int, train_frames: int = 0,
                 check_train: Callable[[list[int]], None] = lambda failed: None):
        super().__init__()
        self.model, self.task, self.optim = model, task, optim
        self.frozen_backbone = is_frozen_protocol(type(optim), asdict(optim))
        if self.frozen_backbone:
            self.freeze_submodule("model.backbone")
        self.test_frames, self.global_batch, self.total_steps = test_frames, global_batch, total_steps
        # linear warmup over this many of the steps (at most all but the last), then cosine decay
        self.warmup_steps = min(max(0, total_steps - 1), round(optim.warmup_fraction * total_steps))
        self.failures = TrainFailures(train_frames, skipped_key="train/skipped_frames",
                                      failed_key="train/frames_failed_decode", check=check_train)
        # Batches that reached the loss, this rank's and (after training) all ranks' in this process; Lightning
        # advances global_step even when every batch of a step was empty. start_step: the global step this process
        # started from (the checkpoint's when resumed), so global_step - start_step steps were trained here.
        self.trained_batches, self.trained_total, self.start_step = 0, 0, 0
        self.table: torch.Tensor | None = None
        self.test_metrics: dict[str, float] = {}
        self.test_counts: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 3, H, W) -> (B, 1, H, W) metres

    def training_step(self, batch, batch_idx):
        self.failures.add(batch["failed"])
        if "image" not in batch:  # every frame of this batch failed to decode
            return None
        self.trained_batches += 1
        gt = batch["depth"]
        pred = F.interpolate(self(batch["image"]), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        loss = berhu_loss(pred.float(), gt, gt > 0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(gt))
        return loss

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # The step this process starts from. Set here, not only in on_train_start: a resumed run whose training had
        # finished (stopped during its test) skips the fit loop, and on_train_start never runs.
        self.start_step = int(checkpoint.get("global_step", 0))

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step  # > 0 when resumed

    def on_train_end(self) -> None:
        super().on_train_end()
        self.trained_total = int(self.sum_ranks(torch.tensor(self.trained_batches)))

    def on_test_epoch_start(self) -> None:
        self.table = torch.zeros(self.test_frames, len(METRIC_NAMES) + 2, dtype=torch.float64, device=self.device)

    def test_step(self, batch, batch_idx):
        gt = batch["depth"]  # (B, 1, H, W) at the frame's own resolution
        pred = F.interpolate(self(batch["image"]).float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        t = self.task
        for p, g, i in zip(pred[:, 0], gt[:, 0], batch["index"].tolist()):
            mask = eval_mask(g, min_depth=t.min_depth_eval, max_depth=t.max_depth_eval, crop=t.eval_crop,
                             frame=t.eval_frame)
            errors = depth_errors(p, g, mask, min_depth=t.min_depth_eval, max_depth=t.max_depth_eval)
            self.table[i, -2] += 1  # times seen (a padded shard repeats frames)
            if errors is not None:
                self.table[i, :-2] += errors.to(self.table)
                self.table[i, -1] += 1  # times scored

    def on_test_epoch_end(self) -> None:
        table = self.trainer.strategy.reduce(self.table, reduce_op="sum")
        seen, scored = table[:, -2], table[:, -1]
        valid = scored > 0
        per_frame = table[valid, :-2] / scored[valid, None]
        self.test_counts = {"test/frames_scored": int(valid.sum()),
                            "test/frames_without_valid_depth": int(((seen > 0) & ~valid).sum()),
                            "test/frames_not_seen": int((seen == 0).sum())}
        if per_frame.numel():
            self.test_metrics = {f"test/{k}": float(v) for k, v in zip(METRIC_NAMES, per_frame.mean(0).tolist())}
            self.log_dict(self.test_metrics, rank_zero_only=True)

    def configure_optimizers(self):
        o: DepthTrainingValues = self.optim
        lr = scaled_lr(o, self.global_batch)
        return sgd_warmup_cosine(self, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov,
                                 total_steps=self.total_steps, warmup_steps=self.warmup_steps)


def scaled_lr(optim: DepthTrainingValues, global_batch: int) -> float:
    """``optim.lr`` at ``optim.lr_reference_batch`` scaled linearly to ``global_batch`` (BYOL App. D.6 gives 0.16 at
    batch 256)."""
    return optim.lr * global_batch / optim.lr_reference_batch


class DepthData(L.LightningDataModule):
    def __init__(self, train: Dataset, test: Dataset, *, batch_size: int, eval_batch_size: int, num_workers: int):
        super().__init__()
        self.train_set, self.test_set = train, test
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        from tasks.depth.data import collate_counting

        return build_loader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers, train=True,
                            collate_fn=collate_counting)

    def test_dataloader(self) -> DataLoader:
        return build_loader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers, train=False)
