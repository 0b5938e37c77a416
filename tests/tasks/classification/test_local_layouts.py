"""Every local layout, generic or official: the feature cache key covers every file read, and every image decodes
under ``task.max_image_pixels``.

The copies come from ``tests/local_copies.py`` (real formats); a layout registered without a writer there fails
here, so a new layout cannot skip these checks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from local_copies import ARRAYS, GENERIC, OFFICIAL, write_flowers

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import SPECS, build_from_spec
from transfer.errors import DataError
from transfer.image_sources import accepted_layouts, image_files
from transfer.images import TooLarge

LAYOUTS = {**{f"generic:{k}": v for k, v in GENERIC.items()},
           **{f"official:{name}": (name, write) for name, write in OFFICIAL.items()}}


def test_every_registered_local_layout_has_a_tiny_copy_here():
    assert len(re.findall(r"^\s+\d+\. ", accepted_layouts(), flags=re.M)) == len(GENERIC)
    assert {name for name, spec in SPECS.items() if spec.official is not None} == set(OFFICIAL)


def _load(name: str, data_dir: Path, **kwargs):
    cfg = ClassificationTaskConfig(name=name, dataset=name, data_dir=str(data_dir), check_split_sizes=False, **kwargs)
    return build_from_spec(SPECS[name], cfg)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_identity_covers_every_file_of_the_copy(layout, tmp_path):
    """Each file's size and mtime: re-saving any one (an image, a split list, a label file, an arrow or parquet
    file) changes the identity, so features cached from the old file are not reused."""
    name, write = LAYOUTS[layout]
    root = write(tmp_path / "copy")
    before = _load(name, root).source_id
    assert before and _load(name, root).source_id == before  # stable while nothing changes
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files
    seen = {before}
    for f in files:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as when the file is replaced
        now = _load(name, root).source_id
        assert now not in seen, f"{layout}: re-saving {f.relative_to(root)} left the identity unchanged"
        seen.add(now)


def test_an_edited_flowers_image_changes_the_feature_cache_identity(tmp_path):
    """Flowers-102 from its official files: a replaced image must not reuse the cached features."""
    written = write_flowers(tmp_path)
    before = _load("flowers102", tmp_path).source_id
    path = tmp_path / "jpg" / f"image_{written['ids']['tstid'][0]:05d}.jpg"
    st = path.stat()
    from PIL import Image
    Image.new("RGB", (40, 40), (1, 2, 3)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the size still tells
    assert _load("flowers102", tmp_path).source_id != before


@pytest.mark.parametrize("layout", sorted(k for k in LAYOUTS if LAYOUTS[k][1] not in {OFFICIAL[n] for n in ARRAYS}))
def test_max_image_pixels_holds_in_every_layout(layout, tmp_path):
    """A 1200 x 1200 image under task.max_image_pixels=10000: the scan refuses it, naming the setting; without the
    scan the item decodes to a TooLarge marker (which the loaders turn into the same error)."""
    name, write = LAYOUTS[layout]
    root = write(tmp_path / "copy", big=True)
    with pytest.raises(DataError, match=r"too large.*1,440,000 pixels.*10,000.*task.max_image_pixels"):
        _load(name, root, max_image_pixels=10_000)
    splits = _load(name, root, max_image_pixels=10_000, scan_images=False)
    items = [ds[i][0] for ds in (splits.train, splits.val, splits.test) for i in range(len(ds))]
    assert sum(isinstance(x, TooLarge) for x in items) == 1
    assert _load(name, root, max_image_pixels=BIG_ENOUGH).counts["skipped_images"] == 0


BIG_ENOUGH = 1200 * 1200


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_only_the_pixel_array_layouts_read_no_image_file(name, tmp_path):
    """The layouts left out of the max_image_pixels test are exactly those that read no image file."""
    splits = _load(name, OFFICIAL[name](tmp_path / "copy"))
    assert (not any(image_files(ds) for ds in (splits.train, splits.val, splits.test))) == (name in ARRAYS)


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_a_pixel_array_layout_holds_only_32_by_32_images(name, tmp_path):
    """CIFAR's batches are (N, 3072) uint8 rows, 32 x 32 x 3 by format; a batch of larger rows is refused, so no
    image of such a copy can exceed task.max_image_pixels (at least 1,024)."""
    import pickle

    root = OFFICIAL[name](tmp_path / "copy")
    batch = sorted(p for p in root.rglob("*") if p.is_file() and p.name in ("data_batch_1", "train"))[0]
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3 * 64 * 64), dtype=np.uint8), "labels": [0, 1], "fine_labels": [0, 1]},
                    f, protocol=2)
    with pytest.raises(DataError, match=r"expected 'data' uint8 \(N, 3072\)"):
        _load(name, root)


def test_a_flowers_copy_without_setid_says_what_the_official_layout_needs(tmp_path):
    write_flowers(tmp_path)
    (tmp_path / "setid.mat").unlink()
    with pytest.raises(DataError) as e:
        _load("flowers102", tmp_path)
    message = str(e.value)
    assert "It holds jpg/, imagelabels.mat of flowers102's official layout but not setid.mat" in message
    assert "1. the official Flowers-102 files: jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat" in message
    assert "4. an ImageFolder tree" in message


def test_a_partial_copy_in_a_download_subfolder_says_what_is_missing(tmp_path):
    """The hint looks in the layout's subfolders too and names either place of a file that may sit in two."""
    from official_copies import write_cars

    write_cars(tmp_path / "stanford_cars", test_annos_in_devkit=True)
    for f in (tmp_path / "stanford_cars" / "cars_test").iterdir():
        f.unlink()
    (tmp_path / "stanford_cars" / "cars_test").rmdir()
    with pytest.raises(DataError) as e:
        _load("stanford_cars", tmp_path)
    assert ("It holds devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, cars_test_annos_withlabels.mat "
            "(or devkit/cars_test_annos_withlabels.mat) of stanford_cars's official layout but not cars_test/"
            in str(e.value))
