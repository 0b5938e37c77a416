"""``python -m transfer.run`` with the classification adapter on tiny data written in the real formats."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from transfer.run import main as run_main

# The tiny copies have none of the published split sizes: task.check_split_sizes=false runs them anyway.
COMMON = ["backbone=rs50", "backbone.weights=random", "task.resolution=32", "trainer.precision=32-true",
          "trainer.num_workers=0", "trainer.eval_batch_size=8", "trainer.batch_size=8", "trainer.progress_bar=false",
          "logger.wandb.mode=disabled", "task.check_split_sizes=false"]


def run(tmp_path, name: str, *overrides: str) -> dict:
    run_dir = tmp_path / name
    code = run_main([*COMMON, f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}", *overrides])
    assert code == 0
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.e2e
def test_linear_probe_reuses_its_feature_cache(tmp_path, saved_to_disk):
    task = ["task=cifar100", f"task.data_dir={saved_to_disk}", "task.max_bad_fraction=0.2", "protocol=linear",
            "protocol.l2_steps=40"]
    first = run(tmp_path, "first", *task)
    second = run(tmp_path, "second", *task)
    assert first["counts"]["feature_cache_hits"] == 0 and second["counts"]["feature_cache_hits"] == 3
    assert first["counts"]["skipped_images"] == 1 == second["counts"]["skipped_images"]
    assert second["metrics"] == first["metrics"]
    assert {"test/top1", "test/top5", "test/mean_per_class"} - set(first["metrics"]) == {"test/top5"}  # 3 classes
    # The 40-value grid, plus the values beyond an end where the val curve had not come down (l2_search).
    in_grid = [l2 for l2, _ in first["extra"]["l2_curve"] if 1e-6 * (1 - 1e-9) <= l2 <= 1e5 * (1 + 1e-9)]
    assert first["primary_metric"] == "test/top1" and len(in_grid) == 40
    searched = first["extra"]["l2_search"]["searched"]
    assert searched[0] == min(c[0] for c in first["extra"]["l2_curve"]) and searched[1] >= 1e5 * (1 - 1e-9)
    assert first["extra"]["preprocess"] == "paper"  # cifar100 is compared with the SimCLR/BYOL linear rows
    assert first["counts"]["undecodable_images"] == 0 and first["counts"]["images_test_scored"] == 9
    assert 0 <= first["counts"]["test_near_ties"] <= 9 and second["counts"]["test_near_ties"] == \
        first["counts"]["test_near_ties"]
    assert first["extra"]["best_l2"] in [c[0] for c in first["extra"]["l2_curve"]]


@pytest.mark.e2e
def test_knn_on_an_image_folder(tmp_path, image_folder):
    results = run(tmp_path, "knn", "task=oxford_pets", f"task.data_dir={image_folder}", "task.max_bad_fraction=0.2",
                  "protocol=knn", "protocol.k=3")
    assert results["primary_metric"] == "test/mean_per_class"
    assert 0 <= results["metrics"]["test/mean_per_class"] <= 100
    assert results["counts"]["images_test"] == 9 and results["counts"]["skipped_images"] == 1
    assert results["counts"]["images_test_scored"] == 9


@pytest.mark.e2e
def test_finetune_sweep_picks_on_val_then_refits(tmp_path, parquet_files):
    results = run(tmp_path, "ft", "task=cifar100", f"task.data_dir={parquet_files}", "task.max_bad_fraction=0.2",
                  "protocol=finetune_strong", "protocol.sweep=true", "protocol.lr_grid=[0.001,0.01]",
                  "protocol.wd_grid=[0.0]", "protocol.mixup=0.2", "protocol.ema_decay=0.9", "trainer.max_epochs=1")
    rows = results["extra"]["sweep"]
    assert [r[:2] for r in rows] == [[0.001, 0.0], [0.01, 0.0]]
    best = max(rows, key=lambda r: r[2])
    assert results["extra"]["best_lr"] == best[0]
    assert results["metrics"]["val/best_top1"] == pytest.approx(best[2])
    assert "test/top1" in results["metrics"] and results["extra"]["first_epoch_this_process"] == 0
    assert (tmp_path / "ft" / "checkpoints" / "final" / "last.ckpt").exists()


def test_corrupt_images_above_the_threshold_stop_the_run(tmp_path, image_folder, capsys):
    code = run_main([*COMMON, "task=cifar100", f"task.data_dir={image_folder}", f"run.dir={tmp_path / 'r'}"])
    assert code == 2
    assert "unreadable" in capsys.readouterr().err


def truncated_jpeg(colour: int) -> bytes:
    """A real JPEG cut in half (an interrupted download): the header scan passes it, decoding fails."""
    buf = io.BytesIO()
    im = np.random.default_rng(colour).integers(0, 60, (96, 96, 3)).astype(np.uint8)
    im[..., colour] += 180
    Image.fromarray(im).save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", [
    ["protocol=linear", "protocol.l2_steps=3", "protocol.extend_decades=0"],
    ["protocol=knn", "protocol.k=3"],
    ["protocol=finetune_strong", "trainer.max_epochs=1"]])
def test_a_run_whose_test_split_scored_nothing_fails_with_its_counts(tmp_path, image_folder, facts, capsys, protocol):
    """Every test image is a truncated JPEG: no test metric, whatever else (val/best) the protocol computed."""
    classes, per_class = facts
    for label, name in enumerate(classes):
        for old in (image_folder / "test" / name).iterdir():
            old.unlink()
        for i in range(per_class["test"]):
            (image_folder / "test" / name / f"cut{i}.jpg").write_bytes(truncated_jpeg(label))
    run_dir = tmp_path / "run"
    code = run_main([*COMMON, "task=oxford_pets", f"task.data_dir={image_folder}", "task.max_bad_fraction=0.5",
                     *protocol, *(["protocol.cache=false"] if "finetune" not in protocol[0] else []),
                     f"run.dir={run_dir}"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and stderr.rstrip().endswith(err[0]), err
    assert "test/mean_per_class" in err[0] and "undecodable" in err[0], err[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and not any(k.startswith("test/") for k in results["metrics"])
    assert results["counts"]["images_test_scored"] == 0
    assert results["counts"]["undecodable_images"] == len(classes) * per_class["test"]
    history = json.loads((run_dir / "history.json").read_text())["processes"]
    assert history[-1]["status"] == "failed"
