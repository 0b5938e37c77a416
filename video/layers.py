"""3D layers with no 2D counterpart to convert: SE squeezing over time and space, self-gating, global pooling.

Written here because timm's SE and pooling modules reduce over (H, W) only, and neither torch nor
pytorchvideo ships a self-gating layer that takes (B, C, T, H, W) with a per-channel gate.
"""
from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite3d(nn.Module):
    """Squeeze-and-excitation whose squeeze averages over (T, H, W), as in 3D ResNet-RS.

    Takes over the excitation layers of a converted 2D SE module (1x1x1 convs, optional BN).
    """

    def __init__(self, fc1: nn.Module, bn: nn.Module, act: nn.Module, fc2: nn.Module, gate: nn.Module,
                 add_maxpool: bool = False):
        super().__init__()
        self.fc1, self.bn, self.act, self.fc2, self.gate = fc1, bn, act, fc2, gate
        self.add_maxpool = add_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3, 4), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


class SelfGating3d(nn.Module):
    """Per-channel gate from the clip's global average (Xie et al. 2018, S3D-G; used by 3D ResNet-RS).

    Layout as tensorflow/models official/vision/modeling/layers/nn_blocks_3d.py ``SelfGating``: global
    average over (T, H, W) -> 1x1x1 conv with bias -> sigmoid -> scale. Two differences, because the
    network here starts from 2D ImageNet weights instead of from scratch: the gate is ``2 * sigmoid`` and
    its conv starts at zero, so at initialisation the gate is exactly 1 and the inflated network computes
    the 2D one. Model Garden's ``sigmoid`` with a truncated-normal (std 0.01) conv starts near 0.5, which
    halves the gated residual branches of a pretrained network (cosine 0.93 to the 2D output for rs50
    with Model Garden's gate). Range (0, 2) instead of (0, 1); the gradients at the start are those of
    Model Garden's gate times 2.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv3d(channels, channels, kernel_size=1, bias=True)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 * torch.sigmoid(self.fc(x.mean((2, 3, 4), keepdim=True))))  # (B, C, 1, 1, 1) gate


class GlobalAvgPool3d(nn.Module):
    """(B, C, T, H, W) -> (B, C): the 3D form of timm's average ``global_pool``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3, 4))
