"""The backbone registry: every pretrained network the suite transfers, behind one contract.

``build_backbone(name, weights=...)`` (or ``build_backbone_from_config(cfg.backbone)``) returns a
:class:`Backbone`: ``forward`` gives the pooled embedding ``(B, num_features)``, ``forward_features`` the
multi-scale maps, one per stage, whose channels and strides are ``feature_info``.

Modules: ``spec`` (what an entry declares, the registry), ``contract`` (the built network), ``builder``
(building and checking); the entries, registered on import, in ``resnet_rs`` (ResNet-RS: timm's ports and the
official checkpoints), ``supervised_resnets`` (torchvision ResNet-50, ResNet strikes back, ResNet-D) and
``self_supervised`` (SimCLR, BYOL, MoCo, DINO). Weights are found, read and checked by :mod:`transfer.weights`.
"""
from __future__ import annotations

from transfer.backbones import resnet_rs, self_supervised, supervised_resnets
from transfer.backbones.builder import build_backbone, build_backbone_from_config, check_weights
from transfer.backbones.contract import Backbone, FeatureLevel, RegistryNetwork
from transfer.backbones.spec import (
    BACKBONES,
    BOTTLENECK_CHANNELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET_STRIDES,
    BackboneSpec,
    Converter,
    register_backbone,
)

__all__ = ["BACKBONES", "BOTTLENECK_CHANNELS", "IMAGENET_MEAN", "IMAGENET_STD", "RESNET_STRIDES", "Backbone",
           "BackboneSpec", "Converter", "FeatureLevel", "RegistryNetwork", "build_backbone",
           "build_backbone_from_config", "check_weights", "register_backbone", "resnet_rs", "self_supervised",
           "supervised_resnets"]
