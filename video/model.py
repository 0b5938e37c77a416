"""The 3D backbone (an inflated registry backbone) and the video classifier built on it."""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from transfer.backbones import Backbone, BackboneSpec, FeatureLevel, RegistryNetwork, build_backbone_from_config
from transfer.config import BackboneConfig
from transfer.weights import WeightsInfo
from video.inflate import InflationConfig, inflate_model, stage_modules


class VideoBackbone(RegistryNetwork):
    """A registry backbone inflated to 3D; the video counterpart of :class:`transfer.backbones.Backbone`, with the
    same contract (``forward``: (B, 3, T, H, W) -> (B, num_features); ``forward_features``: -> one
    (B, C_i, T/t, H/s_i, W/s_i) map per level) plus what inflation adds.

    ``feature_info`` strides are spatial; every level after the stem has temporal stride
    ``temporal_stride`` (stages keep the clip length, as in 3D ResNet-RS).
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: WeightsInfo, inflation: InflationConfig,
                 feature_info: list[FeatureLevel]):
        super().__init__(spec, model, weights, feature_info)
        self.inflation = inflation
        self.temporal_stride = inflation.stem_temporal_stride
        self.training_layers: dict = {}  # drop path per stage and BN momentum set by build_video_backbone


def inflate_backbone(backbone: Backbone, inflation: InflationConfig) -> VideoBackbone:
    """The 3D form of an already built 2D ``backbone`` (its weights kept per ``inflation.mode``)."""
    return VideoBackbone(backbone.spec, inflate_model(backbone.model, inflation), backbone.weights, inflation,
                         list(backbone.feature_info))


def stage_drop_path_rates(rate: float, stages: int) -> list[float]:
    """Stochastic depth of each stage: ``rate x (i + 2) / (stages + 1)`` for stage i = 0..stages-1, constant within
    a stage (tensorflow/models official/vision/modeling/backbones/resnet_3d.py ``_build_model`` with
    ``nn_layers.get_stochastic_depth_rate(rate, i + 2, 5)``): 0.04 / 0.06 / 0.08 / 0.10 for rate 0.1.
    timm's own rule rises per block instead."""
    return [rate * (i + 2) / (stages + 1) for i in range(stages)]


def set_training_layers(model: nn.Module, *, drop_path_rate: float = 0.0, bn_momentum: float | None = None) -> dict:
    """Put per-stage stochastic depth in every residual block of the timm ResNet ``model`` (3D or 2D) and, when
    given, ``bn_momentum`` (PyTorch convention) in every BatchNorm; returns the values set."""
    stages = stage_modules(model)
    rates = stage_drop_path_rates(drop_path_rate, len(stages))
    for stage, rate in zip(stages, rates):
        for block in stage.children():
            block.drop_path = DropPath(rate) if rate > 0 else None
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return {"drop_path_per_stage": rates, "bn_momentum": bn_momentum}


def build_video_backbone(backbone: BackboneConfig, *, inflation: InflationConfig | None = None,
                         drop_path_rate: float = 0.0, bn_momentum: float | None = None) -> VideoBackbone:
    """Build the 2D registry backbone of the ``backbone`` config section as every task does
    (:func:`transfer.backbones.build_backbone_from_config`: weights, strict, min_loaded_fraction) and inflate it
    to 3D, with per-stage stochastic depth ``drop_path_rate`` (:func:`stage_drop_path_rates`, which replaces
    timm's per-block rule in every block) and ``bn_momentum``."""
    video = inflate_backbone(build_backbone_from_config(backbone), inflation or InflationConfig())
    video.training_layers = set_training_layers(video.model, drop_path_rate=drop_path_rate, bn_momentum=bn_momentum)
    return video


class VideoClassifier(nn.Module):
    """3D backbone -> dropout -> linear classifier. Input (B, 3, T, H, W), output logits (B, num_classes)."""

    def __init__(self, backbone: VideoBackbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))
