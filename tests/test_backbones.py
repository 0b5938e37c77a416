"""Contract tests over every registered backbone: a new entry is tested the moment it is registered.

Entries that share a network (same timm architecture and arguments: rs152 and rs152_i256, the SSL
ResNet-50s, ...) differ only in their declared facts, so each distinct network is built and run once per
session (:func:`observed`, random weights) and every entry's own facts are checked against the network of
its group.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

import pytest
import timm
import torch
from tiny_networks import meta_state_shapes

from transfer.backbones import BACKBONES, Backbone, BackboneSpec, build_backbone
from transfer.config import recipe_names
from transfer.weights import STATE_DICT_SUFFIXES

SIZE = 64  # small input: every level keeps a spatial size of at least 2
BATCH = 2


def network_key(spec: BackboneSpec) -> tuple[str, str]:
    """Entries with equal keys build the same network."""
    return spec.arch, repr(sorted(spec.arch_kwargs.items()))


GROUPS: dict[tuple[str, str], list[str]] = defaultdict(list)
for _name in BACKBONES.names():
    GROUPS[network_key(BACKBONES.get(_name))].append(_name)


@dataclass(frozen=True)
class Network:
    """What a built network showed: its contract's answers and its outputs on a (BATCH, 3, SIZE, SIZE) input."""

    is_backbone: bool
    weights_source: str
    feature_info: tuple[tuple[int, int], ...]  # (channels, stride) per level
    map_shapes: tuple[tuple[int, ...], ...]
    embedding_shape: tuple[int, ...]
    num_features: int
    finite: bool
    full_keys: tuple[str, ...]  # state-dict keys of the architecture with its classifier


@functools.cache  # one build per distinct network per session; only the facts are kept, not the model
def observed(key: tuple[str, str]) -> Network:
    backbone = build_backbone(GROUPS[key][0], weights="random").eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = backbone.forward_features(x)
        emb = backbone(x)
    spec = backbone.spec
    full = meta_state_shapes(spec.arch, **spec.arch_kwargs)  # names only: timm's network on the meta device
    return Network(isinstance(backbone, Backbone), backbone.weights.source,
                   tuple((f.channels, f.stride) for f in backbone.feature_info), tuple(tuple(m.shape) for m in maps),
                   tuple(emb.shape), backbone.num_features, bool(torch.isfinite(emb).all()), tuple(full))


def test_entries_share_few_networks():
    # The point of grouping: many entries, few distinct networks (12 when this was written, for 32 entries).
    assert len(GROUPS) < len(BACKBONES.names())
    assert sum(len(names) for names in GROUPS.values()) == len(BACKBONES.names())


@pytest.mark.parametrize("name", BACKBONES.names())
def test_contract_random_weights(name):
    spec = BACKBONES.get(name)
    net = observed(network_key(spec))
    assert net.is_backbone and net.weights_source == "random"
    assert [c for c, _ in net.feature_info] == list(spec.feature_channels)
    assert [s for _, s in net.feature_info] == list(spec.feature_strides)
    assert net.map_shapes == tuple((BATCH, c, SIZE // s, SIZE // s)
                                   for c, s in zip(spec.feature_channels, spec.feature_strides))
    assert net.embedding_shape == (BATCH, net.num_features) and net.num_features == spec.feature_channels[-1]
    assert net.finite
    assert any(k.startswith(spec.classifier_prefix) for k in net.full_keys), \
        f"{name}: the architecture has no classifier under {spec.classifier_prefix!r}"


@pytest.mark.parametrize("name", BACKBONES.names())
def test_declared_facts_are_consistent(name):
    spec = BACKBONES.get(name)
    assert spec.arch in timm.list_models(), f"{name}: timm has no architecture {spec.arch!r}"
    assert 64 <= spec.train_res <= 640 and 64 <= spec.test_res <= 640
    assert spec.data_config(train=True)["input_size"] == (3, spec.train_res, spec.train_res)
    assert spec.data_config()["input_size"] == (3, spec.test_res, spec.test_res)
    assert 0.5 < spec.crop_pct <= 1.0
    assert len(spec.mean) == len(spec.std) == 3
    assert spec.source, f"{name}: entry facts need a source"
    # The weight source: a Hub repository of weights for this very architecture, a URL of a file the loader or
    # the entry's converter reads, or a hint where to get the weights by hand.
    assert spec.hub_id or spec.url or spec.download_hint, f"{name}: no weight source and no hint where to get one"
    if spec.hub_id:
        tag = spec.hub_id.removeprefix("timm/")
        pretrained = timm.models.get_pretrained_cfg(tag)
        assert tag.split(".")[0] == spec.arch and pretrained is not None and pretrained.hf_hub_id == spec.hub_id
        # normalisation comes with the weights (resolutions and crops may follow the paper instead of timm)
        assert (spec.mean, spec.std, spec.interpolation) == (tuple(pretrained.mean), tuple(pretrained.std),
                                                             pretrained.interpolation)
    if spec.url and spec.convert is None:
        assert spec.url.endswith(STATE_DICT_SUFFIXES), f"{name}: {spec.url} is not a state-dict file"
    if spec.convert is None:
        assert spec.hub_id or spec.url, f"{name}: a hand-fetched release needs a converter"


def test_every_backbone_has_a_recipe_and_every_recipe_an_entry():
    assert set(recipe_names("backbone")) == set(BACKBONES.names())


def test_resnet_rs_entries_declare_the_seed_table_resolutions():
    # tensorflow/tpu resnet_rs README: the checkpoints timm ports (file names say i160/i192/i256/i320).
    expected = {"rs50": 160, "rs101": 192, "rs152": 256, "rs200": 256, "rs270": 256, "rs350": 256, "rs420": 320}
    assert {n: BACKBONES.get(n).train_res for n in expected} == expected
    assert all(BACKBONES.get(n).hub_id == f"timm/resnetrs{n[2:]}.tf_in1k" for n in expected)
