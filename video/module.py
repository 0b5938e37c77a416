"""Lightning pieces of the video task: the classifier module (train + multi-view test) and its data."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer.optim import sgd_warmup_cosine
from video.config import VideoOptimSettings
from video.data import collate_skipping
from video.model import VideoClassifier
from video.multiview import MultiViewClips, ViewScores, collate_views


class VideoModule(L.LightningModule):
    """Trains a :class:`VideoClassifier` on random clips; tests it with multi-view score averaging."""

    def __init__(self, model: VideoClassifier, optim: VideoOptimSettings, *, eval_labels: list[int],
                 global_batch: int):
        super().__init__()
        self.model = model
        self.optim = optim
        self.criterion = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.eval_labels = eval_labels
        self.global_batch = global_batch
        self.skipped = {"train": 0, "test": 0}
        self.scores: ViewScores | None = None
        self.test_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, 3, T, H, W) -> (B, num_classes)

    def training_step(self, batch, batch_idx):
        self.skipped["train"] += int(batch["skipped"])
        if "video" not in batch:  # every clip of this batch failed to decode
            return None
        loss = self.criterion(self(batch["video"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["label"]))
        return loss

    def on_test_epoch_start(self) -> None:
        self.scores = ViewScores(self.eval_labels, self.model.head.out_features, device=self.device)
        self.skipped["test"] = 0

    def test_step(self, batch, batch_idx):
        self.skipped["test"] += int(batch["skipped"])
        if "video" not in batch:
            return
        views = batch["video"]  # (B, S, C, T, H, W)
        logits = self(views.flatten(0, 1)).unflatten(0, views.shape[:2])  # (B, S, K)
        self.scores.update(logits, batch["index"])

    def on_test_epoch_end(self) -> None:
        reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        self.scores.reduce(reduce)
        metrics, unseen = self.scores.metrics("test")
        self.test_metrics = metrics
        self.skipped["test"] = int(reduce(torch.tensor(self.skipped["test"], device=self.device)))
        self.skipped["test_videos_without_views"] = unseen
        self.log_dict(metrics, rank_zero_only=True)

    def on_train_end(self) -> None:
        total = self.trainer.strategy.reduce(torch.tensor(self.skipped["train"], device=self.device), reduce_op="sum")
        self.skipped["train"] = int(total)

    def configure_optimizers(self):
        o = self.optim
        lr = o.lr * self.global_batch / o.lr_reference_batch  # linear scaling from the recipe's batch
        return sgd_warmup_cosine(self.model, self.trainer, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                 nesterov=o.nesterov, warmup_epochs=o.warmup_epochs)


class VideoData(L.LightningDataModule):
    """Train clips and multi-view test views; the test set is padded to a multiple of the world size."""

    def __init__(self, train: Dataset, test_views: MultiViewClips, *, batch_size: int, eval_batch_size: int,
                 num_workers: int):
        super().__init__()
        self.train, self.test_views = train, test_views
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def setup(self, stage: str) -> None:
        if self.trainer is not None and stage == "test":
            self.test_views.pad(self.trainer.world_size)

    def _loader(self, data: Dataset, batch_size: int, train: bool, collate) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, shuffle=train, drop_last=train and len(data) > batch_size,
                          num_workers=self.num_workers, persistent_workers=False, collate_fn=collate,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(self.train, self.batch_size, True, collate_skipping)

    def test_dataloader(self):
        return self._loader(self.test_views, self.eval_batch_size, False, collate_views)
