"""Lightning pieces of the depth task: the module (berHu training, per-frame test errors) and its data."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tasks.depth.config import DepthOptimConfig, DepthTaskConfig
from tasks.depth.metrics import METRIC_NAMES, berhu_loss, depth_errors, eval_mask
from tasks.depth.model import DepthModel
from transfer.loaders import build_loader
from transfer.optim import param_groups, warmup_cosine


class DepthModule(L.LightningModule):
    """Trains :class:`DepthModel` with the berHu loss; tests with per-frame errors keyed by frame index.

    Test errors land in a (frames, metrics + 1) table summed over processes, so frames that a
    distributed sampler repeats to even out the shards are averaged with themselves, not counted twice.
    Training frames that fail to decode are counted per frame: ``check_train(failed_indices)`` (summed over
    DDP ranks) runs after every epoch and at the end of training and raises when they are too many.
    """

    def __init__(self, model: DepthModel, task: DepthTaskConfig, *, test_frames: int, global_batch: int,
                 total_steps: int, train_frames: int = 0,
                 check_train: Callable[[list[int]], None] = lambda failed: None):
        super().__init__()
        self.model, self.task, self.optim = model, task, task.optim
        self.test_frames, self.global_batch, self.total_steps = test_frames, global_batch, total_steps
        self.check_train = check_train
        self.train_failed = torch.zeros(train_frames, dtype=torch.bool)  # this rank's, over all epochs
        self.skipped_train = 0  # this rank's skipped reads (a frame fails once per epoch)
        self.totals = {"train/skipped_frames": 0, "train/frames_failed_decode": 0}
        self._failed_so_far: list[int] = []
        # Batches that reached the loss, this rank's and (after training) all ranks' in this process; Lightning
        # advances global_step even when every batch of a step was empty.
        self.trained_batches, self.trained_total, self.start_step = 0, 0, 0
        self.table: torch.Tensor | None = None
        self.test_metrics: dict[str, float] = {}
        self.test_counts: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 3, H, W) -> (B, 1, H, W) metres

    def training_step(self, batch, batch_idx):
        failed = batch["failed"]
        self.train_failed[failed.cpu()] = True
        self.skipped_train += len(failed)
        if "image" not in batch:  # every frame of this batch failed to decode
            return None
        self.trained_batches += 1
        gt = batch["depth"]
        pred = F.interpolate(self(batch["image"]), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        loss = berhu_loss(pred.float(), gt, gt > 0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(gt))
        return loss

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")

    def _reduce_train(self) -> list[int]:
        failed = (self._sum(self.train_failed.to(torch.int32)) > 0).nonzero().flatten().tolist()
        self.totals = {"train/skipped_frames": int(self._sum(torch.tensor(self.skipped_train))),
                       "train/frames_failed_decode": len(failed)}
        return failed

    def on_train_epoch_end(self) -> None:
        self._failed_so_far = self._reduce_train()
        self.check_train(self._failed_so_far)

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step  # > 0 when resumed

    def on_train_end(self) -> None:
        self.check_train(self._reduce_train())
        self.trained_total = int(self._sum(torch.tensor(self.trained_batches)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The counts of every rank, as of the last epoch end: a resumed run keeps counting from them.
        checkpoint["depth_decode_failures"] = {"train_failed": self._failed_so_far,
                                               "skipped_frames": self.totals["train/skipped_frames"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("depth_decode_failures")
        if saved:
            self.train_failed[saved["train_failed"]] = True  # a union: the same on every rank
            trainer = getattr(self, "_trainer", None)
            if trainer is None or trainer.global_rank == 0:  # a sum: counted once
                self.skipped_train = int(saved["skipped_frames"])

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

        return build_loader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers, train=True,
                            collate_fn=collate_counting)

    def test_dataloader(self) -> DataLoader:
        return build_loader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers, train=False)
