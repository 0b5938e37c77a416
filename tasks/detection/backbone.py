"""Any registry backbone as a detectron2 ``Backbone``: FPN builders, a C4 trunk and its res5 RoI head.

detectron2 models find their backbone and RoI heads by name in ``BACKBONE_REGISTRY`` and
``ROI_HEADS_REGISTRY``; importing this module registers

- ``build_transfer_fpn_backbone`` (Faster/Mask/Cascade R-CNN: P2-P6, like detectron2's
  ``build_resnet_fpn_backbone``) and ``build_transfer_retinanet_fpn_backbone`` (RetinaNet: P3-P7, like
  ``build_retinanet_resnet_fpn_backbone``);
- ``build_transfer_c4_backbone`` (the stem and res2-res4, stride 16, like ``build_resnet_backbone`` in
  detectron2's ``Base-RCNN-C4.yaml``) and ``TransferRes5ROIHeads`` (``Res5ROIHeads`` whose per-region
  res5 is the registry backbone's own last stage, with its weights).

All wrap :func:`transfer.backbones.build_backbone_from_config`; the settings come from ``cfg.MODEL.TRANSFER_BACKBONE``
(see :func:`add_transfer_backbone_config`) and the number of frozen levels from detectron2's own
``cfg.MODEL.BACKBONE.FREEZE_AT``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from tasks.detection.schema import BACKBONE_NORMS
from transfer.backbones import Backbone as RegistryBackbone
from transfer.backbones import build_backbone_from_config
from transfer.config import BackboneConfig
from transfer.errors import ConfigError


def add_transfer_backbone_config(cfg: CfgNode) -> None:
    """Add the ``MODEL.TRANSFER_BACKBONE`` keys the builders below read."""
    cfg.MODEL.TRANSFER_BACKBONE = CfgNode()
    cfg.MODEL.TRANSFER_BACKBONE.NAME = "rs50"  # a transfer.backbones registry key
    cfg.MODEL.TRANSFER_BACKBONE.WEIGHTS = "pretrained"  # pretrained | random | /path/to/file
    cfg.MODEL.TRANSFER_BACKBONE.STRICT = True
    cfg.MODEL.TRANSFER_BACKBONE.MIN_LOADED_FRACTION = BackboneConfig.min_loaded_fraction
    cfg.MODEL.TRANSFER_BACKBONE.DROP_PATH_RATE = 0.0
    cfg.MODEL.TRANSFER_BACKBONE.NORM = "FrozenBN"
    # C4: a norm after the res5 RoI head, as MoCo's Res5ROIHeadsExtraNorm (moco detection/train_net.py).
    cfg.MODEL.TRANSFER_BACKBONE.RES5_EXTRA_NORM = False


def level_name(stride: int) -> str:
    """detectron2's name of a feature level: ``res<log2 stride>`` (res2 = stride 4 ... res5 = stride 32)."""
    return f"res{int(math.log2(stride))}"


class TransferBackbone(Backbone):
    """The multi-scale feature maps of a registry backbone, named and shaped as detectron2 expects.

    ``freeze_at`` fixes the first levels (1 = stem, 2 = stem and res2, ...; all levels = frozen
    transfer), which also turns their batch norms into ``FrozenBatchNorm2d``. ``norm`` chooses what the
    other levels' batch norms become: FrozenBN, BN (trained), SyncBN or naiveSyncBN (statistics across
    processes). Levels after the last of ``out_features`` are removed (a C4 trunk ends at res4).
    """

    def __init__(self, body: RegistryBackbone, *, out_features: Sequence[str], freeze_at: int = 0,
                 norm: str = "FrozenBN"):
        super().__init__()
        names = [level_name(level.stride) for level in body.feature_info]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ConfigError(f"detection feature levels {list(out_features)} are not all levels of backbone "
                              f"{body.spec.name!r}; it has {names}.")
        check_freeze_and_norm(body, freeze_at, norm)
        self.body = body
        self._index = {name: i for i, name in enumerate(names)}
        self._indices = [self._index[n] for n in out_features]
        self._out_features = list(out_features)
        self._out_feature_channels = {n: body.feature_info[self._index[n]].channels for n in out_features}
        self._out_feature_strides = {n: body.feature_info[self._index[n]].stride for n in out_features}
        level_modules = level_module_names(body.model)
        for unused in level_modules[max(self._indices) + 1:]:
            detach_module(body.model, unused)  # never computed, so never trained: no dangling parameters
        _freeze_levels(body.model, level_modules, freeze_at)
        body.model = convert_norm(body.model, norm)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C_name, H / stride_name, W / stride_name)}."""
        # timm's forward_intermediates (what the registry's forward_features calls) with stop_early, so a
        # trunk that ends at res4 never runs the removed levels.
        maps = self.body.model.forward_intermediates(x, indices=self._indices, intermediates_only=True,
                                                     stop_early=True)
        return dict(zip(self._out_features, maps))


def check_freeze_and_norm(body: RegistryBackbone, freeze_at: int, norm: str) -> None:
    levels = len(body.feature_info)
    if not 0 <= freeze_at <= levels:
        raise ConfigError(f"task.freeze_at={freeze_at} must be between 0 (train every level) and {levels} "
                          f"(backbone {body.spec.name!r} has {levels} levels).")
    if norm not in BACKBONE_NORMS:
        raise ConfigError(f"task.backbone_norm={norm!r}; valid: {', '.join(BACKBONE_NORMS)}. The pretrained "
                          "weights carry batch-norm statistics, so GroupNorm cannot replace them.")


def level_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that end each feature level (timm's ``feature_info``), stem first."""
    return [info["module"] for info in model.feature_info]


def detach_module(model: nn.Module, name: str) -> nn.Module:
    """Replace submodule ``name`` of ``model`` with ``nn.Identity`` and return it."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    module = getattr(owner, child)
    setattr(owner, child, nn.Identity())
    return module


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """The trainable batch norms of ``module`` turned into ``norm`` (frozen ones stay frozen)."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if norm == "naiveSyncBN":
        return _to_naive_sync_bn(module)
    return module


def _to_naive_sync_bn(module: nn.Module) -> nn.Module:
    # detectron2 offers no converter for its NaiveSyncBatchNorm; this mirrors torch's convert_sync_batchnorm.
    if type(module) is nn.BatchNorm2d:
        out = NaiveSyncBatchNorm(module.num_features, eps=module.eps, momentum=module.momentum,
                                 affine=module.affine, track_running_stats=module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = _to_naive_sync_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


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


def freeze_module(module: nn.Module) -> nn.Module:
    """``module`` with no trainable parameter and its batch norms frozen."""
    for param in module.parameters():
        param.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


def backbone_section(cfg: CfgNode) -> BackboneConfig:
    """The run's ``backbone`` config section, as ``use_registry_backbone`` stored it in ``MODEL.TRANSFER_BACKBONE``."""
    tb = cfg.MODEL.TRANSFER_BACKBONE
    return BackboneConfig(name=tb.NAME, weights=tb.WEIGHTS, strict=tb.STRICT,
                          min_loaded_fraction=tb.MIN_LOADED_FRACTION, drop_path_rate=tb.DROP_PATH_RATE)


def build_registry_body(cfg: CfgNode) -> RegistryBackbone:
    """The registry backbone of ``cfg``, built as every task builds its backbone section."""
    return build_backbone_from_config(backbone_section(cfg))


def build_transfer_backbone(cfg: CfgNode, out_features: Sequence[str]) -> TransferBackbone:
    """The registry backbone ``cfg.MODEL.TRANSFER_BACKBONE.NAME`` with its weights, frozen levels and norm."""
    return TransferBackbone(build_registry_body(cfg), out_features=out_features,
                            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT, norm=cfg.MODEL.TRANSFER_BACKBONE.NORM)


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


@BACKBONE_REGISTRY.register()
def build_transfer_c4_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> TransferBackbone:
    """The C4 trunk: stem and res2-res4 of the registry backbone (``RESNETS.OUT_FEATURES``, res4 in C4 configs)."""
    return build_transfer_backbone(cfg, cfg.MODEL.RESNETS.OUT_FEATURES)


@ROI_HEADS_REGISTRY.register()
class TransferRes5ROIHeads(Res5ROIHeads):
    """detectron2's C4 RoI heads with the registry backbone's last stage as the per-region res5.

    The stage keeps its pretrained weights (the backbone is built a second time here, since detectron2
    builds heads and backbone separately, and everything but the last stage is dropped). It is trained
    unless ``FREEZE_AT`` fixes every level; its batch norms become ``TRANSFER_BACKBONE.NORM``.
    ``RES5_EXTRA_NORM`` appends a fresh norm after it, as MoCo's VOC/COCO detection does
    (``Res5ROIHeadsExtraNorm`` in facebookresearch/moco detection/train_net.py).
    """

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Module, int]:
        body = build_registry_body(cfg)
        freeze_at, norm = cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.TRANSFER_BACKBONE.NORM
        check_freeze_and_norm(body, freeze_at, norm)
        levels, channels = len(body.feature_info), body.feature_info[-1].channels
        res5 = detach_module(body.model, level_module_names(body.model)[-1])
        del body
        res5 = freeze_module(res5) if freeze_at >= levels else convert_norm(res5, norm)
        if cfg.MODEL.TRANSFER_BACKBONE.RES5_EXTRA_NORM:
            res5 = nn.Sequential(res5, get_norm(norm, channels))
        return res5, channels
