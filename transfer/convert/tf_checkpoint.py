"""Read TensorFlow checkpoints (``PREFIX.index`` + ``PREFIX.data-NNNNN-of-NNNNN``) without TensorFlow.

Why hand-written: the only library that reads this format is TensorFlow itself (1.5 GB installed),
and the official ResNet-RS and SimCLR releases are TF1 checkpoints. The format is small and stable:
- ``PREFIX.index`` is a LevelDB-format table (tensorflow ``core/lib/io/format.cc``, ``block.cc``,
  ``table.cc``): sorted ``name -> BundleEntryProto`` records, with the ``BundleHeaderProto`` under the
  empty name (``core/util/tensor_bundle/tensor_bundle.cc``, ``core/protobuf/tensor_bundle.proto``).
- ``PREFIX.data-*`` holds each tensor's raw little-endian bytes at the entry's ``offset``/``size``,
  checked by the entry's masked CRC-32C.
Everything read is checked (block CRCs, the table magic number, sizes against dtype and shape, data
CRCs), so a damaged download fails with a message instead of giving wrong weights.
"""
from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from transfer.errors import WeightsError

TABLE_MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber, tensorflow core/lib/io/format.h
FOOTER_SIZE = 48  # two varint64 block handles padded to 40 bytes + the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked CRC-32C
CRC_MASK_DELTA = 0xA282EAD8  # tensorflow core/lib/hash/crc32c.h (Mask/Unmask)
CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected

# tensorflow core/framework/types.proto DataType values this reader can turn into torch tensors.
TF_DTYPES: dict[int, torch.dtype] = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8,
                                     5: torch.int16, 6: torch.int8, 9: torch.int64, 10: torch.bool,
                                     14: torch.bfloat16, 19: torch.float16}
DATA_FILE = re.compile(r"\.data-\d{5}-of-\d{5}$")


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ CRC32C_POLY, table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _crc_update_serial(reg: int, data: bytes) -> int:
    for byte in data:
        reg = _TABLE_LIST[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of ``data`` (the checksum TensorFlow stores for each tensor and table block).

    A byte-by-byte loop runs at ~10 MB/s in Python, too slow for checkpoints of several GB, so long
    inputs are cut into equal lanes whose CRCs advance together in numpy and are then chained: the CRC
    register is linear over GF(2), so crc(A+B) = shift_len(B)(crc(A)) xor crc0(B).
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    lanes = min(4096, buf.size // 64)
    if lanes < 8:
        return _crc_update_serial(0xFFFFFFFF, bytes(buf)) ^ 0xFFFFFFFF
    length = buf.size // lanes
    rows = np.ascontiguousarray(buf[: lanes * length].reshape(lanes, length).T)  # (length, lanes)
    # Lanes start from a zero register; 32 extra lanes start at the unit vectors and read zero bytes,
    # so they end as the columns of the linear map "append `length` zero bytes".
    reg = np.zeros(lanes + 32, dtype=np.uint32)
    reg[lanes:] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    step = np.zeros(lanes + 32, dtype=np.uint32)
    for row in rows:
        step[:lanes] = row
        reg = _TABLE[(reg ^ step) & 0xFF] ^ (reg >> 8)
    lane_crc, columns = reg[:lanes].tolist(), reg[lanes:]
    # Byte-wise lookup tables of the shift map: shift(x) = T0[x & 255] ^ T1[x >> 8 & 255] ^ ...
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256, 8)
    shift_tables = []
    for b in range(4):
        cols = columns[8 * b: 8 * b + 8]
        picked = np.where(bits.astype(bool), cols[None, :], np.uint32(0))
        shift_tables.append(np.bitwise_xor.reduce(picked, axis=1).tolist())
    t0, t1, t2, t3 = shift_tables
    acc = 0xFFFFFFFF
    for lane in lane_crc:
        acc = t0[acc & 0xFF] ^ t1[(acc >> 8) & 0xFF] ^ t2[(acc >> 16) & 0xFF] ^ t3[acc >> 24] ^ lane
    return _crc_update_serial(acc, bytes(buf[lanes * length:])) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """The masked form TensorFlow stores (rotate right by 15, add a constant)."""
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a protobuf/LevelDB varint at ``pos``; return (value, next position)."""
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message, in wire order.

    Hand-decoded because the message classes (BundleEntryProto, ...) ship only with TensorFlow.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a checkpoint lives (decoded BundleEntryProto)."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None
    sliced: bool


def _parse_entry(buf: bytes) -> TensorEntry:
    dtype, shape, shard, offset, size, crc, sliced = 0, [], 0, 0, 0, None, False
    for field, value in proto_fields(buf):
        if field == 1:
            dtype = value
        elif field == 2:  # TensorShapeProto: repeated Dim dim = 2 (Dim.size = 1)
            shape = [dict(proto_fields(dim)).get(1, 0) for f, dim in proto_fields(value) if f == 2]
        elif field == 3:
            shard = value
        elif field == 4:
            offset = value
        elif field == 5:
            size = value
        elif field == 6:
            crc = value
        elif field == 7:
            sliced = True
    return TensorEntry(dtype, tuple(shape), shard, offset, size, crc, sliced)


def _read_block(f: BinaryIO, handle: bytes, origin: str) -> bytes:
    offset, pos = read_varint(handle, 0)
    size, _ = read_varint(handle, pos)
    f.seek(offset)
    raw = f.read(size + BLOCK_TRAILER_SIZE)
    if len(raw) != size + BLOCK_TRAILER_SIZE:
        raise WeightsError(f"{origin}: truncated (a table block runs past the end of the file).")
    contents, kind = raw[:size], raw[size]
    stored = struct.unpack_from("<I", raw, size + 1)[0]
    if stored != mask_crc(crc32c(raw[:size + 1])):
        raise WeightsError(f"{origin}: CRC mismatch in the table block at byte {offset}; the file is damaged.")
    if kind != 0:
        raise WeightsError(f"{origin}: compressed table block (type {kind}); TensorFlow writes checkpoint "
                           f"indexes uncompressed, so this is not a checkpoint index.")
    return contents


def _block_records(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Records of one table block: keys are prefix-compressed against the previous key."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    pos, key = 0, b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


class TFCheckpoint:
    """The tensors of one TensorFlow checkpoint ``prefix``, read on demand: ``ckpt.read(name)``."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        index = Path(f"{self.prefix}.index")
        origin = str(index)
        if not index.is_file():
            raise WeightsError(f"{origin!r} does not exist: a TensorFlow checkpoint PREFIX needs "
                               f"PREFIX.index and PREFIX.data-00000-of-NNNNN beside it.")
        try:
            with open(index, "rb") as f:
                f.seek(0, 2)
                if f.tell() < FOOTER_SIZE:
                    raise WeightsError(f"{origin}: too short to be a checkpoint index.")
                f.seek(-FOOTER_SIZE, 2)
                footer = f.read(FOOTER_SIZE)
                if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
                    raise WeightsError(f"{origin}: not a TensorFlow checkpoint index (bad magic number).")
                # Footer: metaindex handle (unused: TensorFlow writes no meta blocks), then index handle,
                # each a (varint offset, varint size) pair.
                pos = read_varint(footer, read_varint(footer, 0)[1])[1]
                end = read_varint(footer, read_varint(footer, pos)[1])[1]
                records: dict[bytes, bytes] = {}
                for _, handle in _block_records(_read_block(f, footer[pos:end], origin)):
                    records.update(_block_records(_read_block(f, handle, origin)))
        except ValueError as e:  # malformed varints or protobuf
            raise WeightsError(f"{origin}: malformed checkpoint index ({e}).") from None
        if b"" not in records:
            raise WeightsError(f"{origin}: checkpoint index without a bundle header.")
        header = dict(proto_fields(records.pop(b"")))
        if header.get(2, 0) != 0:
            raise WeightsError(f"{origin}: big-endian checkpoint; only little-endian ones are supported.")
        self.num_shards: int = header.get(1, 1)
        self.entries = {k.decode(): _parse_entry(v) for k, v in records.items()}

    def names(self) -> list[str]:
        """Variable names, sorted."""
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def data_file(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, checked against its recorded size and CRC-32C."""
        entry = self.entries[name]
        if entry.sliced:
            raise WeightsError(f"{self.prefix}: variable {name!r} is partitioned into slices, which this "
                               f"reader does not support.")
        dtype = TF_DTYPES.get(entry.dtype)
        if dtype is None:
            raise WeightsError(f"{self.prefix}: variable {name!r} has TensorFlow dtype enum {entry.dtype}; "
                               f"supported: {sorted(TF_DTYPES)}.")
        numel = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != numel * dtype.itemsize:
            raise WeightsError(f"{self.prefix}: variable {name!r} has {entry.size} bytes, expected "
                               f"{numel * dtype.itemsize} for shape {entry.shape}.")
        path = self.data_file(entry.shard)
        if not path.is_file():
            raise WeightsError(f"{str(path)!r} is missing: the data shard {entry.shard} of checkpoint "
                               f"{str(self.prefix)!r}.")
        with open(path, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
        if len(data) != entry.size:
            raise WeightsError(f"{str(path)!r} is truncated: variable {name!r} runs past its end.")
        if entry.crc is not None and mask_crc(crc32c(data)) != entry.crc:
            raise WeightsError(f"{str(path)!r}: CRC-32C mismatch for variable {name!r}; the file is damaged. "
                               f"Download the checkpoint again.")
        if numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry.shape)


def find_checkpoint_prefix(path: Path) -> Path:
    """The checkpoint prefix named by ``path``: a prefix, its ``.index``/``.data-*`` file or a folder.

    In a folder the ``checkpoint`` state file decides when present (official releases sometimes ship
    without it); otherwise the folder (searched recursively) must hold exactly one ``*.index``.
    """
    path = Path(path)
    if Path(f"{path}.index").is_file():
        return path
    if path.is_file() and path.suffix == ".index":
        return path.with_suffix("")
    if path.is_file() and DATA_FILE.search(path.name):
        return path.with_name(DATA_FILE.sub("", path.name))
    if path.is_dir():
        for state in sorted(path.rglob("checkpoint")):
            found = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"), re.M)
            if found:
                prefix = state.parent / found.group(1)
                if Path(f"{prefix}.index").is_file():
                    return prefix
        indexes = sorted(path.rglob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        if indexes:
            raise WeightsError(f"{str(path)!r} holds several checkpoints "
                               f"({', '.join(str(p.with_suffix('')) for p in indexes[:5])}); pass one prefix.")
    raise WeightsError(f"{str(path)!r} is not a TensorFlow checkpoint: expected PREFIX.index and "
                       f"PREFIX.data-00000-of-00001 (pass the prefix, the .index file or their folder), "
                       f"or a .tar.gz holding them.")


def extract_checkpoint_tarball(tarball: Path, dest: Path) -> Path:
    """Unpack the checkpoint files of ``tarball`` into ``dest`` and return the checkpoint prefix.

    Only ``*.index``, ``*.data-*`` and ``checkpoint`` members are written (the graph ``.meta`` is not
    needed); tarfile's ``data`` filter refuses absolute paths, links and ``..`` escapes.
    """
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and (name.endswith(".index") or DATA_FILE.search(name) or name == "checkpoint"):
                    tar.extract(member, dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise WeightsError(f"{str(tarball)!r} is not a readable tar archive ({e}). Download the checkpoint "
                           f"again, or pass its extracted folder.") from None
    return find_checkpoint_prefix(dest)
