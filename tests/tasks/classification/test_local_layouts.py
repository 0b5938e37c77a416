"""Every local layout, generic or official: the feature cache key covers every file read, and every image decodes
under ``task.max_image_pixels``.

The copies come from ``tests/local_copies.py`` (real formats); a layout registered without a writer there fails
here, so a new layout cannot skip these checks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from local_copies import GENERIC, OFFICIAL, write_flowers

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import SPECS, build_from_spec
from tasks.classification.sources import accepted_layouts
from transfer.errors import DataError
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
    """The breaker's case: Flowers-102 from its official files reused features after an image was replaced."""
    written = write_flowers(tmp_path)
    before = _load("flowers102", tmp_path).source_id
    path = tmp_path / "jpg" / f"image_{written['ids']['tstid'][0]:05d}.jpg"
    st = path.stat()
    from PIL import Image
    Image.new("RGB", (40, 40), (1, 2, 3)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: the size still tells
    assert _load("flowers102", tmp_path).source_id != before


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_max_image_pixels_holds_in_every_layout(layout, tmp_path):
    """A 1200 x 1200 image under task.max_image_pixels=10000: the scan refuses it, naming the setting; without the
    scan the item decodes to a TooLarge marker (which the loaders turn into the same error)."""
    name, write = LAYOUTS[layout]
    root = write(tmp_path / "copy", big=True)
    with pytest.raises(DataError, match=r"too large.*1,440,000 pixels.*10,000.*task.max_image_pixels"):
        _load(name, root, max_image_pixels=10_000)
    splits = _load(name, root, max_image_pixels=10_000, scan_images=False)
    items = [splits.train[i][0] for i in range(len(splits.train))] + \
            [splits.val[i][0] for i in range(len(splits.val))]
    assert sum(isinstance(x, TooLarge) for x in items) == 1
    assert _load(name, root, max_image_pixels=BIG_ENOUGH).counts["skipped_images"] == 0


BIG_ENOUGH = 1200 * 1200


def test_a_flowers_copy_without_setid_says_what_the_official_layout_needs(tmp_path):
    write_flowers(tmp_path)
    (tmp_path / "setid.mat").unlink()
    with pytest.raises(DataError) as e:
        _load("flowers102", tmp_path)
    message = str(e.value)
    assert "It holds jpg/, imagelabels.mat of flowers102's official layout but not setid.mat" in message
    assert "1. Flowers-102's official files: DATA_DIR/jpg/image_NNNNN.jpg, DATA_DIR/imagelabels.mat and " \
           "DATA_DIR/setid.mat" in message
    assert "4. an ImageFolder tree" in message
