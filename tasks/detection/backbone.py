"""Any registry backbone as a detectron2 ``Backbone``, and the FPN builders detectron2 configs select.

detectron2 models find their backbone by name in ``BACKBONE_REGISTRY``; importing this module
registers ``build_transfer_fpn_backbone`` (Faster/Mask/Cascade R-CNN: P2-P6, like detectron2's
``build_resnet_fpn_backbone``) and ``build_transfer_retinanet_fpn_backbone`` (RetinaNet: P3-P7, like
``build_retinanet_resnet_fpn_backbone``). Both wrap :func:`transfer.backbones.build_backbone`; the
settings come from ``cfg.MODEL.TRANSFER_BACKBONE`` (see :func:`add_transfer_backbone_config`) and
the number of frozen levels from detectron2's own ``cfg.MODEL.BACKBONE.FREEZE_AT``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from transfer.backbones import Backbone as RegistryBackbone
from transfer.backbones import build_backbone
from transfer.errors import ConfigError

# FrozenBN: batch statistics and affine parameters fixed, the usual choice for the small per-device
# batches of detection (detectron2 configs/Base-RCNN-FPN.yaml keeps RESNETS.NORM at its FrozenBN default).
BACKBONE_NORMS = ("FrozenBN", "BN", "SyncBN")


def add_transfer_backbone_config(cfg: CfgNode) -> None:
    """Add the ``MODEL.TRANSFER_BACKBONE`` keys the builders below read."""
    cfg.MODEL.TRANSFER_BACKBONE = CfgNode()
    cfg.MODEL.TRANSFER_BACKBONE.NAME = "rs50"  # a transfer.backbones registry key
    cfg.MODEL.TRANSFER_BACKBONE.WEIGHTS = "pretrained"  # pretrained | random | /path/to/file
    cfg.MODEL.TRANSFER_BACKBONE.STRICT = True
    cfg.MODEL.TRANSFER_BACKBONE.DROP_PATH_RATE = 0.0
    cfg.MODEL.TRANSFER_BACKBONE.NORM = "FrozenBN"


def level_name(stride: int) -> str:
    """detectron2's name of a feature level: ``res<log2 stride>`` (res2 = stride 4 ... res5 = stride 32)."""
    return f"res{int(math.log2(stride))}"


class TransferBackbone(Backbone):
    """The multi-scale feature maps of a registry backbone, named and shaped as detectron2 expects.

    ``freeze_at`` fixes the first levels (1 = stem, 2 = stem and res2, ...; all levels = frozen
    transfer), which also turns their batch norms into ``FrozenBatchNorm2d``. ``norm`` chooses what the
    other levels' batch norms become: FrozenBN, BN (trained) or SyncBN (statistics across processes).
    """

    def __init__(self, body: RegistryBackbone, *, out_features: Sequence[str], freeze_at: int = 0,
                 norm: str = "FrozenBN"):
        super().__init__()
        names = [level_name(level.stride) for level in body.feature_info]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ConfigError(f"detection feature levels {list(out_features)} are not all levels of backbone "
                              f"{body.spec.name!r}; it has {names}.")
        if not 0 <= freeze_at <= len(names):
            raise ConfigError(f"task.freeze_at={freeze_at} must be between 0 (train every level) and "
                              f"{len(names)} (backbone {body.spec.name!r} has {len(names)} levels: {names}).")
        if norm not in BACKBONE_NORMS:
            raise ConfigError(f"task.backbone_norm={norm!r}; valid: {', '.join(BACKBONE_NORMS)}. The pretrained "
                              "weights carry batch-norm statistics, so GroupNorm cannot replace them.")
        self.body = body
        self._index = {name: i for i, name in enumerate(names)}
        self._out_features = list(out_features)
        self._out_feature_channels = {n: body.feature_info[self._index[n]].channels for n in out_features}
        self._out_feature_strides = {n: body.feature_info[self._index[n]].stride for n in out_features}
        _freeze_levels(body.model, [info["module"] for info in body.model.feature_info], freeze_at)
        if norm == "FrozenBN":
            body.model = FrozenBatchNorm2d.convert_frozen_batchnorm(body.model)
        elif norm == "SyncBN":
            body.model = nn.SyncBatchNorm.convert_sync_batchnorm(body.model)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C_name, H / stride_name, W / stride_name)}."""
        maps = self.body.forward_features(x)
        return {name: maps[self._index[name]] for name in self._out_features}


def _freeze_levels(model: nn.Module, level_modules: Sequence[str], freeze_at: int) -> None:
    """Fix every module that runs before level ``freeze_at`` (``level_modules``: names from timm's feature_info).

    timm models register their modules in execution order, so the frozen part is everything
    registered before the first trained level's module: ``freeze_at=1`` fixes the stem including its
    pooling (detectron2's stem, which ends at stride 4), ``freeze_at=2`` also res2, and so on.
    """
    if freeze_at == 0:
        return
    order = [name for name, _ in model.named_modules()][1:]  # [0] is the model itself
    frozen = order if freeze_at >= len(level_modules) else order[:order.index(level_modules[freeze_at])]
    for name in frozen:
        module = model.get_submodule(name)
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FrozenBatchNorm2d.convert_frozen_batchnorm(module))


def build_transfer_backbone(cfg: CfgNode, out_features: Sequence[str]) -> TransferBackbone:
    """The registry backbone ``cfg.MODEL.TRANSFER_BACKBONE.NAME`` with its weights, frozen levels and norm."""
    tb = cfg.MODEL.TRANSFER_BACKBONE
    body = build_backbone(tb.NAME, weights=tb.WEIGHTS, strict=tb.STRICT, drop_path_rate=tb.DROP_PATH_RATE)
    return TransferBackbone(body, out_features=out_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, norm=tb.NORM)


@BACKBONE_REGISTRY.register()
def build_transfer_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Registry backbone + FPN with a max-pooled extra level (P2-P6), for the R-CNN family."""
    bottom_up = build_transfer_backbone(cfg, cfg.MODEL.FPN.IN_FEATURES)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_transfer_retinanet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Registry backbone + FPN with P6/P7 convolved from the last level (P3-P7), for RetinaNet."""
    in_features = cfg.MODEL.FPN.IN_FEATURES
    bottom_up = build_transfer_backbone(cfg, in_features)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top = LastLevelP6P7(bottom_up.output_shape()[in_features[-1]].channels, out_channels, in_feature=in_features[-1])
    return FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels, norm=cfg.MODEL.FPN.NORM,
               top_block=top, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
