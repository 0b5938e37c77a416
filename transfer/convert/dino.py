"""DINO ResNet-50 backbone file -> timm ResNet-50.

The release ``dino_resnet50_pretrain.pth`` is a plain torchvision ResNet-50 state dict of the teacher
backbone (facebookresearch/dino hubconf.py ``dino_resnet50`` loads it into ``torchvision.models.resnet50``
with ``fc`` replaced by Identity). timm shares torchvision's ResNet keys, so converting means checking
the file and dropping any ``fc``: DINO trains no classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert._layout import check_layout, timm_layout
from transfer.convert.moco import RELEASE_FIX
from transfer.weights import read_state_dict


def convert_dino(path: Path, *, arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """DINO ``dino_resnet50_pretrain.pth`` -> timm ResNet-50 state dict (no classifier)."""
    sd = read_state_dict(path, missing_fix=RELEASE_FIX)  # refuses entries that are not tensors
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return check_layout(backbone, timm_layout(arch), origin=str(path))


CONVERTERS.add("dino", ConverterSpec(convert_dino, "DINO ResNet-50 backbone (dino_resnet50_pretrain.pth)",
                                     backbones=("dino_r50",)))
