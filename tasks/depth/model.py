"""A registry backbone with the FCRN depth decoder (Laina et al. 2016, arXiv 1606.00373).

BYOL's NYU protocol (arXiv 2006.07733, App. D.6) feeds the last feature map ("conv5") into 4 fast
up-projection blocks of 512, 256, 128 and 64 channels; FCRN projects it to 1024 channels with a 1x1
convolution first and predicts depth with a final 3x3 convolution, at 1/2 of the input resolution.
``skip_connections`` adds the earlier levels of ``Backbone.forward_features`` (projected by 1x1
convolutions) after the matching up-projections, a multi-scale variant that is off in the recipe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer.backbones import Backbone


class FastUpConv(nn.Module):
    """2x up-sampling convolution: the same as inserting zeros between pixels and a 5x5 convolution, computed as
    four small convolutions (3x3, 3x2, 2x3, 2x2) whose outputs are interleaved (FCRN's "fast up-convolution").

    (B, C_in, H, W) -> (B, C_out, 2H, 2W). Output pixel (2i + a, 2j + b) sees the input rows i-1..i+1 when
    a = 0 and i..i+1 when a = 1 (columns alike), which sets each convolution's kernel and padding.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # (kernel, padding left/right/top/bottom) for output phase (a, b); F.pad takes (left, right, top, bottom).
        self.phases = nn.ModuleList([nn.Conv2d(in_channels, out_channels, k, bias=False)
                                     for k in ((3, 3), (3, 2), (2, 3), (2, 2))])
        self.pads = ((1, 1, 1, 1), (0, 1, 1, 1), (1, 1, 0, 1), (0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(F.pad(x, pad)) for conv, pad in zip(self.phases, self.pads)]  # 4 x (B, C, H, W)
        # pixel_shuffle takes channel c*4 + a*2 + b to output phase (a, b).
        return F.pixel_shuffle(torch.stack(outs, dim=2).flatten(1, 2), 2)  # (B, C, 2H, 2W)


class UpProjection(nn.Module):
    """FCRN's up-projection block: two fast up-convolutions, one followed by ReLU + 3x3 conv, summed, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up_main, self.up_skip = FastUpConv(in_channels, out_channels), FastUpConv(in_channels, out_channels)
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(out_channels) for _ in range(3))
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.conv(F.relu(self.bn1(self.up_main(x)))))
        return F.relu(main + self.bn3(self.up_skip(x)))  # (B, C_out, 2H, 2W)


class DepthDecoder(nn.Module):
    """Last feature level -> 1x1 projection -> up-projections -> 3x3 conv to one channel (depth in metres)."""

    def __init__(self, level_channels: list[int], channels: list[int], *, skip_connections: bool = False):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(level_channels[-1], channels[0], 1, bias=False),
                                     nn.BatchNorm2d(channels[0]))
        self.blocks = nn.ModuleList([UpProjection(a, b) for a, b in zip(channels[:-1], channels[1:])])
        # Skip k joins after block k: level -2-k of the backbone (res4, res3, res2 for a 5-level ResNet).
        n_skips = min(len(self.blocks) - 1, len(level_channels) - 1) if skip_connections else 0
        self.skips = nn.ModuleList([nn.Conv2d(level_channels[-2 - k], channels[k + 1], 1) for k in range(n_skips)])
        self.predict = nn.Conv2d(channels[-1], 1, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.project(features[-1])
        for k, block in enumerate(self.blocks):
            x = block(x)
            if k < len(self.skips):
                skip = features[-2 - k]
                x = x + F.interpolate(self.skips[k](skip), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.predict(x)  # (B, 1, H / 2, W / 2) for a stride-32 last level and 4 blocks


class DepthModel(nn.Module):
    """(B, 3, H, W) normalised image -> (B, 1, H, W) depth in metres (the decoder output resized bilinearly).

    A frozen backbone (``protocol=frozen``) is :class:`tasks.depth.module.DepthModule`'s job
    (:class:`transfer.engine.FreezesBackbone`), which holds it in eval mode throughout a Lightning fit.
    """

    def __init__(self, backbone: Backbone, channels: list[int], *, skip_connections: bool = False):
        super().__init__()
        self.backbone = backbone
        self.decoder = DepthDecoder([f.channels for f in backbone.feature_info], channels,
                                    skip_connections=skip_connections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.backbone.forward_features(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
