"""Contract tests over every registered backbone: a new entry is tested the moment it is registered."""
import pytest
import timm
import torch

from transfer.backbones import BACKBONES, Backbone, build_backbone
from transfer.config import recipe_names

SIZE = 64  # small input: every level keeps a spatial size of at least 2


@pytest.mark.parametrize("name", BACKBONES.names())
def test_contract_random_weights(name):
    spec = BACKBONES.get(name)
    backbone = build_backbone(name, weights="random")
    assert isinstance(backbone, Backbone)
    assert backbone.weights.source == "random"
    assert [f.channels for f in backbone.feature_info] == list(spec.feature_channels)
    assert [f.stride for f in backbone.feature_info] == list(spec.feature_strides)
    backbone.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        maps = backbone.forward_features(x)
        emb = backbone(x)
    assert len(maps) == len(spec.feature_channels)
    for fmap, channels, stride in zip(maps, spec.feature_channels, spec.feature_strides):
        assert fmap.shape == (2, channels, SIZE // stride, SIZE // stride)
    assert emb.shape == (2, backbone.num_features) and backbone.num_features == spec.feature_channels[-1]
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_declared_facts_are_consistent(name):
    spec = BACKBONES.get(name)
    assert spec.arch in timm.list_models(), f"{name}: timm has no architecture {spec.arch!r}"
    assert 64 <= spec.train_res <= 640 and 64 <= spec.test_res <= 640
    assert 0.5 < spec.crop_pct <= 1.0
    assert len(spec.mean) == len(spec.std) == 3
    assert spec.hub_id or spec.url or spec.download_hint, f"{name}: no weight source and no hint where to get one"
    assert spec.source, f"{name}: entry facts need a source"


def test_every_backbone_has_a_recipe_and_every_recipe_an_entry():
    assert set(recipe_names("backbone")) == set(BACKBONES.names())


def test_resnet_rs_entries_declare_the_seed_table_resolutions():
    # tensorflow/tpu resnet_rs README: the checkpoints timm ports (file names say i160/i192/i256/i320).
    expected = {"rs50": 160, "rs101": 192, "rs152": 256, "rs200": 256, "rs270": 256, "rs350": 256, "rs420": 320}
    assert {n: BACKBONES.get(n).train_res for n in expected} == expected
    assert all(BACKBONES.get(n).hub_id == f"timm/resnetrs{n[2:]}.tf_in1k" for n in expected)
