"""MoCo v2 and MoCo v3 pre-training checkpoints -> timm ResNet-50.

Both releases are ``torch.save`` dicts ``{"epoch", "arch", "state_dict", "optimizer", ...}`` whose
``state_dict`` holds the whole DDP-wrapped MoCo module. The backbone to keep is the query encoder
(``module.encoder_q.``, MoCo v2: facebookresearch/moco main_lincls.py) or the base encoder
(``module.base_encoder.``, MoCo v3: facebookresearch/moco-v3 main_lincls.py), minus its ``fc``, which
holds the projection MLP. Both encoders are torchvision ResNet-50s, whose keys timm shares.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert._layout import check_layout, timm_layout
from transfer.errors import WeightsError
from transfer.weights import read_state_dict

MOCO_V2_PREFIX = "module.encoder_q."
MOCO_V3_PREFIX = "module.base_encoder."
HEAD_PREFIX = "fc."  # the projection MLP in both releases, not an ImageNet classifier
RELEASE_FIX = "Download the official file first (see docs/ssl_backbones.md for the URL)."


def encoder_state_dict(path: Path, prefix: str, *, arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` in the checkpoint's ``state_dict``, prefix removed and projection head dropped."""
    sd = read_state_dict(path, missing_fix=RELEASE_FIX)  # the release's {"state_dict": ...} unwrapped
    found = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not found:
        sample = ", ".join(list(sd)[:4])
        raise WeightsError(f"checkpoint {str(path)!r} has no keys starting with {prefix!r} (first keys: {sample}). "
                           "Is it the pre-training checkpoint of the MoCo version this converter is for? "
                           "Use converter moco_v2 for encoder_q checkpoints, moco_v3 for base_encoder ones.")
    backbone = {k: v for k, v in found.items() if not k.startswith(HEAD_PREFIX)}
    return check_layout(backbone, timm_layout(arch), origin=str(path))


def convert_moco_v2(path: Path) -> dict[str, torch.Tensor]:
    """MoCo v2 ``moco_v2_800ep_pretrain.pth.tar`` -> timm ResNet-50 state dict (no classifier)."""
    return encoder_state_dict(path, MOCO_V2_PREFIX)


def convert_moco_v3(path: Path) -> dict[str, torch.Tensor]:
    """MoCo v3 ``r-50-1000ep.pth.tar`` -> timm ResNet-50 state dict (no classifier)."""
    return encoder_state_dict(path, MOCO_V3_PREFIX)


CONVERTERS.add("moco_v2", ConverterSpec(convert_moco_v2, "MoCo v2 pre-training checkpoint (.pth.tar), "
                                        "query encoder", backbones=("moco_v2_r50",)))
CONVERTERS.add("moco_v3", ConverterSpec(convert_moco_v3, "MoCo v3 ResNet-50 pre-training checkpoint (.pth.tar), "
                                        "base encoder", backbones=("moco_v3_r50",)))
