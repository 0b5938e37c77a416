"""End to end through ``python -m transfer.run``: synthetic Kinetics in every layout, 2 training steps,
multi-view evaluation, skipped counts in results.json; runs on unusable data stop with a clear error."""
import json
from dataclasses import asdict

import pytest
from PIL import Image
from suite_helpers import run_cli

from transfer.run import main
from video.config import VideoFinetuneProtocolConfig
from video.synthetic import LAYOUT_WRITERS, write_dataset

TINY = ["protocol=finetune", "backbone.weights=random", "task.num_classes=3", "task.frames=8", "task.stride=2",
        "task.fps=8", "task.train_size=32", "task.eval_size=32", "task.decode_short_side=32", "task.test_clips=2",
        "task.test_crops=3", "task.max_bad_fraction=0.5", "task.inflation.stage_temporal_kernels=[1,1,1,3]",
        "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.batch_size=2", "trainer.eval_batch_size=12",
        "trainer.num_workers=0", "trainer.progress_bar=false", "logger.wandb.mode=disabled"]


@pytest.mark.e2e
@pytest.mark.parametrize("layout", LAYOUT_WRITERS)
def test_kinetics_run_counts_bad_videos(layout, tmp_path):
    root = write_dataset(tmp_path / "data", layout, classes=3, per_class=2)
    run_dir = tmp_path / "run"
    # One batch holds all 7 listed train clips, so each of the 2 steps meets the undecodable one.
    code = main(["task=kinetics400", "backbone=resnet50", f"task.data_dir={root}", f"run.dir={run_dir}", *TINY,
                 "trainer.batch_size=7", "trainer.max_epochs=2"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    counts = results["counts"]
    assert counts["train/missing"] == 1 and counts["val/missing"] == 1
    assert results["extra"]["global_step"] == 2
    assert counts["train/skipped_clips"] == 2 and counts["train/videos_failed_decode"] == 1
    assert counts["test/skipped_views"] == 2  # both temporal clips of the undecodable val video
    assert counts["test/videos_with_failed_views"] == 1 and counts["test/videos_without_views"] == 1
    assert 0 <= results["metrics"]["test/top1"] <= 100
    # A toy run (3 classes, 2 steps, 8-frame clips) is never compared with the published rows as like for like.
    assert results["comparable"] is False
    assert "3 classes, not the 400 of kinetics400: a subset of the data" in results["comparison"]["reasons"]
    # The values the video run used, not the classification protocol's.
    recipe = results["recipe"]
    assert recipe["lr"] == pytest.approx(0.8 * 7 / 1024) and recipe["global_batch"] == 7
    assert recipe["randaugment"] is None and recipe["drop_path_per_stage"] == pytest.approx([0.04, 0.06, 0.08, 0.1])
    assert recipe["bn_momentum"] == 1.0 and recipe["ema_decay"] == 0.9999 and recipe["views"] == [2, 3]
    assert results["protocol_config"] == asdict(VideoFinetuneProtocolConfig())  # the video adapter's own recipe


@pytest.mark.e2e
def test_manifest_run_skips_known_bad_videos(tmp_path):
    from video.scan import main as scan

    root = write_dataset(tmp_path / "data", "csv", classes=3, per_class=2)
    assert scan([str(root), "--out", str(tmp_path / "manifest")]) == 0
    run_dir = tmp_path / "run"
    # Half the 3 test batches of 4 items (12 clips / 3 crops): 2 of the 6 val videos x 2 temporal clips are scored.
    code = main(["task=kinetics400", "backbone=rs50", f"task.manifest={tmp_path / 'manifest'}",
                 f"run.dir={run_dir}", *TINY, "trainer.limit_eval_batches=0.5"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    counts = results["counts"]
    assert counts["train/undecodable_in_scan"] == 1 and counts["val/missing"] == 1
    assert counts["train/skipped_clips"] == 0 and counts["test/skipped_views"] == 0
    assert counts["test/videos_without_views"] == 4
    assert results["comparable"] is False
    assert ("4 of 6 test videos were never scored (trainer.limit_eval_batches=0.5): a partial evaluation"
            in results["comparison"]["reasons"])


@pytest.mark.e2e
@pytest.mark.parametrize("split", ["train", "val"])
def test_decode_failures_above_the_limit_stop_the_run(split, tmp_path, capsys):
    """A JPEG named .mp4 is listed like any video (no scan): its decode failure during the run counts with the
    missing ones, and 1 bad of 5 listed is above task.max_bad_fraction=0.1."""
    root = write_dataset(tmp_path / "data", "folders", classes=2, per_class=2, damaged=False)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(root / split / "class_a" / "still.mp4", format="JPEG")
    code = main(["task=kinetics400", "backbone=resnet50", f"task.data_dir={root}", f"run.dir={tmp_path / 'run'}",
                 *TINY, "task.num_classes=2", "task.max_bad_fraction=0.1", "trainer.max_steps=1",
                 "trainer.batch_size=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"split '{split}': 1 of 5 videos are unusable" in err and "1 failed to decode during the run" in err
    assert "still.mp4" in err and "Counts are in" in err
    # The failed run keeps its counts: status failed, the error, no metric.
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["metrics"] == {} and "1 of 5 videos" in results["error"]
    assert results["counts"][f"{split}/videos"] == 5
    if split == "train":
        assert results["counts"]["train/videos_failed_decode"] == 1
    else:
        assert results["counts"]["test/videos_with_failed_views"] == 1


def test_too_many_missing_videos_fail_with_the_counts_in_results_json(tmp_path, capsys):
    """1 of 8 listed train videos missing is above task.max_bad_fraction=0.1: the run stops before any model work,
    and results.json (status failed) keeps the counts of the listing."""
    root = write_dataset(tmp_path / "data", "csv", classes=3, per_class=2)
    code = main(["task=kinetics400", "backbone=resnet50", f"task.data_dir={root}", f"run.dir={tmp_path / 'run'}",
                 *TINY, "task.max_bad_fraction=0.1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "split 'train': 1 of 8 videos are unusable (1 missing" in err and len(err.strip().splitlines()) == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["metrics"] == {} and "1 of 8 videos" in results["error"]
    assert results["counts"] == {"train/videos": 7, "train/missing": 1, "train/undecodable_in_scan": 0,
                                 "train/unsupported": 0, "train/ignored": 0, "val/videos": 7, "val/missing": 1,
                                 "val/undecodable_in_scan": 0, "val/unsupported": 0, "val/ignored": 0}


def test_manifest_matching_no_video_is_an_error(tmp_path, capsys):
    from video.scan import main as scan

    root = write_dataset(tmp_path / "data", "list", classes=2, per_class=1, damaged=False)
    assert scan([str(root), "--out", str(tmp_path / "manifest")]) == 0
    code = main(["task=kinetics400", "backbone=resnet50", f"task.manifest={tmp_path / 'manifest'}",
                 f"task.data_dir={tmp_path}", f"run.dir={tmp_path / 'run'}", *TINY, "task.num_classes=2"])
    assert code == 2
    assert "none exists under" in capsys.readouterr().err


@pytest.mark.e2e  # a fresh python -m transfer.run process: seconds of imports for one line
def test_impossible_jitter_fails_before_the_run_directory(tmp_path):
    """python -m transfer.run: exit 2 with one line naming the value, and no run directory."""
    result = run_cli("task=kinetics400", "backbone=resnet50", "backbone.weights=random", f"task.data_dir={tmp_path}",
                     "task.train_crop=jitter", "task.scale_jitter=[100,120]", f"run.root={tmp_path / 'runs'}",
                     "logger.wandb.mode=disabled", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "task.scale_jitter=[100, 120]" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, names", [
    (["protocol.randaugment=rand-m9-n2"], "Valid keys of protocol: name, lr, lr_reference_batch,"),
    (["task.optim.lr=0.1"], "unknown key 'task.optim'"),  # the training values are the protocol's now
    (["protocol.ema_decay=0"], "protocol.bn_momentum=1.0"),
    (["task.crop_area=[0.5,0.2]"], "task.crop_area=[0.5, 0.2]"),
])
def test_impossible_values_fail_before_the_run_directory(override, names, tmp_path, capsys):
    code = main(["task=kinetics400", "backbone=resnet50", "backbone.weights=random", f"task.data_dir={tmp_path}",
                 f"run.root={tmp_path / 'runs'}", "logger.wandb.mode=disabled", *override])
    assert code == 2 and names in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_ddp_sums_decode_failures_over_ranks(tmp_path):
    """Two CPU processes: the test items of the undecodable video alternate between the ranks (one temporal clip
    each), so results.json counts both only when the counts are summed over ranks."""
    root = write_dataset(tmp_path / "data", "list", classes=3, per_class=2)
    run_dir = tmp_path / "run"
    quick = [a for a in TINY if not a.startswith(("trainer.batch_size", "trainer.max_steps"))]
    proc = run_cli("task=kinetics400", "backbone=resnet50", f"task.data_dir={root}", f"run.dir={run_dir}", *quick,
                   "trainer.devices=2", "trainer.accelerator=cpu", "trainer.batch_size=4", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((run_dir / "results.json").read_text())["counts"]
    assert counts["test/skipped_views"] == 2 and counts["test/videos_with_failed_views"] == 1
    assert counts["train/videos_failed_decode"] == 1  # seen by one rank or both (sampler padding), counted once


def _cfg(tmp_path, *overrides):
    from transfer.config import compose, validate

    return validate(compose(["task=kinetics400", "backbone=rs50", "backbone.weights=random",
                             f"task.data_dir={tmp_path}", *overrides]))


def test_a_run_off_the_published_recipe_says_why_it_is_not_comparable(tmp_path):
    from video.task import not_comparable

    on_recipe = _cfg(tmp_path, "trainer.max_epochs=350")
    assert not_comparable(on_recipe, classes=400, test_videos=10, never_scored=0) == {}
    reasons = not_comparable(_cfg(tmp_path, "trainer.max_epochs=350", "backbone.drop_path_rate=0.2", "task.frames=16",
                                  "task.inflation.self_gating=none", "trainer.limit_eval_batches=0.5"),
                             classes=400, test_videos=10, never_scored=5)["not_comparable"]
    assert reasons == ["5 of 10 test videos were never scored (trainer.limit_eval_batches=0.5): a partial evaluation",
                       "backbone.drop_path_rate=0.2 differs from the kinetics400 recipe's 0.1",
                       "task.frames=16 differs from the kinetics400 recipe's 32",
                       "task.inflation.self_gating='none' differs from the kinetics400 recipe's 'last'"]
    toy = not_comparable(_cfg(tmp_path, "trainer.max_steps=2"), classes=3, test_videos=6, never_scored=0)
    assert toy["not_comparable"] == ["3 classes, not the 400 of kinetics400: a subset of the data",
                                     "trainer.max_epochs=10; the published schedule trains 350 epochs",
                                     "trainer.max_steps=2 stops training before the schedule's end"]
    # The scale jitter is unused with the recipe's resized crop: changing it changes nothing.
    assert not_comparable(_cfg(tmp_path, "trainer.max_epochs=350", "task.scale_jitter=[300,400]"), classes=400,
                          test_videos=10, never_scored=0) == {}


def test_a_changed_training_value_is_a_protocol_deviation(tmp_path):
    """The 3D recipe is the video protocol's schema: a changed value takes the run off the published recipe."""
    from dataclasses import asdict

    from transfer.compare import protocol_deviations

    cfg = _cfg(tmp_path, "protocol.lr=0.4", "protocol.freeze_backbone=true")
    results = {"task": "kinetics400", "adapter": "video", "protocol": "finetune",
               "protocol_config": asdict(cfg.protocol)}
    assert protocol_deviations(results) == ["protocol.lr=0.4 differs from the finetune recipe's 0.8"]
