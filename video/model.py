"""The 3D backbone (an inflated registry backbone) and the video classifier built on it."""
from __future__ import annotations

import torch
from torch import nn

from transfer.backbones import Backbone, BackboneSpec, FeatureLevel, build_backbone
from transfer.weights import WeightsInfo
from video.inflate import InflationConfig, inflate_model


class VideoBackbone(nn.Module):
    """A registry backbone inflated to 3D; the video counterpart of :class:`transfer.backbones.Backbone`.

    ``feature_info`` strides are spatial; every level after the stem has temporal stride
    ``temporal_stride`` (stages keep the clip length, as in 3D ResNet-RS).
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: WeightsInfo, inflation: InflationConfig,
                 feature_info: list[FeatureLevel]):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.inflation = inflation
        self.num_features: int = model.num_features
        self.feature_info = feature_info
        self.temporal_stride = inflation.stem_temporal_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding: (B, 3, T, H, W) -> (B, num_features)."""
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level: (B, 3, T, H, W) -> [(B, C_i, T/t, H/s_i, W/s_i)]."""
        return self.model.forward_intermediates(x, intermediates_only=True)


def inflate_backbone(backbone: Backbone, inflation: InflationConfig) -> VideoBackbone:
    """The 3D form of an already built 2D ``backbone`` (its weights kept per ``inflation.mode``)."""
    return VideoBackbone(backbone.spec, inflate_model(backbone.model, inflation), backbone.weights, inflation,
                         list(backbone.feature_info))


def build_video_backbone(name: str, *, weights: str = "pretrained", inflation: InflationConfig | None = None,
                         strict: bool = True, drop_path_rate: float = 0.0) -> VideoBackbone:
    """Build registry backbone ``name`` with ``weights`` (see ``build_backbone``) and inflate it to 3D."""
    backbone = build_backbone(name, weights=weights, strict=strict, drop_path_rate=drop_path_rate)
    return inflate_backbone(backbone, inflation or InflationConfig())


class VideoClassifier(nn.Module):
    """3D backbone -> dropout -> linear classifier. Input (B, 3, T, H, W), output logits (B, num_classes)."""

    def __init__(self, backbone: VideoBackbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))
