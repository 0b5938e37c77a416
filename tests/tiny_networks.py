"""Networks for tests at a fraction of the real ones' cost.

* Tiny registry entries (:data:`TINY_RS`, :data:`TINY_RESNET`; fixture ``tiny_entries``): timm's ``resnetrs50``
  and ``resnet50`` architectures, so the same modules and state-dict key layout as the rs* and resnet* entries,
  at one block per stage and 1/8 of the widths (~0.4 M values instead of 25-36 M). For the tests of finding,
  reading and loading weights files and of the builder's plumbing, whose subject is not the network's size.
  They are in the registry only during a test that asks for the fixture ``tiny_entries`` (tests/conftest.py) or
  calls :func:`register_tiny_entries`, so no test enumerating the registry ever sees them. A test that composes a
  config registers them after its composes: a compose stores a config node for every registered entry.
* :func:`meta_state_shapes`, :func:`meta_parameter_count`: a timm architecture's state-dict shapes and parameter
  count, with its classifier, from one build per session on the meta device (no memory, no initialisation),
  shared by the tests of the registry, the backbone sheet and the ResNet-RS converter.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch

from transfer.backbones import BACKBONES, BackboneSpec

TINY_WIDTHS = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
TINY_RS = BackboneSpec(
    name="tiny_rs", arch="resnetrs50", family="resnet_rs", train_res=32, test_res=32,
    hub_id="tests/tiny_rs.tf_in1k", arch_kwargs=dict(TINY_WIDTHS, stem_width=8),
    feature_channels=(16, 32, 64, 128, 256), source="tests/tiny_networks.py: resnetrs50, one block per stage")
TINY_RESNET = BackboneSpec(
    name="tiny_resnet", arch="resnet50", family="resnet", train_res=32, test_res=32, arch_kwargs=dict(TINY_WIDTHS),
    feature_channels=(64, 32, 64, 128, 256), download_hint="A test entry: pass a file.",
    source="tests/tiny_networks.py: resnet50, one block per stage")
TINY = {spec.name: spec for spec in (TINY_RS, TINY_RESNET)}


def register_tiny_entries(monkeypatch: pytest.MonkeyPatch) -> dict[str, BackboneSpec]:
    """:data:`TINY` registered in :data:`transfer.backbones.BACKBONES` until ``monkeypatch`` is undone (the end of
    the test: fixture ``tiny_entries`` of tests/conftest.py)."""
    for name, spec in TINY.items():
        monkeypatch.setitem(BACKBONES._items, name, spec)
    return TINY


def tiny_state(spec: BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict of ``spec``'s network in timm's layout, with its 1000-class classifier."""
    torch.manual_seed(seed)
    return timm.create_model(spec.arch, pretrained=False, **spec.arch_kwargs).state_dict()


@functools.cache
def _meta_network(arch: str, kwargs: tuple) -> tuple[dict[str, tuple[int, ...]], int]:
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **dict(kwargs))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, sum(p.numel() for p in model.parameters())


def meta_state_shapes(arch: str, **kwargs) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of ``timm.create_model(arch, **kwargs)``'s state dict (a copy), the network built once per
    session on the meta device."""
    return dict(_meta_network(arch, tuple(sorted(kwargs.items())))[0])


def meta_parameter_count(arch: str, **kwargs) -> int:
    """How many values the parameters of ``timm.create_model(arch, **kwargs)`` hold (from the same meta build)."""
    return _meta_network(arch, tuple(sorted(kwargs.items())))[1]
