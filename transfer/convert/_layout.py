"""The target of every converter: a timm ResNet state dict, checked key by key and shape by shape."""
from __future__ import annotations

import functools

import torch

from transfer.errors import WeightsError
from transfer.weights import diff_state_dict


@functools.lru_cache(maxsize=4)
def timm_layout(arch: str) -> dict[str, torch.Size]:
    """Key -> shape of a freshly built timm ``arch`` (no weights are downloaded). Treat as read-only."""
    import timm  # here, not at import: the backbone registry imports the converters

    model = timm.create_model(arch, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def stage_depths(layout: dict[str, torch.Size]) -> tuple[int, ...]:
    """Blocks per stage of a timm ResNet layout, e.g. (3, 4, 6, 3) for ResNet-50."""
    depths = []
    for stage in range(1, 5):
        blocks = {k.split(".")[1] for k in layout if k.startswith(f"layer{stage}.")}
        depths.append(len(blocks))
    return tuple(depths)


def add_bn_counters(sd: dict[str, torch.Tensor], layout: dict[str, torch.Size]) -> None:
    """Add the ``num_batches_tracked`` entries PyTorch BN keeps and TF/JAX checkpoints have no counterpart for."""
    for key in layout:
        if key.endswith(".num_batches_tracked") and key not in sd:
            sd[key] = torch.tensor(0, dtype=torch.long)


def check_layout(sd: dict[str, torch.Tensor], layout: dict[str, torch.Size], *, origin: str,
                 optional_prefixes: tuple[str, ...] = ("fc.",)) -> dict[str, torch.Tensor]:
    """Return ``sd`` if it fills ``layout`` exactly (classifier optional); otherwise a WeightsError listing the gaps
    (:func:`transfer.weights.diff_state_dict`, the diff the loader uses too)."""
    diff = diff_state_dict(sd, layout, optional_prefixes=optional_prefixes)
    if diff:
        raise WeightsError(f"converting {origin!r} did not give a complete ResNet state dict: "
                           f"{diff.describe(found='converted', expected='timm', n=6)}. Check that the file is the "
                           "official release this converter is for (see docs/ssl_backbones.md) and that it is a "
                           "ResNet-50 1x checkpoint.")
    return sd
