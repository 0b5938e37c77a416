"""The feature cache key covers every value that determines what is read and with which weights: flipping any
task value that can change the images or labels read (image column, label column, limits, split choice, the
size limit …) re-extracts, and so does a partial load whose random tensors depend on trainer.seed."""
from __future__ import annotations

import dataclasses
import json
import typing

import datasets
import numpy as np
import pytest
import torch
from local_copies import CLASSES, image, png_bytes
from tiny_networks import TINY_RS, register_tiny_entries

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS
from tasks.classification.task import NOT_IN_FEATURE_KEY, eval_transform, feature_key
from tasks.classification.task import _weights_id as weights_id
from tests.tasks.classification.test_features import COMMON, run
from transfer.backbones import build_backbone
from transfer.config import compose, validate
from transfer.tasks import RunContext

# Values the config checks constrain: a valid different one.
VALID_OTHER = {"metric": "mean_per_class", "preprocess": "checkpoint", "resolution": 64, "max_bad_fraction": 0.5}


def _other(name: str, value, annotation: str):
    """A valid value of the field's type that differs from ``value``."""
    if name in VALID_OTHER:
        return VALID_OTHER[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if "int" in annotation and "str" not in annotation:
        return 7
    return f"{value}_other" if value else "other"


def test_every_task_value_that_can_change_what_is_read_is_in_the_key(tmp_path, saved_to_disk, monkeypatch):
    cfg = validate(compose(["task=cifar100", f"task.data_dir={saved_to_disk}", "protocol=linear", *COMMON]))
    splits = DATASETS.get("cifar100")(cfg.task)
    register_tiny_entries(monkeypatch)  # after the compose: the config recipes never see the test entries
    backbone = build_backbone(TINY_RS.name, weights="random")  # a ResNet-RS at one block per stage: its key parts

    def key(task) -> str:
        ctx = RunContext(cfg=dataclasses.replace(cfg, task=task), run_dir=tmp_path / "r", logger=None)
        return json.dumps(feature_key(ctx, backbone, splits, "test", transform=eval_transform(backbone, 32),
                                      resolution=32, preprocess="paper", dtype=None), sort_keys=True)

    base = key(cfg.task)
    hints = typing.get_type_hints(ClassificationTaskConfig)
    flipped = []
    for f in dataclasses.fields(ClassificationTaskConfig):
        if f.name in NOT_IN_FEATURE_KEY:
            continue
        value = _other(f.name, getattr(cfg.task, f.name), str(hints[f.name]))
        changed = dataclasses.replace(cfg.task, **{f.name: value})
        assert key(changed) != base, f"task.{f.name} is not in the feature cache key"
        flipped.append(f.name)
    assert {"image_column", "label_column", "limit_per_split", "max_image_pixels", "scan_images", "data_dir",
            "hub_id", "val_fraction", "split_seed"} <= set(flipped)
    # The values left out cannot change the features or labels: the key stays the same.
    for name in NOT_IN_FEATURE_KEY:
        same = dataclasses.replace(cfg.task, **{name: _other(name, getattr(cfg.task, name), str(hints[name]))})
        assert key(same) == base


def _two_image_columns(split: str, n: int, offset: int):
    """cifar10-style rows with two image columns: ``img`` shows the class, ``img_noise`` another class."""
    features = datasets.Features({"img": datasets.Image(), "img_noise": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    rows = {"img": [], "img_noise": [], "label": []}
    for label in range(len(CLASSES)):
        for i in range(n):
            rows["img"].append({"bytes": png_bytes(image(label, i + offset)), "path": None})
            rows["img_noise"].append({"bytes": png_bytes(image((label + i) % 3, i + offset + 500)), "path": None})
            rows["label"].append(label)
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.e2e
def test_image_column_change_re_extracts_and_scores_right(tmp_path):
    # HubRows names a row split[i], whatever column it reads: probing the copy's second image column after the
    # first must not read the first column's cached features.
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    _two_image_columns("train", 6, 0).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    _two_image_columns("test", 4, 1000).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    task = ["task=cifar10", f"task.data_dir={root}", "protocol=knn", "protocol.k=3"]
    run(tmp_path, "img", *task, "task.image_column=img")
    noise = run(tmp_path, "noise", *task, "task.image_column=img_noise")
    fresh = run(tmp_path, "fresh", *task, "task.image_column=img_noise", "protocol.cache=false")
    assert noise["counts"]["feature_cache_hits"] == 0
    assert noise["metrics"] == fresh["metrics"]


@pytest.mark.e2e
def test_a_cached_run_does_not_let_an_image_above_the_limit_in(tmp_path, image_folder, capsys):
    # A run that accepted a large image under a raised task.max_image_pixels; the next run, with the default
    # (here: a lower) limit and no header scan, must not be served from that run's cache.
    from PIL import Image

    from transfer.run import main as run_main

    big = image_folder / "test" / CLASSES[0] / "big.png"
    Image.fromarray(np.full((60, 60, 3), 200, np.uint8)).save(big)  # 3,600 pixels; the others are 144
    task = ["task=oxford_pets", f"task.data_dir={image_folder}", "protocol=knn", "protocol.k=3"]
    run(tmp_path, "raised", *task, "task.max_image_pixels=10000")
    code = run_main([*COMMON, *task, "task.max_image_pixels=1000", "task.scan_images=false",
                     f"run.dir={tmp_path / 'lowered'}", f"run.cache_dir={tmp_path / 'cache'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "big.png is too large" in err and "the limit is 1,000 pixels" in err


def test_a_partial_load_keys_on_the_seed_and_what_was_loaded(tmp_path, saved_to_disk, monkeypatch):
    # backbone.strict=false with half the tensors in the file: the other half is random, drawn from trainer.seed.
    # On a ResNet-RS at one block per stage (tests/tiny_networks.py): the key's logic, not rs50's size, is tested.
    cfg0 = validate(compose(["task=cifar100", f"task.data_dir={saved_to_disk}", "protocol=linear", *COMMON]))
    register_tiny_entries(monkeypatch)  # after the compose: the config recipes never see the test entries
    full = build_backbone(TINY_RS.name, weights="random").model.state_dict()
    keys = list(full)
    half = tmp_path / "half.pth"
    torch.save({k: full[k] for k in keys[: len(keys) // 2]}, half)
    whole = tmp_path / "whole.pth"
    torch.save(full, whole)

    def wid(path, seed: int) -> dict:
        torch.manual_seed(seed)
        backbone = build_backbone(TINY_RS.name, weights=str(path), strict=False, min_loaded_fraction=0.1)
        cfg = dataclasses.replace(cfg0, trainer=dataclasses.replace(cfg0.trainer, seed=seed))
        return json.loads(weights_id(RunContext(cfg=cfg, run_dir=tmp_path, logger=None), backbone))

    a, b = wid(half, 0), wid(half, 1)
    assert a["sha256"] == b["sha256"] and a["load"]["missing"] > 0
    assert (a["seed"], b["seed"]) == (0, 1) and a["tensors"] != b["tensors"]  # features would differ: no reuse
    assert wid(half, 0) == a  # the same seed: the cache is used
    c, d = wid(whole, 0), wid(whole, 1)
    assert c == d and "seed" not in c and c["load"]["missing"] == 0  # a full load does not depend on the seed
    r = json.loads(weights_id(RunContext(cfg=cfg0, run_dir=tmp_path, logger=None),
                              build_backbone(TINY_RS.name, weights="random")))
    assert r["source"] == "random" and r["seed"] == cfg0.trainer.seed and "tensors" in r
