"""The one optimiser recipe every trained task shares: SGD (Nesterov), no decay on norms and biases,
linear warmup then cosine decay, stepped per batch."""
from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norm layers and biases (every parameter with fewer than two dimensions)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sgd_warmup_cosine(module: nn.Module, trainer: L.Trainer, *, lr: float, weight_decay: float, momentum: float,
                      nesterov: bool, warmup_epochs: float) -> dict:
    """Lightning's ``configure_optimizers`` answer for ``module`` trained by ``trainer``."""
    opt = torch.optim.SGD(param_groups(module, weight_decay), lr=lr, momentum=momentum,
                          nesterov=nesterov and momentum > 0)
    total = max(1, int(trainer.estimated_stepping_batches))
    warmup = min(total - 1, int(round(warmup_epochs * total / max(1, trainer.max_epochs or 1))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup=warmup, total=total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
