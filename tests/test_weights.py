"""Weights: safetensors round trips, refusing pickled code, strict loading, hub cache and offline errors.

The loading tests use ``tiny_rs`` (tests/tiny_networks.py): timm's ResNet-RS architecture, so rs50's modules and
key layout, at one block per stage and narrow widths; what they test is the finder, reader and loader."""
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from suite_helpers import UNREACHABLE
from tiny_networks import TINY_RS, tiny_state

from transfer.backbones import build_backbone
from transfer.errors import WeightsError
from transfer.weights import read_state_dict, write_safetensors

TINY = TINY_RS.name
pytestmark = pytest.mark.usefixtures("tiny_entries")


@pytest.fixture(scope="module")
def rs_state():
    """A random ResNet-RS state dict (tiny_rs) in timm's layout, with its 1000-class head."""
    return tiny_state(TINY_RS)


def _assert_same(backbone, state):
    own = backbone.model.state_dict()
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    assert backbone.weights.load is not None  # a file load always carries its report


def test_safetensors_round_trip_is_bit_exact(tmp_path, rs_state):
    path = tmp_path / "rs.safetensors"
    digest = write_safetensors(rs_state, path)
    backbone = build_backbone(TINY, weights=str(path))
    _assert_same(backbone, rs_state)
    assert backbone.weights.source == f"file:{path}" and backbone.weights.sha256 == digest
    again = tmp_path / "again.safetensors"
    write_safetensors(backbone.model.state_dict(), again)
    reread = read_state_dict(again)
    assert set(reread) == set(backbone.model.state_dict())
    assert all(torch.equal(reread[k], v) for k, v in backbone.model.state_dict().items())


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_holding_pickled_code_is_refused(tmp_path, rs_state):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": rs_state, "payload": _RunsCode(marker)}, path)
    with pytest.raises(WeightsError, match="refused"):
        build_backbone(TINY, weights=str(path))
    assert not marker.exists()


def test_strict_load_lists_missing_unexpected_and_mis_shaped_keys(tmp_path, rs_state):
    broken = dict(rs_state)
    del broken["layer1.0.conv1.weight"]
    broken["extra.weight"] = torch.zeros(1)
    broken["layer4.0.bn3.bias"] = torch.zeros(7)
    path = tmp_path / "broken.safetensors"
    write_safetensors(broken, path)
    with pytest.raises(WeightsError) as err:
        build_backbone(TINY, weights=str(path))
    text = str(err.value)
    assert "missing (1): layer1.0.conv1.weight" in text
    assert "unexpected (1): extra.weight" in text
    assert "layer4.0.bn3.bias: file (7,) vs model (256,)" in text


def test_non_strict_partial_load_needs_the_threshold_and_is_reported(tmp_path, rs_state):
    partial = {k: v for k, v in rs_state.items() if not k.startswith("layer4")}
    path = tmp_path / "partial.safetensors"
    write_safetensors(partial, path)
    with pytest.raises(WeightsError, match="missing"):
        build_backbone(TINY, weights=str(path))
    with pytest.raises(WeightsError, match=r"min_loaded_fraction=0.9\)") as err:  # the default threshold
        build_backbone(TINY, weights=str(path), strict=False)
    assert "lower backbone.min_loaded_fraction" in str(err.value)
    backbone = build_backbone(TINY, weights=str(path), strict=False, min_loaded_fraction=0.5)
    assert torch.equal(backbone.model.state_dict()["layer3.0.conv1.weight"], rs_state["layer3.0.conv1.weight"])
    load = backbone.weights.as_dict()["load"]
    counted = [k for k in rs_state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    in_layer4 = [k for k in counted if k.startswith("layer4")]
    assert load == {"strict": False, "expected": len(counted), "loaded": len(counted) - len(in_layer4),
                    "missing": len(in_layer4), "unexpected": 0, "prefix_removed": "",
                    "dropped": 2}  # the file's ImageNet head (fc.weight, fc.bias): never used for transfer


def _wrapped_states(model: torch.nn.Module) -> dict[str, dict]:
    """State dicts as the wrappers themselves write them: torch.compile, DataParallel (DDP's ``module.``),
    both nested, and a Lightning module holding the network as ``model``. torch.compile wraps the model in the
    same ``OptimizedModule`` whatever the backend; "eager" spares the import of the inductor compiler."""
    import lightning as L

    def compiled(model):
        return torch.compile(model, backend="eager")

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = compiled(model)

    return {"compiled": compiled(model).state_dict(),
            "ddp": torch.nn.DataParallel(model).state_dict(),
            "ddp_of_compiled": torch.nn.DataParallel(compiled(model)).state_dict(),
            "lightning_of_compiled": Lit().state_dict()}


EXPECTED_PREFIX = {"compiled": "_orig_mod.", "ddp": "module.", "ddp_of_compiled": "module._orig_mod.",
                   "lightning_of_compiled": "model._orig_mod."}


@pytest.fixture(scope="module")
def wrapped_checkpoints(tmp_path_factory, rs_state) -> dict:
    """One .pth per wrapper (written once for both strict settings), each in the layout the real wrapper writes."""
    import timm

    model = timm.create_model(TINY_RS.arch, **TINY_RS.arch_kwargs)
    model.load_state_dict(rs_state)
    root = tmp_path_factory.mktemp("wrapped")
    paths = {}
    for kind, state in _wrapped_states(model).items():
        assert all(k.startswith(EXPECTED_PREFIX[kind]) for k in state), kind  # the real wrappers' layout
        paths[kind] = root / f"{kind}.pth"
        torch.save({"state_dict": state, "epoch": 1}, paths[kind])
    return paths


@pytest.mark.parametrize("strict", [True, False])
def test_compiled_and_ddp_wrapped_checkpoints_load_fully(wrapped_checkpoints, rs_state, strict, caplog):
    import logging

    for kind, path in wrapped_checkpoints.items():
        with caplog.at_level(logging.INFO, logger="transfer.backbones"):
            backbone = build_backbone(TINY, weights=str(path), strict=strict)
        _assert_same(backbone, rs_state)
        load = backbone.weights.load
        assert (load.loaded, load.missing, load.unexpected) == (load.expected, 0, 0), kind
        assert load.prefix_removed == EXPECTED_PREFIX[kind]
    assert f"loaded {load.expected} of {load.expected} backbone tensors (0 missing, 0 unexpected" in caplog.text


def test_non_strict_load_that_matches_nothing_is_refused(tmp_path, rs_state):
    # Keys under a prefix no wrapper uses: a non-strict load would take none of them and run on random weights.
    path = tmp_path / "foreign.safetensors"
    write_safetensors({f"net.trunk.{k}": v for k, v in rs_state.items()}, path)
    with pytest.raises(WeightsError) as err:
        build_backbone(TINY, weights=str(path), strict=False, min_loaded_fraction=0.0)
    text = str(err.value)
    assert "only 0 of the backbone's" in text and "Nothing matched" in text and "File keys look like net.trunk." in text


def test_projection_head_keys_are_reported_as_unexpected(tmp_path, rs_state):
    state = {f"backbone.{k}": v for k, v in rs_state.items()}
    state.update({"projector.0.weight": torch.zeros(4, 256), "projector.0.bias": torch.zeros(4)})
    path = tmp_path / "ssl.safetensors"
    write_safetensors(state, path)
    with pytest.raises(WeightsError, match=r"unexpected \(2\): projector.0.bias, projector.0.weight"):
        build_backbone(TINY, weights=str(path))
    backbone = build_backbone(TINY, weights=str(path), strict=False)
    _assert_same(backbone, rs_state)
    load = backbone.weights.load
    assert (load.missing, load.unexpected, load.prefix_removed) == (0, 2, "backbone.")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, rs_state, bad):
    state = dict(rs_state)
    state["layer2.0.conv2.weight"] = state["layer2.0.conv2.weight"].clone()
    state["layer2.0.conv2.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "diverged.safetensors"
    write_safetensors(state, path)
    with pytest.raises(WeightsError, match=r"NaN or Inf values in 1 tensor\(s\): layer2.0.conv2.weight"):
        build_backbone(TINY, weights=str(path))


def test_classifier_keys_are_optional(tmp_path, rs_state):
    headless = {k: v for k, v in rs_state.items() if not k.startswith("fc.")}
    path = tmp_path / "headless.safetensors"
    write_safetensors(headless, path)
    _assert_same(build_backbone(TINY, weights=str(path)), rs_state)


def test_pretrained_loads_from_the_hub_cache_layout(tmp_path, monkeypatch, rs_state):
    """The real Hugging Face cache layout (models--org--name/snapshots/<rev>/, refs/main) with no network."""
    cache = tmp_path / "hub"
    repo = cache / "models--tests--tiny_rs.tf_in1k"  # TINY_RS.hub_id in the cache layout
    revision = "0" * 40
    write_safetensors(rs_state, repo / "snapshots" / revision / "model.safetensors")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    backbone = build_backbone(TINY)
    assert backbone.weights.source == "hub:tests/tiny_rs.tf_in1k"
    _assert_same(backbone, rs_state)


def test_offline_hub_download_names_the_hub_id_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    with pytest.raises(WeightsError) as err:
        build_backbone("rs152")
    text = str(err.value)
    assert "timm/resnetrs152.tf_in1k" in text and "backbone.weights=/path/to/" in text


def test_offline_url_download_names_the_url():
    with pytest.raises(WeightsError, match="download.pytorch.org/models/resnet50-0676ba61.pth"):
        build_backbone("resnet50")


def test_missing_file_and_wrong_file_type_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_backbone(TINY, weights=str(tmp_path / "nope.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="not a weights file"):
        build_backbone(TINY, weights=str(tmp_path / "notes.txt"))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        build_backbone(TINY, weights=str(damaged))
