"""What a backbone registry entry declares (:class:`BackboneSpec`) and the registry itself (:data:`BACKBONES`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfer.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Channels and strides of the five feature levels (stem, res2..res5) of a bottleneck ResNet.
BOTTLENECK_CHANNELS = (64, 256, 512, 1024, 2048)
RESNET_STRIDES = (2, 4, 8, 16, 32)

Converter = Callable[[Path], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class BackboneSpec:
    """What a registry entry declares: architecture, weights, resolutions, normalisation, features.

    ``hub_id`` is a Hugging Face Hub repository holding ``model.safetensors`` in timm's layout;
    ``url`` a direct download; ``convert`` turns a downloaded or local file that is not a state
    dict in timm's layout (an official release format) into one. ``download_hint`` tells users where
    weights come from when there is no automatic source.
    """

    name: str
    arch: str  # timm architecture name
    family: str  # resnet_rs | resnet | resnet_d | ssl
    train_res: int
    test_res: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_channels: tuple[int, ...] = BOTTLENECK_CHANNELS
    feature_strides: tuple[int, ...] = RESNET_STRIDES
    hub_id: str | None = None
    url: str | None = None
    convert: Converter | None = None
    download_hint: str = ""
    top1: float | None = None  # published ImageNet top-1 of these weights
    source: str = ""  # where the facts of this entry come from
    # The published checkpoint these weights are (e.g. "resnet-rs-152-i256"), as baselines.csv names it in a
    # row's checkpoint condition; "" when the entry is not one of those.
    checkpoint: str = ""
    classifier_prefix: str = "fc."
    arch_kwargs: dict = field(default_factory=dict)

    def data_config(self, *, train: bool = False, resolution: int | None = None) -> dict:
        """timm data config (``timm.data.create_transform`` keywords) of these weights."""
        res = resolution or (self.train_res if train else self.test_res)
        return {"input_size": (3, res, res), "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": "center"}


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES.add(spec.name, spec)
    return spec
