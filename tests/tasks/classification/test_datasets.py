"""Registered data sets read from every accepted layout; unreadable images are skipped and counted."""
from __future__ import annotations

import dataclasses
import socket
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS, SPECS, limit
from transfer.errors import DataError
from transfer.image_sources import ArrayImages, labels_of

# Mirrors conftest.py: 3 classes, 6 train and 3 test images per class, one corrupt train image.
CLASSES = ["apple", "bear", "cloud"]
PER_CLASS = {"train": 6, "test": 3}
N_TRAIN, N_TEST = PER_CLASS["train"] * len(CLASSES), PER_CLASS["test"] * len(CLASSES)


def config(data_dir, **kw) -> ClassificationTaskConfig:
    # The tiny copies have other split sizes than CIFAR-100's published 50,000 / 10,000.
    return ClassificationTaskConfig(name="cifar100", dataset="cifar100", data_dir=str(data_dir),
                                    max_bad_fraction=0.2, **{"check_split_sizes": False, **kw})


@pytest.mark.parametrize("layout", ["saved_to_disk", "parquet_files", "image_folder"])
def test_each_layout_gives_fixed_splits_and_counts_the_corrupt_image(layout, request, facts):
    assert facts == (CLASSES, PER_CLASS)
    root = request.getfixturevalue(layout)
    splits = DATASETS.get("cifar100")(config(root))
    assert splits.num_classes == len(CLASSES) and splits.class_names == CLASSES
    assert splits.counts["skipped_images"] == 1
    assert splits.val_held_out  # these copies have no validation split
    assert len(splits.train) + len(splits.val) == N_TRAIN and len(splits.test) == N_TEST
    assert len(splits.val) == round(0.2 * N_TRAIN)
    image, label = splits.train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and 0 <= label < len(CLASSES)
    again = DATASETS.get("cifar100")(config(root))
    assert splits.val.indices == again.val.indices  # the held-out part is the same on every run
    assert not set(splits.val.indices) & set(splits.train.indices)


def test_hf_copy_uses_the_fine_label(saved_to_disk):
    splits = DATASETS.get("cifar100")(config(saved_to_disk))
    labels = sorted(splits.test[i][1] for i in range(len(splits.test)))
    assert labels == sorted(list(range(len(CLASSES))) * PER_CLASS["test"])  # coarse labels would be 0/1 only


def test_too_many_unreadable_images_stop_the_run(image_folder):
    with pytest.raises(DataError, match="unreadable") as err:
        DATASETS.get("cifar100")(dataclasses.replace(config(image_folder), max_bad_fraction=0.001))
    assert "broken.jpg" in str(err.value) and "max_bad_fraction" in str(err.value)


def test_a_validation_split_is_used_when_present(image_folder):
    (image_folder / "train" / CLASSES[1] / "broken.jpg").unlink()
    (image_folder / "val").mkdir()
    (image_folder / "train" / CLASSES[0]).rename(image_folder / "val" / CLASSES[0])
    (image_folder / "train" / CLASSES[0]).mkdir()  # every class keeps a (here empty) train folder
    splits = DATASETS.get("cifar100")(config(image_folder))
    assert not splits.val_held_out and len(splits.val) == PER_CLASS["train"]
    assert {splits.val[i][1] for i in range(len(splits.val))} == {0}


def test_unknown_layout_lists_the_accepted_ones(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DataError) as err:
        DATASETS.get("cifar100")(config(tmp_path))
    assert "save_to_disk" in str(err.value) and "parquet" in str(err.value) and "ImageFolder" in str(err.value)


HUB_ID = "no-such-owner/no-such-set-xyz"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub endpoint is a local port nothing listens on, and the Hub cache an empty folder.

    ``datasets`` and ``huggingface_hub`` read HF_HUB_OFFLINE / HF_ENDPOINT / HF_HUB_CACHE once, at their import,
    so the test sets the values they read at call time instead of the environment (which would do nothing once
    an earlier test imported them)."""
    import datasets
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return port


def hub_config() -> ClassificationTaskConfig:
    return ClassificationTaskConfig(name="cifar100", dataset="cifar100", hub_id=HUB_ID)


def test_unreachable_hub_fails_at_once_naming_the_id_and_the_layouts(unreachable_hub, monkeypatch):
    import datasets

    # Before the Hub client is asked (it retries five times with back-off, ~23 s, before its own error).
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub client was asked"))
    with pytest.raises(DataError) as err:
        DATASETS.get("cifar100")(hub_config())
    text = str(err.value)
    assert HUB_ID in text and f"cannot reach 127.0.0.1:{unreachable_hub}" in text
    assert "task.data_dir" in text and "HF_HUB_OFFLINE=1" in text and "ImageFolder" in text


def test_offline_mode_names_the_id_and_the_layouts(unreachable_hub, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(DataError) as err:
        DATASETS.get("cifar100")(hub_config())  # the real datasets.load_dataset: no copy in its cache
    text = str(err.value)
    assert HUB_ID in text and "task.data_dir" in text and "ImageFolder" in text


def assert_datasets_is_asked(monkeypatch) -> None:
    """The loader hands HUB_ID to ``datasets.load_dataset`` (a stand-in here, with no copy) instead of refusing it
    before: the stand-in's own error reaches the DataError."""
    import datasets

    asked = []

    def load_dataset(path, *a, **k):
        asked.append(path)
        raise ConnectionError("no usable copy")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match="no usable copy"):
        DATASETS.get("cifar100")(hub_config())
    assert asked == [HUB_ID]


def test_a_data_set_in_the_hub_cache_goes_to_datasets_with_the_hub_unreachable(unreachable_hub, tmp_path,
                                                                               monkeypatch):
    """``datasets`` falls back to its cached copy when the Hub is unreachable: the quick refusal must not
    stand in its way for a data set loaded before (its card is in the Hub cache)."""
    snapshot = tmp_path / "hub" / f"datasets--{HUB_ID.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snapshot / "snapshots" / ("0" * 40) / "README.md").write_text("---\n---\n")
    assert_datasets_is_asked(monkeypatch)


def test_data_set_without_a_hub_copy_asks_for_data_dir():
    with pytest.raises(DataError, match="task.data_dir"):
        DATASETS.get("birdsnap")(ClassificationTaskConfig(name="birdsnap", dataset="birdsnap"))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_registered_data_set_has_a_recipe_with_a_paper_metric(name):
    from transfer.config import compose, validate

    cfg = validate(compose([f"task={name}", "logger.wandb.mode=disabled"]))
    assert cfg.task.dataset == name
    expected = "mean_per_class" if name in {"oxford_pets", "flowers102", "caltech101", "fgvc_aircraft"} else "top1"
    assert cfg.task.metric == expected


def test_an_image_above_the_size_limit_is_too_large_not_unreadable(image_folder):
    big = image_folder / "test" / CLASSES[0] / "big.png"
    Image.new("RGB", (40, 30)).save(big)
    with pytest.raises(DataError) as err:
        DATASETS.get("cifar100")(config(image_folder, max_image_pixels=1000))
    text = str(err.value)
    assert str(big) in text and "too large" in text and "not damaged" in text and "task.max_image_pixels" in text


def test_limit_per_split_is_a_seeded_sample_stratified_by_class():
    """On class-sorted data (as many copies are) the first N items would hold one or two classes."""
    labels = np.repeat(np.arange(5), [40, 40, 40, 40, 20])  # sorted by class; class 4 half as large
    ds = ArrayImages(np.zeros((len(labels), 2, 2), dtype=np.uint8), labels)
    kept = limit(ds, 18, seed=0)
    assert len(kept) == 18
    assert Counter(labels_of(kept).tolist()) == {0: 4, 1: 4, 2: 4, 3: 4, 4: 2}  # 18 x 40/180 = 4, 18 x 20/180 = 2
    assert kept.indices == sorted(kept.indices)  # the split's order is kept
    assert limit(ds, 18, seed=0).indices == kept.indices  # seeded: the same images again
    assert limit(ds, 18, seed=1).indices != kept.indices
    odd = Counter(labels_of(limit(ds, 7, seed=3)).tolist())  # shares 1.56 x 4 and 0.78: rounded to add up to 7
    assert sum(odd.values()) == 7 and all(v in (1, 2) for v in odd.values()) and odd[4] == 1
    assert limit(ds, None) is ds and limit(ds, 500) is ds


def test_limit_per_split_through_a_local_copy(image_folder):
    full = DATASETS.get("cifar100")(config(image_folder))
    cut = DATASETS.get("cifar100")(config(image_folder, limit_per_split=4))
    for split in ("train", "test"):
        every = Counter(labels_of(getattr(full, split)).tolist())
        some = Counter(labels_of(getattr(cut, split)).tolist())
        assert sum(some.values()) == min(4, sum(every.values()))
        assert len(some) == min(4, len(every)), (split, some, every)  # spread over the classes, not the first ones
    assert any("stratified sample of 4" in r for r in cut.not_comparable)


def test_damage_check_warns_once_per_new_count_naming_the_files(image_folder, caplog):
    # The scan skipped broken.jpg (reported when the data set was read): checking split after split with no
    # decode failure repeats nothing; a failure at decode time warns once, naming it and the skipped file.
    from types import SimpleNamespace

    from tasks.classification.task import _damage_check

    splits = DATASETS.get("cifar100")(config(image_folder))
    assert splits.skipped_examples and splits.skipped_examples[0].endswith("broken.jpg")
    ctx = SimpleNamespace(cfg=SimpleNamespace(task=config(image_folder)))
    check = _damage_check(ctx, splits)
    caplog.clear()  # the loader's own warning names broken.jpg
    with caplog.at_level("WARNING"):
        for _ in range(3):
            check(set())
        assert not [r for r in caplog.records if "skipped" in r.getMessage()]
        check({"train/a/late.png"})
        check({"train/a/late.png"})
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 2 unreadable or undecodable image(s)" in warning
    assert "late.png" in warning and "broken.jpg" in warning and "[]" not in warning


def test_a_data_set_in_the_datasets_cache_goes_to_datasets_with_the_hub_unreachable(unreachable_hub, tmp_path,
                                                                                    monkeypatch):
    """A copy ``datasets`` prepared before (``<owner>___<name>`` in its cache) with no card in the Hub cache (that
    cache cleaned, or HF_HUB_CACHE pointing elsewhere): ``datasets`` falls back to it, so it is asked, not refused."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    (tmp_path / "datasets" / HUB_ID.replace("/", "___") / "default" / "0.0.0").mkdir(parents=True)
    assert_datasets_is_asked(monkeypatch)
