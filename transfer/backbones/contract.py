"""The contract every built backbone keeps, 2D (:class:`Backbone`) and inflated 3D (``video.model.VideoBackbone``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transfer.backbones.spec import BackboneSpec
from transfer.weights import WeightsInfo


@dataclass(frozen=True)
class FeatureLevel:
    """One feature level: its channels and its (spatial) stride relative to the input."""

    channels: int
    stride: int


class RegistryNetwork(nn.Module):
    """A built registry entry: its ``spec``, the timm ``model``, where its ``weights`` came from, and the features
    it gives. ``forward`` is the pooled embedding ``(B, num_features)`` (logits when the classifier is kept);
    ``forward_features`` the maps of every level in ``feature_info`` (one per stage: stem, res2..res5).

    ``feature_info`` defaults to the levels timm declares for ``model``.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: WeightsInfo,
                 feature_info: list[FeatureLevel] | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.num_features: int = model.num_features
        self.feature_info = (list(feature_info) if feature_info is not None else
                             [FeatureLevel(i["num_chs"], i["reduction"]) for i in model.feature_info])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding: (B, 3, *S) -> (B, num_features), S = (H, W) in 2D, (T, H, W) in 3D."""
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level: (B, 3, *S) -> [(B, C_i, *S_i)], S_i the input size over level i's strides."""
        return self.model.forward_intermediates(x, intermediates_only=True)


class Backbone(RegistryNetwork):
    """A 2D registry backbone, with its ImageNet classifier removed unless built with ``keep_classifier``.

    ``forward``: (B, 3, H, W) -> (B, num_features); ``forward_features``: -> [(B, C_i, H/s_i, W/s_i)].
    """

    def data_config(self, *, train: bool = False, resolution: int | None = None) -> dict:
        """timm data config of these weights (:meth:`BackboneSpec.data_config`)."""
        return self.spec.data_config(train=train, resolution=resolution)
