"""One helper builds a backbone from its config section, so every setting of ``backbone.*`` reaches every task's
model the same way; no adapter calls the name-based builder itself.

The builds use ``tiny_resnet`` (tests/tiny_networks.py): resnet50's architecture and key layout at one block per
stage and narrow widths; what is tested is how the section's values reach the model, not the network."""
import re
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath
from tiny_networks import TINY_RESNET, tiny_state

from transfer.backbones import build_backbone_from_config
from transfer.config import BackboneConfig
from transfer.errors import WeightsError
from transfer.weights import write_safetensors
from video.model import build_video_backbone

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_RESNET.name
pytestmark = pytest.mark.usefixtures("tiny_entries")


@pytest.fixture(scope="module")
def partial_file(tmp_path_factory):
    """A tiny_resnet state dict without layer4: 65 of the backbone's 85 tensors (76 %)."""
    sd = {k: v for k, v in tiny_state(TINY_RESNET).items() if not k.startswith("layer4.")}
    path = tmp_path_factory.mktemp("weights") / "partial.safetensors"
    write_safetensors(sd, path)
    return path, sd


def _block_rates(model) -> list[float]:
    return [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0
            for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]


def test_drop_path_rate_reaches_the_model():
    rates = _block_rates(build_backbone_from_config(BackboneConfig(name=TINY, weights="random",
                                                                   drop_path_rate=0.2)).model)
    # timm's rule: the rate rises linearly over the blocks, from 0 to backbone.drop_path_rate in the last one
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates) and rates[1] > 0
    assert _block_rates(build_backbone_from_config(BackboneConfig(name=TINY, weights="random")).model) == \
        [0.0] * 4


def test_strict_and_min_loaded_fraction_reach_the_load(partial_file):
    path, sd = partial_file
    with pytest.raises(WeightsError, match=r"missing \(24\): layer4.0.conv1.weight"):
        build_backbone_from_config(BackboneConfig(name=TINY, weights=str(path)))
    with pytest.raises(WeightsError, match=r"min_loaded_fraction=0.9\)"):
        build_backbone_from_config(BackboneConfig(name=TINY, weights=str(path), strict=False))
    backbone = build_backbone_from_config(BackboneConfig(name=TINY, weights=str(path), strict=False,
                                                         min_loaded_fraction=0.7))
    report = backbone.weights.load
    assert not report.strict and (report.loaded, report.expected) == (65, 85)
    assert torch.equal(backbone.model.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])


def test_keep_classifier_keeps_the_head():
    backbone = build_backbone_from_config(BackboneConfig(name=TINY, weights="random"), keep_classifier=True)
    assert backbone.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_the_video_backbone_is_built_from_the_same_section(partial_file):
    path, _ = partial_file
    with pytest.raises(WeightsError, match=r"min_loaded_fraction=0.9\)"):
        build_video_backbone(BackboneConfig(name=TINY, weights=str(path), strict=False))
    video = build_video_backbone(BackboneConfig(name=TINY, weights=str(path), strict=False,
                                                min_loaded_fraction=0.7))
    assert (video.weights.load.loaded, video.weights.load.expected) == (65, 85)
    assert video.weights.source == f"file:{path}"


def test_no_adapter_builds_a_backbone_by_name():
    calls = re.compile(r"\bbuild_backbone\(")
    found = [f"{path.relative_to(ROOT)}:{n}" for folder in ("tasks", "video")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert not found, f"adapters calling build_backbone(...) instead of build_backbone_from_config: {found}"
