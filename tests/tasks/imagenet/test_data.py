"""tasks.imagenet.data: the val/<wnid>/ layout, the Hugging Face copy, undecodable images."""
from __future__ import annotations

import pytest
from imagenet_copies import truncated_jpeg, write_tree
from PIL import Image

from tasks.imagenet.data import WNIDS, build_imagenet
from transfer.errors import DataError
from transfer.images import Undecodable


def test_full_tree_uses_the_imagenet_class_order(tmp_path):
    write_tree(tmp_path, {w: 1 for w in WNIDS})
    ds, counts = build_imagenet(tmp_path)
    assert counts == {"images": 1000, "classes": 1000}
    assert ds.class_to_idx == {w: i for i, w in enumerate(sorted(WNIDS))}
    path, label = ds.samples[-1]
    assert f"/{WNIDS[label]}/" in path and label == 999


def test_partial_tree_keeps_imagenet_indices(tmp_path):
    chosen = [WNIDS[7], WNIDS[500]]
    write_tree(tmp_path, {w: 2 for w in chosen})
    with pytest.raises(DataError, match="allow_partial=true"):
        build_imagenet(tmp_path)
    ds, counts = build_imagenet(tmp_path / "val", allow_partial=True)  # the split folder itself works too
    assert counts == {"images": 4, "classes": 2}
    assert sorted({label for _, label in ds.samples}) == [7, 500]


@pytest.mark.parametrize("folder", ["cat", "n0144076"])
def test_folders_that_are_not_wnids_show_the_expected_tree(tmp_path, folder):
    write_tree(tmp_path, {WNIDS[0]: 1})
    (tmp_path / "val" / folder).mkdir()
    with pytest.raises(DataError) as err:
        build_imagenet(tmp_path, allow_partial=True)
    assert folder in str(err.value) and "val/" in str(err.value) and WNIDS[0] in str(err.value)


def test_directory_without_imagenet_shows_the_expected_tree(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="n01440764"):
        build_imagenet(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        build_imagenet(tmp_path / "absent")


def test_empty_wnid_folder_is_a_clear_error(tmp_path):
    write_tree(tmp_path, {WNIDS[0]: 1})
    (tmp_path / "val" / WNIDS[1]).mkdir()
    with pytest.raises(DataError, match="at least one image"):
        build_imagenet(tmp_path, allow_partial=True)


def test_hugging_face_copy_saved_to_disk(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(WNIDS))})
    images = [Image.new("RGB", (9, 9), (i * 60, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 17, 999]}, features=features)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hf"))
    loaded, counts = build_imagenet(tmp_path / "hf")
    assert counts == {"images": 3, "classes": 1000}
    assert [loaded[i][1] for i in range(3)] == [0, 17, 999]
    assert loaded[2][0].mode == "RGB"


def test_hugging_face_copy_with_the_wrong_label_set_is_refused(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "label": [1]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="1000 classes"):
        build_imagenet(tmp_path / "hf")


def test_truncated_jpeg_becomes_an_undecodable_item(tmp_path):
    write_tree(tmp_path, {WNIDS[1]: 1})
    bad = tmp_path / "val" / WNIDS[1] / "ILSVRC2012_val_99999999.JPEG"
    truncated_jpeg(bad)
    ds, _ = build_imagenet(tmp_path, allow_partial=True)
    items = {path: ds[i][0] for i, (path, _) in enumerate(ds.samples)}
    assert isinstance(items[str(bad)], Undecodable) and items[str(bad)].name == str(bad)
    assert sum(isinstance(v, Undecodable) for v in items.values()) == 1
