"""The backbone's classifier, which transfer never uses, is dropped from a weights file before anything is
compared: a fine-tuned checkpoint with a 10-class head, or NaN only in the head, loads; the head is counted as
dropped. A refusal never suggests a remedy that would not work.

On ``tiny_rs`` (tests/tiny_networks.py): rs50's architecture and key layout, one block per stage, narrow widths
(its classifier: 1000 classes from 256 features)."""
import pytest
import torch
from tiny_networks import TINY_RS, tiny_state

from transfer.backbones import build_backbone
from transfer.errors import WeightsError
from transfer.weights import write_safetensors

TINY = TINY_RS.name
WIDTH = 256  # tiny_rs's embedding (rs50's is 2048)
pytestmark = pytest.mark.usefixtures("tiny_entries")


@pytest.fixture(scope="module")
def rs_state():
    return tiny_state(TINY_RS, seed=1)


def _same_backbone(backbone, state):
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("strict", [True, False])
def test_a_fine_tuned_checkpoint_with_another_head_loads_with_the_head_dropped(tmp_path, rs_state, strict):
    fine_tuned = dict(rs_state, **{"fc.weight": torch.zeros(10, WIDTH), "fc.bias": torch.zeros(10)})
    path = tmp_path / "fc10.pth"
    torch.save({f"module.{k}": v for k, v in fine_tuned.items()}, path)  # as DDP saved it
    backbone = build_backbone(TINY, weights=str(path), strict=strict)
    _same_backbone(backbone, rs_state)
    load = backbone.weights.load
    assert (load.dropped, load.missing, load.unexpected, load.loaded) == (2, 0, 0, load.expected)
    assert "2 classifier tensors dropped" in load.summary()


def test_nan_only_in_the_dropped_head_does_not_refuse_the_run(tmp_path, rs_state):
    path = tmp_path / "fcnan.safetensors"
    write_safetensors(dict(rs_state, **{"fc.weight": torch.full((1000, WIDTH), float("nan"))}), path)
    backbone = build_backbone(TINY, weights=str(path))
    _same_backbone(backbone, rs_state)
    assert backbone.weights.load.dropped == 2
    broken = dict(rs_state, **{"layer1.0.bn1.running_var": torch.full((8,), float("nan"))})
    write_safetensors(broken, path)
    with pytest.raises(WeightsError, match="NaN or Inf values in 1 tensor"):  # in the backbone: still refused
        build_backbone(TINY, weights=str(path))


def test_a_kept_head_of_another_shape_is_refused_without_suggesting_strict_false(tmp_path, rs_state):
    path = tmp_path / "fc10.safetensors"
    write_safetensors(dict(rs_state, **{"fc.weight": torch.zeros(10, WIDTH), "fc.bias": torch.zeros(10)}), path)
    for strict in (True, False):  # the ImageNet check keeps the head: a 10-class one cannot serve it
        with pytest.raises(WeightsError) as err:
            build_backbone(TINY, weights=str(path), keep_classifier=True, strict=strict)
        assert "fc.weight: file (10, 256) vs model (1000, 256)" in str(err.value)
        assert "strict=false" not in str(err.value)  # it would not help: shapes are never skipped
