"""Full fine-tuning of a registry backbone with a new linear head, trained by the shared Lightning engine."""
from __future__ import annotations

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.classification.metrics import classification_metrics
from transfer.backbones import Backbone
from transfer.optim import sgd_warmup_cosine
from transfer.protocols import FinetuneProtocolConfig


class FinetuneModule(L.LightningModule):
    def __init__(self, backbone: Backbone, num_classes: int, protocol: FinetuneProtocolConfig,
                 split_prefix: str = "val"):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(protocol.dropout), nn.Linear(backbone.num_features, num_classes))
        self.protocol = protocol
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss(label_smoothing=protocol.label_smoothing)
        # timm's Mixup/CutMix mixes a batch and gives smoothed soft targets; off unless an alpha is set.
        self.mixup = Mixup(mixup_alpha=protocol.mixup, cutmix_alpha=protocol.cutmix,
                           label_smoothing=protocol.label_smoothing, num_classes=num_classes) \
            if protocol.mixup > 0 or protocol.cutmix > 0 else None
        self._outputs: dict[str, list] = {"val": [], "test": []}
        if protocol.freeze_backbone:
            backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, H, W) -> (B, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup is not None and len(x) % 2 == 0:  # timm mixes pairs: an even batch
            x, soft = self.mixup(x, y)
            loss = SoftTargetCrossEntropy()(self(x), soft)
        else:
            loss = self.criterion(self(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def _eval_step(self, batch, split: str) -> None:
        x, y = batch
        self._outputs[split].append((self(x).float(), y))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_end(self, split: str) -> None:
        outs = self._outputs[split]
        if not outs:
            return
        logits = torch.cat([o[0] for o in outs])
        target = torch.cat([o[1] for o in outs])
        if self.trainer.world_size > 1:  # every rank saw a different shard
            logits = self.all_gather(logits).flatten(0, 1)
            target = self.all_gather(target).flatten(0, 1)
        self.log_dict(classification_metrics(logits, target, self.num_classes, split), prog_bar=(split == "val"),
                      rank_zero_only=True)
        outs.clear()

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self):
        p = self.protocol
        return sgd_warmup_cosine(self, self.trainer, lr=p.lr, weight_decay=p.weight_decay, momentum=p.momentum,
                                 nesterov=p.nesterov, warmup_epochs=p.warmup_epochs)


class ClassificationData(L.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset, test: Dataset, *, batch_size: int, eval_batch_size: int,
                 num_workers: int):
        super().__init__()
        self.sets = {"train": train, "val": val, "test": test}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return DataLoader(self.sets[split], batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, drop_last=train and len(self.sets[split]) > self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
