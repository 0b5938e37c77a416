"""The shared Hub/parquet reader (transfer.image_sources) as the ImageNet weight check uses it: a parquet copy of
ILSVRC/imagenet-1k read split by split, decode failures as counted items, a damaged file as one clear error."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tasks.imagenet.data import WNIDS, build_imagenet
from transfer.errors import DataError
from transfer.image_sources import HubRows, parquet_splits
from transfer.images import Undecodable


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), color).save(buf, "PNG")
    return buf.getvalue()


def _write_imagenet_parquet(root, split: str, cells: list[bytes], labels: list[int]):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(WNIDS))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in cells], "label": labels},
                                    features=features)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


def test_parquet_files_are_grouped_by_their_hub_split_name(tmp_path):
    files = [tmp_path / "data" / "validation-00000-of-00002.parquet", tmp_path / "data" / "validation-00001-of-00002"
             ".parquet", tmp_path / "data" / "train-00000-of-00001.parquet", tmp_path / "test" / "part.parquet"]
    assert parquet_splits(files) == {"validation": [str(files[0]), str(files[1])], "train": [str(files[2])],
                                     "test": [str(files[3])]}


def test_imagenet_parquet_copy_reads_only_its_split_and_counts_a_bad_image(tmp_path):
    _write_imagenet_parquet(tmp_path, "validation", [_png((200, 0, 0)), b"not an image", _png((0, 0, 200))],
                            [0, 17, 999])
    # a train file that is not even parquet: reading it would fail, so this shows only the asked split is read
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"damaged")
    rows, counts = build_imagenet(tmp_path)
    assert isinstance(rows, HubRows) and counts == {"images": 3, "classes": 1000}
    items = [rows[i] for i in range(3)]
    assert [label for _, label in items] == [0, 17, 999]
    assert items[0][0].mode == "RGB" and isinstance(items[1][0], Undecodable)
    assert items[1][0].name.startswith("validation[1]")


def test_a_damaged_parquet_file_is_one_data_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "validation-00000-of-00001.parquet").write_bytes(b"damaged")
    with pytest.raises(DataError, match="cannot read its parquet files"):
        build_imagenet(tmp_path)


def test_a_parquet_copy_without_the_split_names_what_is_missing(tmp_path):
    _write_imagenet_parquet(tmp_path, "train", [_png((1, 2, 3))], [0])
    with pytest.raises(DataError, match="no validation-\\*.parquet file"):
        build_imagenet(tmp_path)
