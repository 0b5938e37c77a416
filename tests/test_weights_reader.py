"""The one torch-checkpoint reader and the one state-dict diff, shared by the backbone loader and the converters:
the same refusals and the same wording wherever a file is read or compared."""
import os
from pathlib import Path

import pytest
import torch

from transfer.convert._layout import check_layout
from transfer.convert.dino import convert_dino
from transfer.convert.moco import convert_moco_v2
from transfer.errors import WeightsError
from transfer.weights import diff_state_dict, non_finite, read_state_dict, read_torch_file, unwrap_state_dict

# Every place that reads a torch file: the backbone loader's reader and the converters of torch releases.
READERS = {"loader": read_state_dict, "dino": convert_dino, "moco_v2": convert_moco_v2}


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("reader", READERS)
def test_pickled_code_is_refused_by_every_reader_naming_the_file(tmp_path, reader):
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _RunsCode(marker)}, path)
    with pytest.raises(WeightsError, match=f"refused to load {str(path)!r}.*could run code"):
        READERS[reader](path)
    assert not marker.exists()


@pytest.mark.parametrize("reader", READERS)
def test_damaged_and_missing_files_are_named_by_every_reader(tmp_path, reader):
    path = tmp_path / "truncated.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match=f"{str(path)!r} could not be read as a PyTorch file"):
        READERS[reader](path)
    with pytest.raises(WeightsError, match=f"{str(tmp_path / 'absent.pth')!r} does not exist"):
        READERS[reader](tmp_path / "absent.pth")


def test_converters_say_where_to_get_a_missing_release(tmp_path):
    with pytest.raises(WeightsError, match="docs/ssl_backbones.md"):
        convert_dino(tmp_path / "dino_resnet50_pretrain.pth")
    with pytest.raises(WeightsError, match="backbone.weights="):  # the loader's own advice
        read_state_dict(tmp_path / "model.pth")


def test_read_torch_file_returns_what_was_saved(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, path)
    obj = read_torch_file(path)
    assert obj["epoch"] == 3 and torch.equal(obj["state_dict"]["w"], torch.ones(2))


def test_unwrap_takes_two_wrapper_levels_and_refuses_non_tensors():
    w = torch.ones(2)
    assert unwrap_state_dict({"state_dict": {"model": {"w": w}}, "epoch": 1}, origin="f")["w"] is w
    assert unwrap_state_dict({"model": {"w": w}, "optimizer": {}}, origin="f")["w"] is w
    with pytest.raises(WeightsError, match=r"'f.pth': entries that are not tensors: \['step'\]"):
        unwrap_state_dict({"w": w, "step": 3}, origin="f.pth")
    with pytest.raises(WeightsError, match=r"'f.pth' holds no state dict .*its keys: \['epoch'\]"):
        unwrap_state_dict({"epoch": 1}, origin="f.pth")
    with pytest.raises(WeightsError, match="holds no state dict"):
        unwrap_state_dict([w], origin="f.pth")


def test_diff_finds_missing_unexpected_and_mis_shaped_keys_from_tensors_or_shapes():
    expected = {"a": torch.zeros(2, 3), "b": (4,), "fc.weight": (10, 4)}
    found = {"b": torch.zeros(5), "extra": torch.zeros(1), "a": (2, 3)}
    diff = diff_state_dict(found, expected)
    assert diff.missing == ("fc.weight",) and diff.unexpected == ("extra",)
    assert diff.mismatched == (("b", (5,), (4,)),)
    assert bool(diff)
    assert diff.describe() == ("missing (1): fc.weight; unexpected (1): extra; "
                               "shape mismatch (1): b: file (5,) vs model (4,)")
    assert diff_state_dict(found, expected, optional_prefixes=("fc.",)).missing == ()
    assert not diff_state_dict({"a": (2, 3)}, {"a": torch.zeros(2, 3)})


def test_diff_description_counts_what_it_leaves_out():
    diff = diff_state_dict({}, {f"k{i}": (1,) for i in range(8)})
    assert diff.describe(n=3) == "missing (8): k0, k1, k2 … and 5 more"
    mismatch = diff_state_dict({"w": (2,)}, {"w": (3,)})
    assert mismatch.describe(found="converted", expected="timm") == "shape mismatch (1): w: converted (2,) vs timm (3,)"


def test_converter_layout_check_words_its_gaps_with_the_shared_diff():
    layout = {"conv1.weight": torch.Size([8, 3, 3, 3]), "bn1.weight": torch.Size([8]), "fc.weight": torch.Size([2, 8])}
    with pytest.raises(WeightsError) as err:
        check_layout({"conv1.weight": torch.zeros(8, 3, 1, 1), "head.w": torch.zeros(1)}, layout, origin="rel.pth")
    text = str(err.value)
    assert "converting 'rel.pth' did not give a complete ResNet state dict" in text
    assert ("missing (1): bn1.weight; unexpected (1): head.w; shape mismatch (1): conv1.weight: converted "
            "(8, 3, 1, 1) vs timm (8, 3, 3, 3)") in text  # fc.* is optional: no classifier in SSL releases


def test_non_finite_names_nan_and_inf_tensors_only_even_where_a_sum_overflows():
    def nan_at(i):
        t = torch.ones(50)
        t[i] = float("nan")
        return t

    sd = {"nan": nan_at(49), "inf": torch.tensor([1.0, float("-inf")]), "mixed": torch.tensor([float("inf"), -1e38]),
          "overflowing": torch.full((8,), 3e38),  # finite values whose float32 sum is Inf
          "half": torch.full((8,), 6e4, dtype=torch.float16), "half_nan": nan_at(0).half(),
          "ints": torch.arange(4), "clean": torch.randn(3, 3)}
    assert non_finite(sd) == ["nan", "inf", "mixed", "half_nan"]
