"""Published split sizes are checked on every load; Flowers-102 is read from its official split files.

Flowers-102 is written here in its official layout (``jpg/image_NNNNN.jpg``, ``imagelabels.mat``, ``setid.mat``
with the ``trnid`` / ``valid`` / ``tstid`` index arrays, saved by scipy as MATLAB files) but tiny: 3 classes,
2 + 2 + 3..5 images per class instead of 10 + 10 + at least 20 of 102 classes. The published sizes are data on
the data set's spec (``DatasetSpec.sizes``), so the loading tests swap in the tiny copy's own sizes with
``dataclasses.replace`` rather than write 8,189 JPEGs; the full 1,020 / 1,020 / 6,149 are checked by the same
function on counts, and the real spec is shown to refuse the tiny copy with the published numbers in the error.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from local_copies import TINY, write_flowers

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS, SPECS, build_from_spec
from tasks.classification.official import OFFICIAL_LAYOUTS
from tasks.classification.splits import (
    PUBLISHED_SPLITS,
    FoundSizes,
    SplitSizes,
    check_split_sizes,
    size_differences,
)
from transfer.errors import DataError
from transfer.run import main as run_main

# BYOL (arXiv 2006.07733) App. D.1, Table 10: original train (or official train), official val, test.
PUBLISHED = {
    "food101": (75_750, None, 25_250), "cifar10": (50_000, None, 10_000), "cifar100": (50_000, None, 10_000),
    "birdsnap": (47_386, None, 2_443), "sun397": (19_850, None, 19_850), "stanford_cars": (8_144, None, 8_041),
    "fgvc_aircraft": (3_334, 3_333, 3_333), "dtd": (1_880, 1_880, 1_880), "oxford_pets": (3_680, None, 3_669),
    "caltech101": (3_060, None, 6_084), "flowers102": (1_020, 1_020, 6_149),
}


def flowers102_official(root):
    """The official Flowers-102 reader on ``root`` (the release folder or torchvision's root holding it)."""
    layout = OFFICIAL_LAYOUTS["flowers102"]
    where = layout.find(root)
    assert where is not None, f"no Flowers-102 layout in {root}"
    return layout.read(where)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_transfer_set_carries_its_published_sizes(name):
    train, val, test = PUBLISHED[name]
    sizes = SPECS[name].sizes
    assert (sizes.train, sizes.val, sizes.test) == (train, val, test) and sizes.source
    exact = FoundSizes(train=train, val=val, test=test)
    assert size_differences(sizes, exact) == []
    one_short = dataclasses.replace(exact, test=test - 1)
    assert size_differences(sizes, one_short) == [f"test {test - 1:,} (published {test:,})"]
    if val is None:  # a copy with its own val split must make up the published training set with it
        assert size_differences(sizes, FoundSizes(train=train - 100, val=100, test=test)) == []
    else:
        assert size_differences(sizes, FoundSizes(train=train + val, test=test)) == \
            [f"train {train + val:,} (published {train:,})", f"val none (published {val:,})"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_copy_with_other_sizes_stops_the_run_naming_both_and_the_opt_out(name, image_folder):
    cfg = ClassificationTaskConfig(name=name, dataset=name, data_dir=str(image_folder), max_bad_fraction=0.2)
    with pytest.raises(DataError) as err:
        DATASETS.get(name)(cfg)
    message = str(err.value)
    train, _, test = PUBLISHED[name]
    # 18 readable + 1 unreadable train images: the check counts the copy, skipped images included.
    assert f"train 19 (published {train:,})" in message and f"test 9 (published {test:,})" in message
    assert "task.check_split_sizes=false" in message and "BYOL (arXiv 2006.07733)" in message
    splits = DATASETS.get(name)(dataclasses.replace(cfg, check_split_sizes=False))
    assert len(splits.not_comparable) == 1 and "task.check_split_sizes=false" in splits.not_comparable[0]
    assert f"train 19 (published {train:,})" in splits.not_comparable[0]


def test_caltech101_needs_30_training_images_in_every_class():
    sizes = SPECS["caltech101"].sizes
    assert sizes.train_per_class == 30 and sizes.train == 30 * 102
    exact = FoundSizes(train=3_060, test=6_084, per_class=(30, 30))
    assert size_differences(sizes, exact) == []
    uneven = dataclasses.replace(exact, per_class=(25, 35))  # the right total, drawn unevenly
    assert size_differences(sizes, uneven) == ["25-35 training images per class (published 30)"]
    # One unreadable training image: its class may be one short, no more.
    assert size_differences(sizes, dataclasses.replace(exact, per_class=(29, 30), train_skipped=1)) == []
    assert size_differences(sizes, dataclasses.replace(exact, per_class=(28, 30), train_skipped=1)) != []


def test_the_flowers_hub_copy_used_before_is_refused_on_counts():
    # nelorth/oxford-flowers: 7,169 train (official test images among them), 1,020 test, no val.
    with pytest.raises(DataError) as err:
        check_split_sizes("flowers102", PUBLISHED_SPLITS["flowers102"], FoundSizes(train=7_169, test=1_020),
                          origin="hub:nelorth/oxford-flowers", enforce=True)
    assert str(err.value).count("published") >= 3
    for part in ("train 7,169 (published 1,020)", "val none (published 1,020)", "test 1,020 (published 6,149)"):
        assert part in str(err.value)
    assert check_split_sizes("flowers102", PUBLISHED_SPLITS["flowers102"],
                             FoundSizes(train=1_020, val=1_020, test=6_149), origin="x", enforce=True) == []


def test_limit_per_split_marks_the_splits_not_comparable():
    splits = DATASETS.get("digits")(ClassificationTaskConfig(name="digits", dataset="digits", limit_per_split=30))
    assert len(splits.test) == 30 and splits.not_comparable == [
        "task.limit_per_split=30: a stratified sample of 30 images of each split (seed task.split_seed=0) is used"]
    assert DATASETS.get("digits")(ClassificationTaskConfig(name="digits", dataset="digits")).not_comparable == []


@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_official_flowers_files_give_the_official_splits(tmp_path, torchvision_layout):
    written = write_flowers(tmp_path, torchvision_layout=torchvision_layout)
    source = flowers102_official(tmp_path)
    for ours, key in (("train", "trnid"), ("validation", "valid"), ("test", "tstid")):
        split = source.splits[ours]
        ids = written["ids"][key]
        assert [p.rsplit("/", 1)[1] for p in split.dataset.paths] == [f"image_{i:05d}.jpg" for i in ids]
        assert split.labels.tolist() == [int(written["labels"][i - 1]) - 1 for i in ids]
        assert split.skipped == 0
    assert len(source.class_names) == 102 and source.class_names[0] == "pink primrose"
    image, label = source.splits["test"].dataset[0]
    assert image.size == (12, 12) and label == source.splits["test"].labels[0]


def test_flowers_from_its_files_loads_train_val_test_as_published(tmp_path):
    write_flowers(tmp_path)
    cfg = ClassificationTaskConfig(name="flowers102", dataset="flowers102", data_dir=str(tmp_path))
    n_test = sum(TINY["test"])
    scaled = dataclasses.replace(SPECS["flowers102"], sizes=SplitSizes(train=6, val=6, test=n_test))
    splits = build_from_spec(scaled, cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, n_test)
    assert not splits.val_held_out and splits.not_comparable == [] and splits.counts["skipped_images"] == 0
    # The real spec expects the full published sizes: the tiny copy is refused, naming them.
    with pytest.raises(DataError, match=r"train 6 \(published 1,020\); val 6 \(published 1,020\); test 12 "
                                        r"\(published 6,149\)"):
        DATASETS.get("flowers102")(cfg)


def test_an_unreadable_flowers_image_is_skipped_counted_and_still_counts_for_the_split_size(tmp_path):
    written = write_flowers(tmp_path)
    (tmp_path / "jpg" / f"image_{written['ids']['tstid'][0]:05d}.jpg").write_bytes(b"not a jpeg")
    cfg = ClassificationTaskConfig(name="flowers102", dataset="flowers102", data_dir=str(tmp_path),
                                   max_bad_fraction=0.2)
    scaled = dataclasses.replace(SPECS["flowers102"], sizes=SplitSizes(train=6, val=6, test=12))
    splits = build_from_spec(scaled, cfg)
    assert len(splits.test) == 11 and splits.counts["skipped_images"] == 1 and splits.not_comparable == []


def test_a_damaged_split_file_is_a_clear_error(tmp_path):
    write_flowers(tmp_path)
    (tmp_path / "setid.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match="setid.mat"):
        flowers102_official(tmp_path)


def test_a_run_on_a_copy_with_other_sizes_fails_or_is_marked_not_comparable(tmp_path, capsys):
    write_flowers(tmp_path / "flowers")
    common = ["task=flowers102", f"task.data_dir={tmp_path / 'flowers'}", "protocol=knn", "protocol.k=3",
              "backbone=rs50", "backbone.weights=random", "task.resolution=32", "trainer.num_workers=0",
              "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"run.cache_dir={tmp_path / 'cache'}"]
    assert run_main([*common, f"run.dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train 6 (published 1,020)" in err and "task.check_split_sizes=false" in err
    assert not (tmp_path / "refused" / "results.json").exists()
    assert run_main([*common, "task.check_split_sizes=false", f"run.dir={tmp_path / 'run'}"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["counts"]["images_test"] == 12 and results["comparable"] is False
    assert any(r.startswith("task.check_split_sizes=false: flowers102 copy") for r in results["comparison"]["reasons"])
    assert not any(b["comparable"] for b in results["baselines"])
