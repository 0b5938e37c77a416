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


def epoch_schedule(trainer: L.Trainer, warmup_epochs: float) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` of a fit measured in epochs: every optimiser step ``trainer`` will take, and
    the steps of ``warmup_epochs`` of them."""
    total = max(1, int(trainer.estimated_stepping_batches))
    return total, int(round(warmup_epochs * total / max(1, trainer.max_epochs or 1)))


def sgd_warmup_cosine(module: nn.Module, *, lr: float, weight_decay: float, momentum: float, nesterov: bool,
                      total_steps: int, warmup_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` answer for ``module``: SGD over :func:`param_groups`, the learning rate
    warmed up over ``warmup_steps`` (at most ``total_steps - 1``) then cosine-decayed to 0 at ``total_steps``.
    ``nesterov`` is used as given (the recipe results.json records): ``nesterov=True`` with ``momentum=0`` is refused
    by the protocol schemas (:func:`transfer.protocols.check_sgd_momentum`) and by ``torch.optim.SGD`` (ValueError)."""
    opt = torch.optim.SGD(param_groups(module, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)
    total = max(1, total_steps)
    warmup = min(total - 1, warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup=warmup, total=total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
