"""End to end through ``python -m transfer.run``: synthetic Kinetics in every layout, 2 training steps,
multi-view evaluation, skipped counts in results.json."""
import json

import pytest

from transfer.run import main
from video.synthetic import LAYOUT_WRITERS, write_dataset

TINY = ["protocol=finetune", "backbone.weights=random", "task.num_classes=3", "task.frames=8", "task.stride=2",
        "task.fps=8", "task.train_size=32", "task.eval_size=32", "task.test_clips=2", "task.test_crops=3",
        "task.max_bad_fraction=0.5", "task.inflation.stage_temporal_kernels=[1,1,1,3]", "trainer.max_steps=2",
        "trainer.max_epochs=1", "trainer.batch_size=2", "trainer.eval_batch_size=4", "trainer.num_workers=0",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled"]


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
    assert counts["train/skipped_clips"] == 2
    assert counts["test/skipped_views"] == 2  # both temporal clips of the undecodable val video
    assert counts["test/videos_without_views"] == 1
    assert 0 <= results["metrics"]["test/top1"] <= 100


@pytest.mark.e2e
def test_manifest_run_skips_known_bad_videos(tmp_path):
    from video.scan import main as scan

    root = write_dataset(tmp_path / "data", "csv", classes=3, per_class=2)
    assert scan([str(root), "--out", str(tmp_path / "manifest")]) == 0
    run_dir = tmp_path / "run"
    code = main(["task=kinetics400", "backbone=rs50", f"task.manifest={tmp_path / 'manifest'}",
                 f"run.dir={run_dir}", *TINY])
    assert code == 0
    counts = json.loads((run_dir / "results.json").read_text())["counts"]
    assert counts["train/undecodable_in_scan"] == 1 and counts["val/missing"] == 1
    assert counts["train/skipped_clips"] == 0 and counts["test/skipped_views"] == 0


def test_protocol_values_are_refused(tmp_path):
    root = write_dataset(tmp_path / "data", "list", classes=2, per_class=1, damaged=False)
    code = main(["task=kinetics400", "backbone=resnet50", f"task.data_dir={root}", "protocol.lr=0.1", *TINY])
    assert code == 2
