"""Local copies in their official release layouts (``tests/official_copies.py`` writes them,
tiny, in the real file formats) are read with their official splits and labels, scanned and counted like every
other layout, keyed for the feature cache by their files, and run through ``python -m transfer.run``.

The published split sizes are a field of each data set's spec; the tiny copies swap in their own sizes with the
same fields (as ``test_splits.py`` does), and the real spec refuses them naming the published numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from official_copies import CALTECH, WRITERS, Written, cifar_pixels, write_cars, write_cifar10, write_dtd

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS, SPECS, build_from_spec
from tasks.classification.official import OFFICIAL_LAYOUTS
from transfer.errors import DataError
from transfer.image_sources import FileImages, item_ids, with_local_identity
from transfer.run import main as run_main

LAYOUTS = sorted(WRITERS)


def _cfg(name: str, data_dir: Path, **kw) -> ClassificationTaskConfig:
    return ClassificationTaskConfig(name=name, dataset=name, data_dir=str(data_dir), **kw)


def _read(name: str, written: Written, **kw):
    layout = OFFICIAL_LAYOUTS[name]
    where = layout.find(written.data_dir)
    assert where is not None, f"{name}: layout not found in {written.data_dir}"
    return with_local_identity(layout.read(where, **kw), written.data_dir)  # as datasets.build_from_spec does


def _items(split) -> list[tuple[str, str]]:
    """(image name, item id) of a source split: the file name for files, ``batch[i]`` for CIFAR arrays."""
    ids = item_ids(split.dataset)
    return [Path(i).name if isinstance(split.dataset, FileImages) else str(i) for i in ids]


def test_every_data_set_with_a_release_layout_has_a_reader_and_a_tiny_copy():
    assert set(OFFICIAL_LAYOUTS) == set(WRITERS) == set(SPECS) - {"birdsnap"}  # Birdsnap ships only URLs
    for name in WRITERS:
        assert SPECS[name].official is OFFICIAL_LAYOUTS[name] and SPECS[name].sizes is not None


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "caltech101"])
def test_official_splits_and_labels(name, tmp_path):
    written = WRITERS[name](tmp_path)
    source = _read(name, written)
    assert sorted(source.splits) == sorted(written.expected)
    for split, expected in written.expected.items():
        got = source.splits[split]
        pairs = sorted(zip(_items(got), [source.class_names[i] for i in got.labels]))
        assert pairs == expected, split
        assert got.skipped == 0
    assert source.identity and "official" in source.origin


def test_caltech101_draws_30_training_images_per_class_seeded_and_keeps_the_background_class(tmp_path):
    written = WRITERS["caltech101"](tmp_path)
    source = _read("caltech101", written, seed=0)
    assert source.class_names == sorted(CALTECH)  # BACKGROUND_Google is a class, as in the 3,060 = 30 x 102 protocol
    train, test = source.splits["train"], source.splits["test"]
    assert Counter(train.labels.tolist()) == {i: 30 for i in range(len(CALTECH))}
    assert Counter(test.labels.tolist()) == {i: n - 30 for i, n in enumerate(CALTECH.values())}
    every = sorted((str(p), source.class_names[lab])
                   for s in (train, test) for p, lab in zip(s.dataset.paths, s.labels))
    assert every == sorted((str(f), f.parent.name) for f in written.files)
    again = _read("caltech101", written, seed=0).splits["train"].dataset.paths
    other = _read("caltech101", written, seed=1).splits["train"].dataset.paths
    assert again == train.dataset.paths and other != train.dataset.paths


def test_cifar_arrays_are_the_written_pixels(tmp_path):
    written = write_cifar10(tmp_path)
    source = _read("cifar10", written)
    image, label = source.splits["test"].dataset[2]
    pixels = cifar_pixels(6, 5)[2].reshape(3, 32, 32).transpose(1, 2, 0)  # test_batch was written with seed 5
    assert np.array_equal(np.asarray(image), pixels) and label == (5 * 3 + 2) % 10
    assert source.class_names[0] == "airplane" and len(source.class_names) == 10


def test_a_cifar_batch_that_would_run_code_is_refused_and_never_runs(tmp_path):
    written = write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3.*refused to load posix.system"):
        _read("cifar10", written)
    assert not marker.exists()


@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("cifar")])
def test_an_unreadable_or_missing_image_is_skipped_and_counted(name, tmp_path):
    written = WRITERS[name](tmp_path)
    listed = {n for pairs in written.expected.values() for n, _ in pairs}
    damaged, gone = [f for f in written.files if f.name in listed or name == "caltech101"][::3][:2]
    damaged.write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a JPEG header and nothing else
    gone.unlink()  # listed by the split files, gone from disk (Caltech-101 lists folders: it is just not there)
    source = _read(name, written)
    skipped = [e for s in source.splits.values() for e in s.skipped_examples]
    if name == "caltech101":
        assert skipped == [str(damaged)] and sum(s.skipped for s in source.splits.values()) == 1
    else:
        assert sorted(skipped) == sorted([str(damaged), str(gone)])
        assert sum(s.skipped for s in source.splits.values()) == 2


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_data_identity_changes_with_the_split_files(name, tmp_path):
    written = WRITERS[name](tmp_path)
    assert written.lists or name == "caltech101"  # Caltech-101 has no split file: its folders are the list
    listed = {n for pairs in written.expected.values() for n, _ in pairs}
    images = [f for f in written.files if f.name in listed or name == "caltech101"]
    for changed in [*written.lists, *images[:1]]:
        before = _read(name, written, scan=False).identity
        assert _read(name, written, scan=False).identity == before
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced by a copy: a new time
        assert _read(name, written, scan=False).identity != before, changed


def test_torchvision_download_folders_and_the_released_folder_itself_are_both_accepted(tmp_path):
    cifar = write_cifar10(tmp_path / "tv")  # torchvision root holding cifar-10-batches-py/
    assert OFFICIAL_LAYOUTS["cifar10"].find(cifar.data_dir) == cifar.data_dir / "cifar-10-batches-py"
    assert OFFICIAL_LAYOUTS["cifar10"].find(cifar.data_dir / "cifar-10-batches-py") is not None
    tv = write_dtd(tmp_path / "dtd_tv", torchvision_layout=True)  # torchvision: root/dtd/dtd/
    assert OFFICIAL_LAYOUTS["dtd"].find(tv.data_dir) == tv.data_dir / "dtd" / "dtd"
    release = write_dtd(tmp_path / "dtd_release")  # the tarball: dtd/images, dtd/labels
    assert OFFICIAL_LAYOUTS["dtd"].find(release.data_dir / "dtd") == release.data_dir / "dtd"
    cars = write_cars(tmp_path / "cars", test_annos_in_devkit=True)
    assert sorted(_read("stanford_cars", cars).splits) == ["test", "train"]


def test_an_unknown_layout_lists_every_accepted_one(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        DATASETS.get("cifar100")(_cfg("cifar100", tmp_path / "stuff"))
    message = str(err.value)
    for part in ("cifar-100-python/ with train, test, meta", "save_to_disk", "parquet", "ImageFolder",
                 "found: ['notes.txt']"):
        assert part in message
    assert "\n  1. the official python version" in message and "\n  4. an ImageFolder tree" in message


def test_another_data_sets_release_is_named(tmp_path):
    written = write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"official layout of cifar10: did you mean task=cifar10\?"):
        DATASETS.get("cifar100")(_cfg("cifar100", written.data_dir))


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_real_spec_refuses_the_tiny_copy_naming_the_published_sizes(name, tmp_path):
    written = WRITERS[name](tmp_path)
    published = SPECS[name].sizes
    with pytest.raises(DataError, match=rf"published {published.test:,}\)") as err:
        DATASETS.get(name)(_cfg(name, written.data_dir, scan_images=False))
    assert "task.check_split_sizes=false" in str(err.value)


@pytest.mark.e2e
@pytest.mark.parametrize("name", LAYOUTS)
def test_linear_probe_through_the_command_line(name, tmp_path, monkeypatch, capsys):
    written = WRITERS[name](tmp_path / "data")
    sizes = written.sizes
    published = SPECS[name].sizes
    # The tiny copy's sizes have the shape of the published ones: the same splits given, the same per-class rule.
    assert (sizes.val is None) == (published.val is None)
    assert (sizes.train_per_class is None) == (published.train_per_class is None)
    scaled = dataclasses.replace(SPECS[name], sizes=dataclasses.replace(published, train=sizes.train, val=sizes.val,
                                                                        test=sizes.test))
    monkeypatch.setitem(DATASETS._items, name, functools.partial(build_from_spec, scaled))
    run_dir = tmp_path / "run"
    code = run_main([f"task={name}", f"task.data_dir={written.data_dir}", "backbone=rs50", "backbone.weights=random",
                     "protocol=linear", "protocol.l2_steps=4", "protocol.extend_decades=0", "protocol.max_iter=30",
                     "task.resolution=32", "trainer.num_workers=0", "trainer.progress_bar=false",
                     "logger.wandb.mode=disabled", f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run_dir / "results.json").read_text())
    counts = results["counts"]
    if sizes.val is None:  # no official val: task.val_fraction of train held out, the final fit on all of it
        assert counts["images_train"] + counts["images_val"] == sizes.train
        assert counts["images_val"] == round(0.2 * sizes.train)
    else:
        assert (counts["images_train"], counts["images_val"]) == (sizes.train, sizes.val)
    assert counts["images_test"] == counts["images_test_scored"] == sizes.test
    assert counts["skipped_images"] == 0 and counts["undecodable_images"] == 0
    assert 0 <= results["metrics"][results["primary_metric"]] <= 100
    reasons = results["comparison"]["reasons"]
    # Random weights make the run not comparable; the split sizes do not (they match the scaled published ones).
    assert any("backbone.weights=random" in r for r in reasons)
    assert not any("split" in r for r in reasons), reasons
