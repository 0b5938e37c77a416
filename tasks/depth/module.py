"""Lightning pieces of the depth task: the module (berHu training, per-frame test errors) and its data."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tasks.depth.config import DepthOptimConfig, DepthTaskConfig
from tasks.depth.metrics import METRIC_NAMES, berhu_loss, depth_errors, eval_mask
from tasks.depth.model import DepthModel
from transfer.optim import param_groups, warmup_cosine


class DepthModule(L.LightningModule):
    """Trains :class:`DepthModel` with the berHu loss; tests with per-frame errors keyed by frame index.

    Test errors land in a (frames, metrics + 1) table summed over processes, so frames that a
    distributed sampler repeats to even out the shards are averaged with themselves, not counted twice.
    """

    def __init__(self, model: DepthModel, task: DepthTaskConfig, *, test_frames: int, global_batch: int,
                 total_steps: int):
        super().__init__()
        self.model, self.task, self.optim = model, task, task.optim
        self.test_frames, self.global_batch, self.total_steps = test_frames, global_batch, total_steps
        self.skipped_train = 0
        self.table: torch.Tensor | None = None
        self.test_metrics: dict[str, float] = {}
        self.test_counts: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 3, H, W) -> (B, 1, H, W) metres

    def training_step(self, batch, batch_idx):
        self.skipped_train += int(batch["skipped"])
        if "image" not in batch:  # every frame of this batch failed to decode
            return None
        gt = batch["depth"]
        pred = F.interpolate(self(batch["image"]), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        loss = berhu_loss(pred.float(), gt, gt > 0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(gt))
        return loss

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
        o: DepthOptimConfig = self.optim
        lr = o.lr * self.global_batch / o.lr_reference_batch  # linear scaling (BYOL App. D.6 scaled FCRN's so)
        opt = torch.optim.SGD(param_groups(self, o.weight_decay), lr=lr, momentum=o.momentum,
                              nesterov=o.nesterov and o.momentum > 0)
        warmup = min(self.total_steps - 1, round(o.warmup_fraction * self.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup=warmup, total=self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DepthData(L.LightningDataModule):
    def __init__(self, train: Dataset, test: Dataset, *, batch_size: int, eval_batch_size: int, num_workers: int):
        super().__init__()
        self.train_set, self.test_set = train, test
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        from tasks.depth.data import collate_counting

        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.train_set) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_counting,
                          pin_memory=torch.cuda.is_available())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())
