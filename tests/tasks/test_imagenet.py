"""task=imagenet: the val/<wnid>/ layout, the Hugging Face copy, and an end-to-end run of the classifier."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tasks.imagenet.data import WNIDS, build_imagenet
from transfer.backbones import BACKBONES
from transfer.errors import DataError
from transfer.images import Undecodable
from transfer.run import main as run_main
from transfer.weights import write_safetensors


def write_tree(root, images_per_wnid: dict[str, int], split: str = "val") -> None:
    """An ImageNet-style tree: root/split/<wnid>/ILSVRC2012_val_*.JPEG (real JPEG files)."""
    n = 0
    for wnid, count in images_per_wnid.items():
        folder = root / split / wnid
        folder.mkdir(parents=True)
        for _ in range(count):
            n += 1
            Image.new("RGB", (12, 10), (n % 256, 40, 90)).save(folder / f"ILSVRC2012_val_{n:08d}.JPEG")


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


FAVOURED, RUNNER_UP = 3, 10  # classes the test classifier ranks first and second


@pytest.fixture(scope="module")
def rs50_weights(tmp_path_factory):
    """rs50 weights whose classifier ignores the image: class FAVOURED first, RUNNER_UP second."""
    sd = timm.create_model(BACKBONES.get("rs50").arch).state_dict()
    sd["fc.weight"] = torch.zeros_like(sd["fc.weight"])
    bias = torch.full_like(sd["fc.bias"], -10.0)
    bias[FAVOURED], bias[RUNNER_UP] = 10.0, 5.0
    bias[[900, 901, 902]] = 1.0  # the rest of the top 5: classes without images in the test tree
    sd["fc.bias"] = bias
    root = tmp_path_factory.mktemp("weights")
    write_safetensors(sd, root / "rs50_head.safetensors")
    del sd["fc.weight"], sd["fc.bias"]
    write_safetensors(sd, root / "rs50_headless.safetensors")
    return root


def _run(tmp_path, weights, extra=()):
    return run_main(["task=imagenet", f"task.data_dir={tmp_path / 'data'}", "task.resolution=32",
                     "task.allow_partial=true", "backbone=rs50", f"backbone.weights={weights}",
                     "trainer.precision=32-true", "trainer.num_workers=0", "trainer.eval_batch_size=4",
                     "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
                     *extra])


@pytest.mark.e2e
def test_imagenet_eval_end_to_end(tmp_path, rs50_weights):
    # 3 images of the favoured class (top-1 and top-5 hits), 1 of the runner-up (top-5 hit only),
    # 2 of classes the classifier ranks low (misses): top-1 3/6, top-5 4/6.
    write_tree(tmp_path / "data", {WNIDS[FAVOURED]: 3, WNIDS[RUNNER_UP]: 1, WNIDS[0]: 1, WNIDS[999]: 1})
    assert _run(tmp_path, rs50_weights / "rs50_head.safetensors") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["val/top1"] == pytest.approx(100 * 3 / 6, abs=1e-3)
    assert metrics["val/top5"] == pytest.approx(100 * 4 / 6, abs=1e-3)
    assert metrics["published/top1"] == BACKBONES.get("rs50").top1
    assert results["counts"] == {"images": 6, "classes": 4, "undecodable_images": 0, "images_scored": 6}
    assert results["weights"]["load"]["missing"] == 0 and results["weights"]["load"]["strict"]
    assert results["protocol"] == "eval" and results["extra"]["resolution"] == 32
    assert results["extra"]["data_config"]["crop_pct"] == BACKBONES.get("rs50").crop_pct


def test_imagenet_eval_needs_the_classifier_in_the_weights(tmp_path, rs50_weights, capsys):
    write_tree(tmp_path / "data", {WNIDS[FAVOURED]: 1})
    assert _run(tmp_path, rs50_weights / "rs50_headless.safetensors") == 2
    err = capsys.readouterr().err
    assert "fc.weight" in err and "1000-class ImageNet classifier" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_imagenet_without_data_dir_shows_the_layout(capsys):
    assert run_main(["task=imagenet", "logger.wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err
    assert "task.data_dir" in err and "n01440764" in err


def _truncated_jpeg(path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header parses, the data stops


def test_truncated_jpeg_becomes_an_undecodable_item(tmp_path):
    write_tree(tmp_path, {WNIDS[1]: 1})
    bad = tmp_path / "val" / WNIDS[1] / "ILSVRC2012_val_99999999.JPEG"
    _truncated_jpeg(bad)
    ds, _ = build_imagenet(tmp_path, allow_partial=True)
    items = {path: ds[i][0] for i, (path, _) in enumerate(ds.samples)}
    assert isinstance(items[str(bad)], Undecodable) and items[str(bad)].name == str(bad)
    assert sum(isinstance(v, Undecodable) for v in items.values()) == 1


@pytest.mark.e2e
def test_imagenet_eval_skips_and_counts_a_truncated_jpeg(tmp_path, rs50_weights, capsys):
    write_tree(tmp_path / "data", {WNIDS[FAVOURED]: 3, WNIDS[0]: 1})
    bad = tmp_path / "data" / "val" / WNIDS[FAVOURED] / "ILSVRC2012_val_99999999.JPEG"
    _truncated_jpeg(bad)
    # Default task.max_bad_fraction (0.001): one damaged image of 5 stops the run, naming it.
    assert _run(tmp_path, rs50_weights / "rs50_head.safetensors") == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()
    assert _run(tmp_path, rs50_weights / "rs50_head.safetensors", ["task.max_bad_fraction=0.5"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["counts"]["undecodable_images"] == 1 and results["counts"]["images_scored"] == 4
    assert results["metrics"]["val/top1"] == pytest.approx(100 * 3 / 4, abs=1e-3)  # over the 4 decodable images


@pytest.mark.e2e
def test_imagenet_eval_with_two_processes_scores_each_image_once(tmp_path, rs50_weights):
    # 5 images over 2 processes: DistributedSampler would repeat one (the first, a miss) and score 3/6.
    write_tree(tmp_path / "data", {WNIDS[0]: 1, WNIDS[FAVOURED]: 3, WNIDS[RUNNER_UP]: 1})
    args = ["task=imagenet", f"task.data_dir={tmp_path / 'data'}", "task.resolution=32", "task.allow_partial=true",
            "backbone=rs50", f"backbone.weights={rs50_weights / 'rs50_head.safetensors'}", "trainer.precision=32-true",
            "trainer.num_workers=0", "trainer.eval_batch_size=2", "trainer.devices=2", "trainer.accelerator=cpu",
            "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["counts"]["images_scored"] == 5
    assert results["metrics"]["val/top1"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert results["metrics"]["val/top5"] == pytest.approx(100 * 4 / 5, abs=1e-3)
