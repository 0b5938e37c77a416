"""The official ResNet-RS TF checkpoint converter, its tensor-bundle reader and the rs{depth}_i{res} entries."""
from __future__ import annotations

import os
import tarfile

import pytest
import timm
import torch
from tiny_networks import meta_state_shapes

from transfer.backbones import BACKBONES, build_backbone
from transfer.convert import CONVERTERS
from transfer.convert.__main__ import main as convert_main
from transfer.convert.resnet_rs_tf import (
    DEPTH_LAYERS,
    OFFICIAL_CHECKPOINTS,
    TARBALL_URL,
    build_resnet_rs,
    convert_checkpoint,
    convert_resnet_rs_tf,
    entry_name,
    infer_layout,
    official_variables,
)
from transfer.convert.tf_checkpoint import TFCheckpoint, _crc_update_serial, crc32c
from transfer.errors import WeightsError
from transfer.weights import load_strict, read_state_dict

EMA = "/ExponentialMovingAverage"


# --- tensor-bundle reader -------------------------------------------------------------------------

def test_crc32c_check_value_and_lanes_agree_with_serial():
    # CRC-32C check value of "123456789" (RFC 3720 appendix B.4 / the CRC catalogue).
    assert crc32c(b"123456789") == 0xE3069283
    for n in (0, 1, 63, 511, 512, 4097, 70_001, 300_007):
        data = os.urandom(n)
        assert crc32c(data) == _crc_update_serial(0xFFFFFFFF, data) ^ 0xFFFFFFFF, n


def test_bundle_roundtrip_of_dtypes_and_shapes(tmp_path, tf_tools):
    tensors = {"b/scalar": torch.tensor(7, dtype=torch.int64), "a/kernel": torch.randn(3, 3, 5, 7),
               "c/half": torch.randn(11).half(), "c/bf16": torch.randn(4, 2).bfloat16(),
               "d/int": torch.arange(6, dtype=torch.int32).reshape(2, 3), "e/empty": torch.zeros(0, 4)}
    tensors.update({f"many/var_{i:03d}": torch.full((2,), float(i)) for i in range(60)})  # several blocks
    ckpt = TFCheckpoint(tf_tools.write(tmp_path / "model.ckpt", tensors, block_size=256))
    assert ckpt.names() == sorted(tensors)
    for name, value in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), name


def test_damaged_files_are_refused(tmp_path, tf_tools):
    prefix = tf_tools.write(tmp_path / "model.ckpt", {"w": torch.randn(64, 64)})
    data = tmp_path / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="CRC-32C mismatch for variable 'w'"):
        TFCheckpoint(prefix).read("w")
    data.write_bytes(bytes(raw[:50]))
    with pytest.raises(WeightsError, match="truncated"):
        TFCheckpoint(prefix).read("w")
    index = tmp_path / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-1] + b"\x00")
    with pytest.raises(WeightsError, match="bad magic number"):
        TFCheckpoint(prefix)


# --- name mapping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", sorted(DEPTH_LAYERS))
def test_mapping_covers_every_timm_key_once(depth):
    timm_sd = meta_state_shapes(f"resnetrs{depth}")  # timm's network on the meta device, built once per session
    with torch.device("meta"):
        ours = build_resnet_rs(DEPTH_LAYERS[depth]).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == timm_sd
    variables = official_variables(DEPTH_LAYERS[depth])
    keys = [v.timm_key for v in variables]
    names = [v.tf_name for v in variables]
    assert len(set(keys)) == len(keys) and len(set(names)) == len(names)
    assert set(keys) == {k for k in timm_sd if not k.endswith("num_batches_tracked")}


def test_mapping_follows_the_official_creation_order():
    # Stem and first-block names as listed by sebastian-sz/resnet-rs-keras scripts/convert_weights.py.
    by_name = {v.tf_name: v.timm_key for v in official_variables((3, 4, 6, 3))}
    assert by_name["conv2d/kernel"] == "conv1.0.weight"
    assert by_name["batch_normalization_2/moving_variance"] == "bn1.running_var"
    assert by_name["conv2d_3/kernel"] == "maxpool.0.weight"
    assert by_name["conv2d_4/kernel"] == "layer1.0.downsample.1.weight"  # projection first
    assert by_name["batch_normalization_4/gamma"] == "layer1.0.downsample.2.weight"
    assert by_name["conv2d_8/bias"] == "layer1.0.se.fc1.bias"
    assert by_name["conv2d_9/kernel"] == "layer1.0.se.fc2.weight"
    assert by_name["conv2d_10/kernel"] == "layer1.1.conv1.weight"  # no projection after block 0
    assert by_name["dense/kernel"] == "fc.weight"
    # 4 stem convs, 4 projections, 5 convs per block; 4 stem BNs, 4 projection BNs, 3 per block.
    n_blocks = 16
    assert f"conv2d_{4 + 4 + 5 * n_blocks - 1}/kernel" in by_name
    assert f"conv2d_{4 + 4 + 5 * n_blocks}/kernel" not in by_name
    assert f"batch_normalization_{4 + 4 + 3 * n_blocks - 1}/beta" in by_name


# --- conversion -----------------------------------------------------------------------------------

def test_reduced_depth_roundtrip_is_bit_exact(rs_checkpoint):
    model, layers, widths = rs_checkpoint.model, rs_checkpoint.layers, rs_checkpoint.widths
    ckpt = TFCheckpoint(rs_checkpoint.prefix)
    conv = convert_checkpoint(ckpt, layers, widths=widths)
    assert conv.ema
    model_names = {n for n in ckpt.names() if n.endswith(EMA)}
    assert sorted(conv.consumed) == sorted(model_names) and len(set(conv.consumed)) == len(conv.consumed)
    assert set(conv.ignored) == set(ckpt.names()) - model_names  # raw copies, Momentum slots, global_step
    own = model.state_dict()
    assert set(conv.state_dict) == set(own)
    for key, value in own.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(conv.state_dict[key], value), key
    fresh = build_resnet_rs(layers, channels=widths).eval()
    load_strict(fresh, conv.state_dict, origin="test")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_layout_is_read_from_the_checkpoint(rs_checkpoint):
    assert infer_layout(TFCheckpoint(rs_checkpoint.prefix)) == (rs_checkpoint.layers, rs_checkpoint.widths)


def test_raw_variables_are_used_without_ema_copies(tmp_path, tf_tools):
    layers = (1, 1, 1, 1)
    model = tf_tools.random_rs_model(layers, seed=1)
    prefix = tf_tools.write(tmp_path / "model.ckpt", tf_tools.official_tensors(model, layers, ema=False))
    conv = convert_checkpoint(TFCheckpoint(prefix), layers, widths=tf_tools.widths)
    assert not conv.ema
    assert torch.equal(conv.state_dict["layer3.0.se.fc2.weight"], model.layer3[0].se.fc2.weight)


def test_ema_false_reads_the_raw_copies(rs_checkpoint):
    ck = rs_checkpoint
    conv = convert_checkpoint(TFCheckpoint(ck.prefix), ck.layers, widths=ck.widths, ema=False)
    assert torch.equal(conv.state_dict["fc.bias"], ck.model.fc.bias + 1.0)  # the writer offsets raw copies by 1


def test_incomplete_ema_copies_are_an_error(tmp_path, tf_tools):
    layers = (1, 1, 1, 1)
    tensors = tf_tools.official_tensors(tf_tools.random_rs_model(layers), layers)
    del tensors["conv2d_7/kernel" + EMA]
    prefix = tf_tools.write(tmp_path / "model.ckpt", tensors)
    with pytest.raises(WeightsError, match=r"conv2d_7/kernel/ExponentialMovingAverage: missing"):
        convert_checkpoint(TFCheckpoint(prefix), layers, widths=tf_tools.widths)


def test_deeper_checkpoint_is_refused_with_its_first_extra_variables(rs_checkpoint):
    ck = rs_checkpoint  # blocks (2, 1, 1, 1)
    with pytest.raises(WeightsError) as err:
        convert_checkpoint(TFCheckpoint(ck.prefix), (1, 1, 1, 1), widths=ck.widths)
    text = str(err.value)
    # One block fewer in res2 shifts every later name by 5 convs / 3 BNs, so the first mismatch is the
    # first variable after the shared prefix, and the message names the checkpoint's own layout.
    assert "first mismatching variables: conv2d_10/kernel" in text
    assert "blocks [2, 1, 1, 1]" in text


def test_shallower_checkpoint_is_refused(rs_checkpoint):
    ck = rs_checkpoint  # blocks (2, 1, 1, 1): its conv2d_21 is the res4 projection, not a res3 block
    with pytest.raises(WeightsError) as err:
        convert_checkpoint(TFCheckpoint(ck.prefix), (2, 2, 1, 1), widths=ck.widths)
    text = str(err.value)
    assert "first mismatching variables: conv2d_21/kernel/ExponentialMovingAverage: shape" in text
    assert "blocks [2, 1, 1, 1]" in text


def _tarball(prefix, path, *, with_state_file: bool):
    folder = prefix.parent
    (folder / "model.ckpt.meta").write_bytes(b"graph, not needed")
    if with_state_file:
        (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=folder.name)
    return path


@pytest.mark.parametrize("with_state_file", [False, True])
def test_every_source_form_converts_alike(rs_checkpoint, tmp_path, with_state_file):
    prefix = rs_checkpoint.prefix
    tarball = _tarball(prefix, tmp_path / "resnet-rs-test.tar.gz", with_state_file=with_state_file)
    expected = {k: v for k, v in rs_checkpoint.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for src in (tarball, prefix.parent, prefix, prefix.with_name("model.ckpt.index")):
        sd = convert_resnet_rs_tf(src)
        assert all(torch.equal(sd[k], v) for k, v in expected.items()), src


def test_tarball_member_escaping_the_folder_is_refused(tmp_path, rs_checkpoint):
    prefix = rs_checkpoint.prefix
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(prefix.with_name("model.ckpt.index"), arcname="../model.ckpt.index")
    with pytest.raises(WeightsError, match="not a readable tar archive"):
        convert_resnet_rs_tf(path)


def test_cli_converts_a_tarball(rs_checkpoint, tmp_path, capsys):
    ck = rs_checkpoint
    tarball = _tarball(ck.prefix, tmp_path / "resnet-rs-test.tar.gz", with_state_file=False)
    out = tmp_path / "converted.safetensors"
    assert convert_main(["resnet_rs_tf", str(tarball), str(out)]) == 0
    fresh = build_resnet_rs(ck.layers, channels=ck.widths)
    load_strict(fresh, read_state_dict(out), origin=str(out))
    assert torch.equal(fresh.layer4[0].conv2.weight, ck.model.layer4[0].conv2.weight)
    assert convert_main(["resnet_rs_tf", str(tmp_path / "missing.tar.gz"), str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- registry entries -----------------------------------------------------------------------------

def test_eleven_entries_with_resolution_top1_and_source():
    assert len(OFFICIAL_CHECKPOINTS) == 11
    assert set(CONVERTERS.get("resnet_rs_tf").backbones) == {entry_name(d, r) for d, r, _ in OFFICIAL_CHECKPOINTS}
    ported = 0
    for depth, res, top1 in OFFICIAL_CHECKPOINTS:
        spec = BACKBONES.get(f"rs{depth}_i{res}")
        alias = BACKBONES.get(f"rs{depth}")
        assert (spec.arch, spec.train_res, spec.test_res, spec.top1) == (f"resnetrs{depth}", res, res, top1)
        assert spec.convert is not None
        assert TARBALL_URL.format(depth=depth, res=res) in spec.download_hint
        assert f"python -m transfer.convert resnet_rs_tf resnet-rs-{depth}-i{res}.tar.gz" in spec.download_hint
        if alias.train_res == res:  # the checkpoint timm ports: same weights as the rs{depth} alias
            ported += 1
            assert spec.hub_id == alias.hub_id and spec.top1 == alias.top1
        else:
            assert spec.hub_id is None and spec.url is None
    assert ported == 7


def test_entry_without_automatic_source_names_the_tarball():
    with pytest.raises(WeightsError, match="resnet-rs-152-i192.tar.gz"):
        build_backbone("rs152_i192", weights="pretrained")


def test_entry_refuses_a_checkpoint_of_another_depth(rs_checkpoint):
    index = rs_checkpoint.prefix.with_name("model.ckpt.index")
    with pytest.raises(WeightsError, match=r"backbone 'rs50_i160' \(ResNet-RS-50.*blocks \[2, 1, 1, 1\]"):
        build_backbone("rs50_i160", weights=str(index))


@pytest.mark.e2e
def test_entry_converts_a_full_depth_checkpoint_on_first_use(tmp_path, tf_tools, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.manual_seed(0)
    model = timm.create_model("resnetrs50").eval()
    tensors = tf_tools.official_tensors(model, DEPTH_LAYERS[50], raw_offset=None, slots=False)
    prefix = tf_tools.write(tmp_path / "resnet-rs-50-i160" / "model.ckpt", tensors, block_size=1 << 18)
    index = prefix.with_name("model.ckpt.index")
    backbone = build_backbone("rs50_i160", weights=str(index))
    cached = list((tmp_path / "torch_home" / "hub" / "checkpoints").glob("rs50_i160-tf-*.safetensors"))
    assert len(cached) == 1
    model.reset_classifier(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), model(x))
    (prefix.parent / "model.ckpt.data-00000-of-00001").unlink()  # a second use reads the cache only
    again = build_backbone("rs50_i160", weights=str(index)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# --- against TensorFlow itself (optional) ---------------------------------------------------------

def _tensorflow():
    return pytest.importorskip("tensorflow", reason="TensorFlow is not installed (optional: pip install "
                                                    "tensorflow-cpu); the pure-Python reader is tested above")


def test_tensorflow_written_checkpoint_converts_bit_exact(tmp_path, tf_tools):
    tf = _tensorflow()
    layers = (2, 1, 1, 1)
    model = tf_tools.random_rs_model(layers, seed=3)
    tensors = tf_tools.official_tensors(model, layers)
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n].numpy()) for n in names])
    conv = convert_checkpoint(TFCheckpoint(tmp_path / "model.ckpt"), layers, widths=tf_tools.widths)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(conv.state_dict[key], value), key


def test_tensorflow_reads_our_checkpoints(tmp_path, tf_tools):
    tf = _tensorflow()
    tensors = {"conv2d/kernel": torch.randn(3, 3, 3, 32), "global_step": torch.tensor(5, dtype=torch.int64),
               "x/half": torch.randn(7).half()}
    tensors.update({f"many/var_{i:03d}": torch.randn(3) for i in range(40)})
    prefix = tf_tools.write(tmp_path / "model.ckpt", tensors, block_size=200)
    reader = tf.train.load_checkpoint(str(prefix))
    assert set(reader.get_variable_to_shape_map()) == set(tensors)
    for name, value in tensors.items():
        assert (reader.get_tensor(name) == value.numpy()).all(), name

