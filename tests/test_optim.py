import math

import pytest
import torch
from torch import nn

from transfer.optim import param_groups, warmup_cosine


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


@pytest.mark.parametrize("warmup", [0, 5])
def test_warmup_then_cosine_to_zero(warmup):
    total = 20
    values = [warmup_cosine(s, warmup=warmup, total=total) for s in range(total + 1)]
    if warmup:
        assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert values[warmup] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    mid = warmup + (total - warmup) // 2
    assert values[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warmup) / (total - warmup))))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))
    assert torch.tensor(values).isfinite().all()
