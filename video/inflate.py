"""Inflate a 2D timm ResNet-family network into a 3D one, keeping its weights.

The module tree is walked generically and converted by layer type: ``Conv2d`` -> ``Conv3d`` (weights
inflated over a temporal kernel), ``BatchNorm2d`` -> ``BatchNorm3d``, 2D pools -> 3D pools with a
temporal extent of 1, timm's SE -> SE squeezing over (T, H, W), timm's global pool -> 3D global pool.
Which convolutions get a temporal kernel comes from the model's own ``feature_info`` (stem = modules
before the first stage; a stage's blocks are its children): the first conv of the stem gets the stem
kernel, the first conv of every residual block the kernel of its stage. That is the placement of
3D ResNet-RS (tensorflow/models official/vision/modeling/layers/nn_blocks_3d.py ``BottleneckBlock3D``:
``[k, 1, 1]`` temporal conv first) and of I3D's ``3x1x1`` style (mmaction2 resnet3d.py).

Any layer type this file does not know is an error: a silent 2D layer inside a 3D network would
either crash deep in a forward pass or, worse, compute something else.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from transfer.errors import ConfigError
from video.layers import GlobalAvgPool3d, SelfGating3d, SqueezeExcite3d

INFLATION_MODES = ("mean", "center")
SELF_GATING = ("none", "last", "all")


@functools.cache
def _dim_free() -> tuple[type, ...]:
    """Layer types that work unchanged on (B, C, T, H, W) tensors once their 2D children are converted. timm is
    imported here, not with the module: the video schema (``InflationConfig``) is read by config validation."""
    from timm.layers import DropPath
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    return (nn.Sequential, nn.Identity, nn.Dropout, nn.Flatten, nn.Linear, DropPath, ResNet, Bottleneck, BasicBlock,
            nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d, SqueezeExcite3d, SelfGating3d, GlobalAvgPool3d)


_DIM_FREE_MODULES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me")


@dataclass(frozen=True)
class InflationConfig:
    """How to turn a 2D backbone into a 3D one.

    ``stage_temporal_kernels`` has one entry per stage (res2..res5); an entry is a kernel for every
    block of the stage, or a tuple cycled over its blocks (as tensorflow/models resnet_3d.py repeats
    ``temporal_kernel_sizes``). ``self_gating`` adds S3D-G gating to the ``last`` block of every stage
    (tensorflow/models resnet_3d.py ``_block_group``: "Only apply self-gating module in the last
    block"), to ``all`` blocks, or to ``none``.
    """

    mode: str = "mean"
    stem_temporal_kernel: int = 5
    stem_temporal_stride: int = 2
    stage_temporal_kernels: tuple = (1, 1, 3, 3)
    self_gating: str = "none"

    def __post_init__(self) -> None:
        if self.mode not in INFLATION_MODES:
            raise ConfigError(f"inflation mode {self.mode!r} is not one of {INFLATION_MODES}: 'mean' repeats the "
                              "2D kernel over time divided by its length (I3D), 'center' puts it at the centre frame.")
        if self.self_gating not in SELF_GATING:
            raise ConfigError(f"self_gating={self.self_gating!r} is not one of {SELF_GATING}.")
        if self.stem_temporal_stride < 1:
            raise ConfigError(f"stem_temporal_stride={self.stem_temporal_stride} must be >= 1.")
        kernels = [self.stem_temporal_kernel, *(k for entry in self.stage_temporal_kernels for k in _as_tuple(entry))]
        bad = [k for k in kernels if not isinstance(k, int) or k < 1 or k % 2 == 0]
        if bad:
            raise ConfigError(f"temporal kernels must be odd positive integers (a centred kernel keeps the clip "
                              f"length); got {bad} in stem_temporal_kernel={self.stem_temporal_kernel}, "
                              f"stage_temporal_kernels={self.stage_temporal_kernels}.")

    def block_kernel(self, stage: int, block: int) -> int:
        entry = _as_tuple(self.stage_temporal_kernels[stage])
        return entry[block % len(entry)]


def _as_tuple(entry) -> tuple:
    return tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)


def inflate_conv_weight(weight: torch.Tensor, time: int, mode: str) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, time, kh, kw); a static clip then gives the 2D response (see module doc)."""
    if mode == "mean":
        return weight.unsqueeze(2).repeat(1, 1, time, 1, 1) / time
    out = weight.new_zeros(weight.shape[:2] + (time,) + weight.shape[2:])
    out[:, :, time // 2] = weight
    return out


def inflate_conv(conv: nn.Conv2d, *, time: int = 1, stride: int = 1, mode: str = "mean") -> nn.Conv3d:
    """A ``Conv3d`` with temporal kernel ``time`` (zero-padded to keep length) holding ``conv``'s weights."""
    if isinstance(conv.padding, str):
        raise ConfigError(f"cannot inflate {conv}: string padding {conv.padding!r} is not supported.")
    conv3d = nn.Conv3d(conv.in_channels, conv.out_channels, kernel_size=(time, *conv.kernel_size),
                       stride=(stride, *conv.stride), padding=(time // 2, *conv.padding),
                       dilation=(1, *conv.dilation), groups=conv.groups, bias=conv.bias is not None,
                       padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        conv3d.weight.copy_(inflate_conv_weight(conv.weight, time, mode))
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d


def inflate_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    bn3d = nn.BatchNorm3d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)
    bn3d.load_state_dict(bn.state_dict())
    return bn3d


def inflate_pool(pool: nn.Module) -> nn.Module:
    """2D max/avg pool -> 3D pool over (1, kh, kw): pooling never mixes frames."""
    k, s, p = (_pair(getattr(pool, a)) for a in ("kernel_size", "stride", "padding"))
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d((1, *k), (1, *s), (0, *p), dilation=(1, *_pair(pool.dilation)),
                            ceil_mode=pool.ceil_mode)
    return nn.AvgPool3d((1, *k), (1, *s), (0, *p), ceil_mode=pool.ceil_mode,
                        count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _first_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The residual stages (res2..res5) of a timm ResNet, from its ``feature_info`` (level 0 is the stem)."""
    return [model.get_submodule(info["module"]) for info in model.feature_info[1:]]


def _temporal_plan(model: nn.Module, cfg: InflationConfig) -> tuple[dict[int, tuple[int, int]], list[nn.Module]]:
    """Map id(conv) -> (temporal kernel, temporal stride), and list the stage modules, from ``feature_info``."""
    stage_names = [info["module"] for info in model.feature_info[1:]]
    if len(stage_names) != len(cfg.stage_temporal_kernels):
        raise ConfigError(f"stage_temporal_kernels={cfg.stage_temporal_kernels} has {len(cfg.stage_temporal_kernels)} "
                          f"entries; this backbone has {len(stage_names)} stages ({', '.join(stage_names)}).")
    stages = stage_modules(model)
    plan: dict[int, tuple[int, int]] = {}
    stem = []
    for child in model.children():
        if child is stages[0]:
            break
        stem.append(child)
    stem_conv = next((c for c in (_first_conv(m) for m in stem) if c is not None), None)
    if stem_conv is None:
        raise ConfigError(f"{type(model).__name__} has no convolution before its first stage {stage_names[0]!r}.")
    plan[id(stem_conv)] = (cfg.stem_temporal_kernel, cfg.stem_temporal_stride)
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage.children()):
            conv = _first_conv(block)
            if conv is not None:
                plan[id(conv)] = (cfg.block_kernel(i, j), 1)
    return plan, stages


def _convert(module: nn.Module, plan: dict[int, tuple[int, int]], mode: str) -> nn.Module:
    """Return the 3D version of ``module`` (converted in place where its type is kept)."""
    from timm.layers import SelectAdaptivePool2d, SEModule

    kind = type(module)
    if kind is nn.Conv2d:
        time, stride = plan.get(id(module), (1, 1))
        return inflate_conv(module, time=time, stride=stride, mode=mode)
    if kind is nn.BatchNorm2d:
        return inflate_batchnorm(module)
    if kind in (nn.MaxPool2d, nn.AvgPool2d):
        return inflate_pool(module)
    if kind is SelectAdaptivePool2d:
        if module.pool_type != "avg" or isinstance(module.flatten, nn.Identity):
            raise ConfigError(f"cannot inflate global pool {module}: only flattened average pooling is supported.")
        return GlobalAvgPool3d()
    if kind is SEModule:
        parts = [_convert(getattr(module, n), plan, mode) for n in ("fc1", "bn", "act", "fc2", "gate")]
        return SqueezeExcite3d(*parts, add_maxpool=module.add_maxpool)
    for name, child in list(module.named_children()):
        setattr(module, name, _convert(child, plan, mode))
    return module


def _block_channels(block: nn.Module) -> int:
    """Output channels of a residual block: those of its last residual-branch conv."""
    from timm.models.resnet import BasicBlock, Bottleneck

    last = {Bottleneck: "conv3", BasicBlock: "conv2"}.get(type(block))
    if last is None:
        raise ConfigError(f"self-gating needs timm Bottleneck or BasicBlock blocks; got {type(block).__name__}. "
                          "Use self_gating=none for this backbone.")
    return getattr(block, last).out_channels


def _add_self_gating(stages: list[nn.Module], where: str) -> None:
    """Gate the residual branch before SE, the order of nn_blocks_3d.py ``BottleneckBlock3D.call``."""
    for stage in stages:
        blocks = list(stage.children())
        for block in blocks if where == "all" else blocks[-1:]:
            gate = SelfGating3d(_block_channels(block))
            # timm blocks skip ``se`` when it is None, so the slot takes the gate (+ SE) in either case.
            block.se = gate if block.se is None else nn.Sequential(gate, block.se)


def _check_all_3d(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, _dim_free()) or type(m).__module__ in _DIM_FREE_MODULES:
            continue
        raise ConfigError(f"cannot inflate layer {name or '<root>'!r} of type {type(m).__module__}.{type(m).__name__}: "
                          "it is not a known 2D layer with a 3D form. Supported: Conv2d, BatchNorm2d, MaxPool2d, "
                          "AvgPool2d, timm SEModule and SelectAdaptivePool2d(avg) inside timm ResNet/Bottleneck/"
                          "BasicBlock; pick a backbone built from these.")


def inflate_model(model: nn.Module, cfg: InflationConfig) -> nn.Module:
    """A 3D copy of the timm ResNet ``model``: input (B, 3, T, H, W) instead of (B, 3, H, W)."""
    model = copy.deepcopy(model)
    plan, stages = _temporal_plan(model, cfg)
    model = _convert(model, plan, cfg.mode)
    if cfg.self_gating != "none":
        _add_self_gating(stages, cfg.self_gating)
    _check_all_3d(model)
    return model


def iter_temporal_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv3d]]:
    """The convolutions with a temporal extent > 1 (for inspection and tests)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1:
            yield name, m
