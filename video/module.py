"""Lightning pieces of the video task: the classifier module (train + multi-view test), its data and its EMA."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer.engine import FreezesBackbone
from transfer.loaders import build_loader
from transfer.optim import epoch_schedule, sgd_warmup_cosine
from transfer.train_failures import CountsTrainFailures, TrainFailures
from video.config import VideoFinetuneProtocolConfig
from video.data import collate_skipping
from video.model import VideoClassifier
from video.multiview import MultiViewClips, ViewScores, collate_views


def ema_decay_at(decay: float, updates: torch.Tensor | float, warmup: bool) -> torch.Tensor | float:
    """EMA decay at update ``updates``: ``min(decay, (1 + n) / (10 + n))`` with ``warmup`` (tensorflow/models
    official/modeling/optimization ``EMAConfig.dynamic_decay``, on by default and so in the 3D ResNet-RS
    config), else ``decay``. Without warm-up a 0.9999 average still holds mostly the initial weights after
    thousands of steps."""
    if not warmup:
        return decay
    ramp = (1.0 + updates) / (10.0 + updates)
    return torch.clamp(ramp, max=decay) if isinstance(ramp, torch.Tensor) else min(decay, ramp)


class WarmupEMA(WeightAveraging):
    """Lightning's weight averaging with Model Garden's EMA: parameters and buffers (BN statistics included, as
    ``trainable_weights_only: false``), decay :func:`ema_decay_at`, updated after every step."""

    def __init__(self, decay: float, warmup: bool = True):
        def average(avg: torch.Tensor, current: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
            keep = ema_decay_at(decay, updates.to(torch.float32), warmup)  # a tensor: no host sync per parameter
            return avg + (current - avg) * (1.0 - keep)

        super().__init__(use_buffers=True, avg_fn=average)


class VideoModule(FreezesBackbone, CountsTrainFailures, L.LightningModule):
    """Trains a :class:`VideoClassifier` on random clips; tests it with multi-view score averaging.

    Decode failures are counted per video: ``check_train(failed_indices)`` is called with the training videos
    that failed so far (summed over DDP ranks) after every epoch and at the end of training, and raises when
    they are too many (:class:`transfer.train_failures.CountsTrainFailures`: ``totals`` holds
    ``train/skipped_clips`` and ``train/videos_failed_decode``). After testing, :attr:`scores` holds the reduced
    per-video scores and failures.
    """

    failures_checkpoint_key = "video_decode_failures"

    def __init__(self, model: VideoClassifier, optim: VideoFinetuneProtocolConfig, *, eval_labels: list[int],
                 train_videos: int, global_batch: int, check_train: Callable[[list[int]], None]):
        super().__init__()
        self.model = model
        self.optim = optim
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.eval_labels = eval_labels
        self.global_batch = global_batch
        self.failures = TrainFailures(train_videos, skipped_key="train/skipped_clips",
                                      failed_key="train/videos_failed_decode", check=check_train)
        self.scores: ViewScores | None = None
        self.lr: float | None = None
        if optim.freeze_backbone:  # only the classifier trains; the backbone's BN statistics stay as loaded
            self.freeze_submodule("model.backbone")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 3, T, H, W) -> (B, num_classes)

    def training_step(self, batch, batch_idx):
        self.failures.add(batch["failed"])
        if "video" not in batch:  # every clip of this batch failed to decode
            return None
        loss = self.criterion(self(batch["video"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["label"]))
        return loss

    def on_test_epoch_start(self) -> None:
        self.scores = ViewScores(self.eval_labels, self.model.head.out_features, device=self.device)

    def test_step(self, batch, batch_idx):
        self.scores.fail(batch["failed"])
        if "video" not in batch:
            return
        views = batch["video"]  # (B, S, C, T, H, W)
        logits = self(views.flatten(0, 1)).unflatten(0, views.shape[:2])  # (B, S, K)
        self.scores.update(logits, batch["index"])

    def on_test_epoch_end(self) -> None:
        self.scores.reduce(self.sum_ranks)
        metrics, _ = self.scores.metrics("test")
        if metrics:
            self.log_dict(metrics, rank_zero_only=True)

    def configure_optimizers(self):
        o = self.optim
        self.lr = o.lr * self.global_batch / o.lr_reference_batch  # linear scaling from the recipe's batch
        total, warmup = epoch_schedule(self.trainer, o.warmup_epochs)
        return sgd_warmup_cosine(self.model, lr=self.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                 nesterov=o.nesterov, total_steps=total, warmup_steps=warmup)


class VideoData(L.LightningDataModule):
    """Train clips and multi-view test views; the test set is padded to a multiple of the world size.

    ``eval_batch_size`` counts temporal clips, each carrying all its spatial crops.
    """

    def __init__(self, train: Dataset, test_views: MultiViewClips, *, batch_size: int, eval_batch_size: int,
                 num_workers: int):
        super().__init__()
        self.train, self.test_views = train, test_views
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def setup(self, stage: str) -> None:
        if self.trainer is not None and stage == "test":
            self.test_views.pad(self.trainer.world_size)

    def _loader(self, data: Dataset, batch_size: int, train: bool, collate) -> DataLoader:
        return build_loader(data, batch_size=batch_size, num_workers=self.num_workers, train=train, collate_fn=collate)

    def train_dataloader(self):
        return self._loader(self.train, self.batch_size, True, collate_skipping)

    def test_dataloader(self):
        return self._loader(self.test_views, self.eval_batch_size, False, collate_views)
