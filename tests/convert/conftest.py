"""Writers for TensorFlow checkpoints and official-layout ResNet-RS variables, for the converter tests.

The writer produces the real tensor-bundle format (LevelDB-format table index + raw data file); with
TensorFlow installed, tests check it against TensorFlow's own reader and writer.
"""
from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transfer.convert.resnet_rs_tf import build_resnet_rs, official_variables, to_tf
from transfer.convert.tf_checkpoint import TABLE_MAGIC, TF_DTYPES, crc32c, mask_crc

TF_DTYPE_ENUM = {v: k for k, v in TF_DTYPES.items()}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def field_bytes(num: int, value: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(value)) + value


def _entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    out = field_varint(1, dtype) + field_bytes(2, dims)
    if offset:
        out += field_varint(4, offset)
    out += field_varint(5, size) + varint(6 << 3 | 5) + struct.pack("<I", crc)
    return out


def _block(records: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(records):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        last = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def _put_block(f, contents: bytes) -> bytes:
    handle = varint(f.tell()) + varint(len(contents))
    f.write(contents + b"\x00" + struct.pack("<I", mask_crc(crc32c(contents + b"\x00"))))
    return handle


def write_tf_checkpoint(prefix: Path, tensors: dict[str, torch.Tensor], *, block_size: int = 1024) -> Path:
    """Write ``tensors`` as a TensorFlow checkpoint at ``prefix`` (``.index`` + one data shard).

    Small blocks force several data blocks, so the index and key prefix-compression are exercised.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with open(f"{prefix}.data-00000-of-00001", "wb") as data:
        for name, value in tensors.items():
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            records.append((name.encode(), _entry(TF_DTYPE_ENUM[value.dtype], tuple(value.shape), data.tell(),
                                                  len(raw), mask_crc(crc32c(raw)))))
            data.write(raw)
    header = field_varint(1, 1) + field_bytes(3, field_varint(1, 1))  # num_shards 1, version {producer 1}
    records = [(b"", header)] + sorted(records)
    with open(f"{prefix}.index", "wb") as f:
        index, pending = [], []
        for key, value in records:
            pending.append((key, value))
            if sum(len(k) + len(v) for k, v in pending) >= block_size:
                index.append((key, _put_block(f, _block(pending, 16))))
                pending = []
        if pending:
            index.append((pending[-1][0], _put_block(f, _block(pending, 16))))
        meta = _put_block(f, _block([], 1))
        top = _put_block(f, _block(index, 1))
        f.write((meta + top).ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC))
    return prefix


def official_tensors(model: torch.nn.Module, layers: tuple[int, ...], *, ema: bool = True,
                     raw_offset: float | None = 1.0, slots: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official names and layouts, in the official creation order.

    With ``ema`` the weights go to the ``/ExponentialMovingAverage`` copies and the raw variables
    (when ``raw_offset`` is set) hold different values, as after EMA training; ``slots`` adds the
    ``/Momentum`` optimizer slots and ``global_step`` of a training checkpoint.
    """
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for var in official_variables(layers):
        value = to_tf(sd[var.timm_key], var.layout)
        if ema:
            if raw_offset is not None:
                out[var.tf_name] = value + raw_offset
            out[var.tf_name + "/ExponentialMovingAverage"] = value
        else:
            out[var.tf_name] = value
        if slots and not var.tf_name.endswith(("moving_mean", "moving_variance")):
            out[var.tf_name + "/Momentum"] = torch.zeros_like(value)
    if slots:
        out["global_step"] = torch.tensor(109475, dtype=torch.int64)
    return out


# Narrow bottleneck widths keep test checkpoints small; the mapping depends on the block layout only,
# and the full widths are checked against timm's resnetrs* models on the meta device.
TEST_WIDTHS = (8, 16, 32, 64)


def random_rs_model(layers: tuple[int, ...], seed: int = 0, widths: tuple[int, ...] = TEST_WIDTHS) -> torch.nn.Module:
    """A reduced ResNet-RS with random weights and BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_resnet_rs(layers, channels=widths).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def rs_checkpoint(tmp_path):
    """A random reduced ResNet-RS written as an official EMA training checkpoint."""
    layers = (2, 1, 1, 1)
    model = random_rs_model(layers)
    prefix = write_tf_checkpoint(tmp_path / "resnet-rs-test" / "model.ckpt", official_tensors(model, layers))
    return SimpleNamespace(model=model, layers=layers, widths=TEST_WIDTHS, prefix=prefix)


@pytest.fixture
def tf_tools():
    """The writers above, for tests that build their own checkpoints."""
    return SimpleNamespace(write=write_tf_checkpoint, official_tensors=official_tensors,
                           random_rs_model=random_rs_model, widths=TEST_WIDTHS)
