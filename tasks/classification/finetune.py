"""Full fine-tuning of a registry backbone with a new linear head, trained by the shared Lightning engine.

Under DDP, val and test are padded to a multiple of the number of processes with placeholders
(:class:`transfer.images.PaddedToRanks`) so that ``DistributedSampler`` repeats no image, and the logits of
every process are gathered before scoring: every metric equals the single-process metric on the same data.
Images that fail to decode are dropped from their batch, named, counted once each over all processes and
epochs, and checked against ``task.max_bad_fraction`` at the end of every epoch.
"""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.utilities.distributed import gather_all_tensors

from tasks.classification.metrics import classification_metrics
from tasks.classification.protocols import FinetuneProtocolConfig
from transfer.backbones import Backbone
from transfer.engine import FreezesBackbone
from transfer.images import PaddedToRanks, collate_images, gather_names, unpack
from transfer.loaders import build_loader
from transfer.optim import epoch_schedule, sgd_warmup_cosine


class FinetuneModule(FreezesBackbone, L.LightningModule):
    def __init__(self, backbone: Backbone, num_classes: int, protocol: FinetuneProtocolConfig, *,
                 check_damage: Callable[[set[str]], None] | None = None):
        """``check_damage(names)`` gets the names of every image that failed to decode so far (all processes)
        at the end of each epoch and raises when there are too many."""
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
        self.undecodable: set[str] = set()  # this process's; gathered over processes in _check_damage
        self.scored: dict[str, int] = {}  # images behind the last metrics of each split, over all processes
        self.percent: dict[str, float] = {}  # the last metrics of each split in float64 (Lightning logs float32)
        self.check_damage = check_damage
        if protocol.freeze_backbone:  # only the head trains; the backbone's BN statistics stay as loaded
            self.freeze_submodule("backbone")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, 3, H, W) -> (B, num_classes)

    def training_step(self, batch, batch_idx):
        x, y, undecodable = unpack(batch)
        self.undecodable.update(undecodable)
        if not len(x):  # nothing decodable: a zero loss keeps every DDP process stepping together
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        if self.mixup is not None and len(x) % 2 == 0:  # timm mixes pairs: an even batch
            x, soft = self.mixup(x, y)
            loss = SoftTargetCrossEntropy()(self(x), soft)
        else:
            loss = self.criterion(self(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, split: str) -> None:
        x, y, undecodable = unpack(batch)
        self.undecodable.update(undecodable)
        if len(x):
            self._outputs[split].append((self(x).float(), y))  # (B, num_classes), (B,)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_end(self, split: str) -> None:
        outs = self._outputs[split]
        logits = torch.cat([o[0] for o in outs]) if outs else torch.zeros(0, self.num_classes, device=self.device)
        target = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, dtype=torch.int64, device=self.device)
        outs.clear()
        if self.trainer.world_size > 1:  # every process scored a different shard, of possibly different size
            logits = torch.cat(gather_all_tensors(logits))
            target = torch.cat(gather_all_tensors(target))
        self.scored[split] = len(target)
        metrics = classification_metrics(logits, target, self.num_classes, split)
        if metrics:
            self.percent.update(metrics)
            self.log_dict(metrics, prog_bar=(split == "val"), rank_zero_only=True)
        self._check_damage()

    def _check_damage(self) -> None:
        self.undecodable = gather_names(self.undecodable)
        if self.check_damage is not None:
            self.check_damage(self.undecodable)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._eval_end("val")
        else:
            self._outputs["val"].clear()

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def on_train_epoch_end(self) -> None:
        self._check_damage()

    def configure_optimizers(self):
        p = self.protocol
        total, warmup = epoch_schedule(self.trainer, p.warmup_epochs)
        return sgd_warmup_cosine(self, lr=p.lr, weight_decay=p.weight_decay, momentum=p.momentum,
                                 nesterov=p.nesterov, total_steps=total, warmup_steps=warmup)


class ClassificationData(L.LightningDataModule):
    """Loaders of ``(image tensor, label)`` splits; batches are :class:`transfer.images.ImageBatch`."""

    def __init__(self, train: Dataset, val: Dataset, test: Dataset, *, batch_size: int, eval_batch_size: int,
                 num_workers: int):
        super().__init__()
        self.sets = {"train": train, "val": val, "test": test}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.ranks = 1

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.ranks = self.trainer.world_size

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        data = self.sets[split] if train else PaddedToRanks(self.sets[split], self.ranks)
        # The padded set divides evenly, so the shard's sampler repeats no image. Giving it here (rather than
        # letting Lightning add one) is also what keeps Lightning from warning that DistributedSampler
        # "replicates some samples" during validate/test: here it replicates none.
        return build_loader(data, batch_size=self.batch_size if train else self.eval_batch_size,
                            num_workers=self.num_workers, train=train, every_epoch=split != "test",
                            collate_fn=collate_images,
                            shard=None if train or self.ranks == 1 else (self.trainer.global_rank, self.ranks))

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
