"""The video LightningModule (video/module.py): its optimiser and schedule from the recipe at a global batch, the
label smoothing of its loss, its EMA, its loaders. Tiny models and direct calls; no Trainer.fit."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from video.config import VideoFinetuneProtocolConfig
from video.module import VideoModule, WarmupEMA, ema_decay_at

# The 3D ResNet-RS recipe's values (video/config.py, VideoFinetuneProtocolConfig): SGD 0.8 at a global batch of
# 1024, momentum 0.9 Nesterov, weight decay 4e-5, 5 warm-up epochs, label smoothing 0.1.
RECIPE = VideoFinetuneProtocolConfig(lr=0.8, lr_reference_batch=1024, weight_decay=4e-5, momentum=0.9,
                                     nesterov=True, warmup_epochs=5.0, label_smoothing=0.1)


class TinyVideo(nn.Module):
    """(B, 3, T, H, W) -> (B, 3) with a conv, a BN and a linear head: decayed weights and undecayed norms/biases."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3, 4)))


def _module(optim: VideoFinetuneProtocolConfig = RECIPE, *, global_batch: int = 64, steps: int = 100, epochs: int = 10):
    torch.manual_seed(0)
    module = VideoModule(TinyVideo(), optim, eval_labels=[0, 1], train_videos=8, global_batch=global_batch,
                         check_train=lambda failed: None)
    # What configure_optimizers reads of the Trainer: the optimiser steps of the fit and its epochs.
    module._trainer = SimpleNamespace(estimated_stepping_batches=steps, max_epochs=epochs)
    return module


@pytest.mark.parametrize("global_batch", [64, 1024, 2048])
def test_the_learning_rate_scales_linearly_from_the_recipe_batch(global_batch):
    module = _module(global_batch=global_batch)
    opt = module.configure_optimizers()["optimizer"]
    assert module.lr == pytest.approx(0.8 * global_batch / 1024)
    assert all(g["initial_lr"] == pytest.approx(module.lr) for g in opt.param_groups)


def test_sgd_values_and_no_decay_on_norms_and_biases():
    module = _module()
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(module.model.conv.weight), id(module.model.head.weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, head bias
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)


def test_warmup_over_the_recipe_epochs_then_cosine_to_zero_per_step():
    module = _module(steps=100, epochs=10)  # 10 steps an epoch: 5 warm-up epochs are 50 steps
    answer = module.configure_optimizers()
    opt, sched = answer["optimizer"], answer["lr_scheduler"]
    assert sched["interval"] == "step"
    peak = 0.8 * 64 / 1024
    seen = []
    for _ in range(101):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert seen[0] == pytest.approx(peak / 50) and seen[49] == pytest.approx(peak)
    assert seen[75] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 25 / 50)))
    assert seen[100] == pytest.approx(0.0, abs=1e-12)


def test_the_training_loss_is_label_smoothed_cross_entropy(monkeypatch):
    module = _module(VideoFinetuneProtocolConfig(label_smoothing=0.3))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = {"video": torch.randn(4, 3, 2, 4, 4), "label": torch.tensor([0, 1, 2, 1]),
             "failed": torch.tensor([5], dtype=torch.long)}
    loss = module.training_step(batch, 0).item()
    with torch.no_grad():
        logits = module(batch["video"])  # train-mode BN: the same batch statistics as in the step
    assert loss == pytest.approx(float(F.cross_entropy(logits, batch["label"], label_smoothing=0.3)))
    assert loss != pytest.approx(float(F.cross_entropy(logits, batch["label"])))
    assert module.failures.skipped == 1 and module.failures.failed.nonzero().flatten().tolist() == [5]
    # a batch where every clip failed trains nothing and is counted
    assert module.training_step({"failed": torch.tensor([6, 7])}, 1) is None
    assert module.failures.skipped == 3


def test_the_ema_callback_averages_parameters_and_bn_statistics_with_the_warmup_decay():
    model = TinyVideo()
    ema = WarmupEMA(0.99, warmup=True)
    # What Lightning's WeightAveraging builds in setup(): an AveragedModel with the callback's settings.
    average = AveragedModel(model, use_buffers=True, **ema._kwargs)
    average.update_parameters(model)  # the first update copies
    before = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn.running_mean.add_(2.0)
    average.update_parameters(model)  # update n = 1: decay min(0.99, 2 / 11)
    keep = ema_decay_at(0.99, 1.0, True)
    assert keep == pytest.approx(2 / 11)
    after = average.module.state_dict()
    for name, p in model.state_dict().items():
        if p.dtype.is_floating_point:
            assert after[name] == pytest.approx(before[name] + (p - before[name]) * (1 - keep)), name
    assert not torch.equal(after["bn.running_mean"], before["bn.running_mean"])  # BN statistics averaged too


def test_without_warmup_the_ema_decay_is_constant():
    assert ema_decay_at(0.9, 0.0, False) == ema_decay_at(0.9, 1e6, False) == 0.9
    assert ema_decay_at(0.9, torch.tensor(1e6), True) == pytest.approx(0.9)
