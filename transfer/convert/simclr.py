"""SimCLR v1 / SimCLRv2 TensorFlow checkpoints -> timm ResNet.

The official checkpoints (google-research/simclr README.md) are TF1 checkpoints whose ResNet is built
with unscoped ``tf.layers`` calls, so variables are named by creation order only:
``base_model/conv2d{,_1,_2,...}/kernel`` and ``base_model/batch_normalization{,_1,...}/{gamma,beta,
moving_mean,moving_variance}`` (google-research/simclr resnet.py; the same names are read by
Separius/SimCLRv2-Pytorch convert.py and tonylins/simclr-converter convert.py). The mapping below
replays that creation order (resnet.py ``resnet_v1_generator`` and ``bottleneck_block``):
stem conv + BN, then per block [projection conv + BN in a group's first block], 1x1 conv + BN,
3x3 conv (carrying the stride) + BN, 1x1 conv + BN. timm's ResNet-50 is the same network
(stride on the 3x3 conv, 1x1 strided projection shortcut, BN epsilon 1e-5).

Only ``sk_ratio = 0`` models map onto timm: selective-kernel (``_sk1``) checkpoints carry extra convs.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert._layout import add_bn_counters, check_layout, stage_depths, timm_layout
from transfer.convert.tf_checkpoint import TFCheckpoint, find_checkpoint_prefix
from transfer.errors import WeightsError

BASE_SCOPE = "base_model/"
EMA_SCOPE = "ema_model/base_model/"
# The ImageNet linear head of the release ("pretrained" means "with linear eval head", README).
HEAD = "head_supervised/linear_layer/dense/"
BN_FIELDS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _tf_name(base: str, index: int) -> str:
    """The i-th layer of a kind created in a graph: ``conv2d``, ``conv2d_1``, ``conv2d_2``, …"""
    return base if index == 0 else f"{base}_{index}"


def creation_order(depths: tuple[int, ...]) -> tuple[list[str], list[str]]:
    """timm module names of the convs and of the BNs, each in the order SimCLR's resnet.py creates them."""
    convs, bns = ["conv1"], ["bn1"]
    for stage, blocks in enumerate(depths, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            if block == 0:  # block_group: only the first block has a projection shortcut
                convs.append(f"{prefix}.downsample.0")
                bns.append(f"{prefix}.downsample.1")
            convs += [f"{prefix}.conv1", f"{prefix}.conv2", f"{prefix}.conv3"]
            bns += [f"{prefix}.bn1", f"{prefix}.bn2", f"{prefix}.bn3"]
    return convs, bns


def simclr_to_timm(variables: Mapping[str, np.ndarray | torch.Tensor], *, arch: str = "resnet50",
                   ema: bool = False, origin: str = "SimCLR checkpoint") -> dict[str, torch.Tensor]:
    """Map SimCLR TF variables ``{name: array}`` to a timm ``arch`` state dict.

    ``ema=True`` takes SimCLRv2's ``ema_model/`` copy instead of the trained weights. The supervised
    linear head becomes ``fc`` when present (SimCLR v1 and v2 "pretrained" releases have one).
    """
    scope = EMA_SCOPE if ema else BASE_SCOPE
    layout = timm_layout(arch)
    conv_names, bn_names = creation_order(stage_depths(layout))
    in_scope = {n[len(scope):].split("/")[0] for n in variables if n.startswith(scope) and not n.endswith("/Momentum")}
    n_convs = sum(1 for n in in_scope if n.split("_")[0] == "conv2d")
    n_bns = sum(1 for n in in_scope if n.startswith("batch_normalization"))
    if (n_convs, n_bns) != (len(conv_names), len(bn_names)):
        raise WeightsError(
            f"{origin}: {n_convs} convolutions and {n_bns} batch norms under {scope!r}, but {arch} has "
            f"{len(conv_names)} and {len(bn_names)}. Only ResNet-50 1x checkpoints without selective kernels "
            f"(SimCLR v1 ResNet50_1x, SimCLRv2 r50_1x_sk0) convert to this backbone"
            + ("; for EMA weights the checkpoint must hold ema_model/ variables." if ema else "."))

    def get(name: str) -> torch.Tensor:
        if name not in variables:
            raise WeightsError(f"{origin}: variable {name!r} is missing; the checkpoint is incomplete or not "
                               f"a SimCLR ResNet checkpoint.")
        return torch.as_tensor(np.asarray(variables[name])).float()

    sd: dict[str, torch.Tensor] = {}
    for i, module in enumerate(conv_names):
        kernel = get(f"{scope}{_tf_name('conv2d', i)}/kernel")
        sd[f"{module}.weight"] = kernel.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    for i, module in enumerate(bn_names):
        for tf_field, pt_field in BN_FIELDS.items():
            sd[f"{module}.{pt_field}"] = get(f"{scope}{_tf_name('batch_normalization', i)}/{tf_field}")
    if f"{HEAD}kernel" in variables:
        sd["fc.weight"] = get(f"{HEAD}kernel").t().contiguous()  # (in, out) -> (out, in)
        sd["fc.bias"] = get(f"{HEAD}bias")
    add_bn_counters(sd, layout)
    return check_layout(sd, layout, origin=origin)


def read_simclr_variables(path: Path) -> dict[str, torch.Tensor]:
    """The network variables (no optimizer slots) of the checkpoint at ``path`` (prefix, file or folder)."""
    ckpt = TFCheckpoint(find_checkpoint_prefix(path))
    wanted = [n for n in ckpt.names() if n.startswith((BASE_SCOPE, EMA_SCOPE, HEAD)) and not n.endswith("/Momentum")]
    if not wanted:
        raise WeightsError(f"{str(path)!r} is a TensorFlow checkpoint without SimCLR variables (none under "
                           f"{BASE_SCOPE!r}); pass a SimCLR v1 or SimCLRv2 checkpoint.")
    return {n: ckpt.read(n) for n in wanted}


def convert_simclr(path: Path) -> dict[str, torch.Tensor]:
    """SimCLR v1 ``ResNet50_1x`` or SimCLRv2 ``r50_1x_sk0`` checkpoint -> timm ResNet-50 state dict."""
    return simclr_to_timm(read_simclr_variables(path), origin=str(path))


CONVERTERS.add("simclr", ConverterSpec(convert_simclr, "SimCLR v1 (ResNet50_1x) / SimCLRv2 (r50_1x_sk0) TF1 "
                                       "checkpoint: prefix, .index file or folder",
                                       backbones=("simclr_r50", "simclrv2_r50_1x_sk0")))
