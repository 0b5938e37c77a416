"""MoCo v2 and MoCo v3 pre-training checkpoints -> timm ResNet-50.

Both releases are ``torch.save`` dicts ``{"epoch", "arch", "state_dict", "optimizer", ...}`` whose
``state_dict`` holds the whole DDP-wrapped MoCo module. The backbone to keep is the query encoder
(``module.encoder_q.``, MoCo v2: facebookresearch/moco main_lincls.py) or the base encoder
(``module.base_encoder.``, MoCo v3: facebookresearch/moco-v3 main_lincls.py), minus its ``fc``, which
holds the projection MLP. Both encoders are torchvision ResNet-50s, whose keys timm shares.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert._layout import check_layout, timm_layout
from transfer.errors import WeightsError

MOCO_V2_PREFIX = "module.encoder_q."
MOCO_V3_PREFIX = "module.base_encoder."
HEAD_PREFIX = "fc."  # the projection MLP in both releases, not an ImageNet classifier


def load_torch_checkpoint(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    if not Path(path).is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist. Download the official file first "
                           "(see docs/ssl_backbones.md for the URL).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refused to load {str(path)!r}: it holds pickled objects other than tensors and "
                           f"plain containers ({str(e).splitlines()[0]}).") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise WeightsError(f"checkpoint {str(path)!r} could not be read as a PyTorch file: {e}") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict.")
    return obj


def encoder_state_dict(path: Path, prefix: str, *, arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` in the checkpoint's ``state_dict``, prefix removed and projection head dropped."""
    ckpt = load_torch_checkpoint(path)
    sd = ckpt.get("state_dict", ckpt)
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
