"""task=imagenet: end-to-end runs of the classifier, and the errors a run stops with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from imagenet_copies import truncated_jpeg, write_tree

from tasks.imagenet.data import WNIDS
from transfer.backbones import BACKBONES
from transfer.run import main as run_main
from transfer.weights import write_safetensors

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


@pytest.mark.e2e
def test_imagenet_eval_skips_and_counts_a_truncated_jpeg(tmp_path, rs50_weights, capsys):
    write_tree(tmp_path / "data", {WNIDS[FAVOURED]: 3, WNIDS[0]: 1})
    bad = tmp_path / "data" / "val" / WNIDS[FAVOURED] / "ILSVRC2012_val_99999999.JPEG"
    truncated_jpeg(bad)
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
                          timeout=900, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["counts"]["images_scored"] == 5
    assert results["metrics"]["val/top1"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert results["metrics"]["val/top5"] == pytest.approx(100 * 4 / 5, abs=1e-3)
