"""Frozen-feature protocols at scale: features in safetensors shards, extracted through the Lightning engine
(2 DDP processes give the rows of 1, none repeated or missing; a SIGKILLed extraction resumes from its finished
shards), and the probe and k-NN streamed over chunks giving the one-block answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.classification.features import (
    SplitFeatures,
    cache_key,
    read_shards,
    shard_file,
    shard_key,
    shard_ranges,
    write_cache,
)
from tasks.classification.knn import knn_predict
from tasks.classification.linear import fit_logistic, objective
from tasks.classification.rows import Rows, concat

REPO = Path(__file__).resolve().parents[3]


def features(n: int, d: int = 12, classes: int = 4, seed: int = 0):
    """Overlapping Gaussian classes shifted away from 0: a probe with a real optimum (not separable)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    x = centers[y] + 1.5 * rng.normal(size=(n, d)) + 2.0
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def as_shards(tmp_path: Path, x: torch.Tensor, y: torch.Tensor, parts: int, chunk_rows: int) -> Rows:
    """``x`` written as ``parts`` safetensors shards of the cache, read back as streamed Rows."""
    key = cache_key(backbone="toy", dataset="toy", split="train")
    ranges = shard_ranges(len(x), -(-len(x) // parts))
    assert len(ranges) == parts
    for i, (a, b) in enumerate(ranges):
        write_cache(shard_file(tmp_path, i, parts), shard_key(key, i, a, b),
                    SplitFeatures(x[a:b], y[a:b], torch.arange(a, b)))
    rows = read_shards(tmp_path, key, ranges, dim=x.shape[1]).rows(device=torch.device("cpu"), chunk_rows=chunk_rows)
    assert not rows.in_memory and len(list(rows.chunks())) > parts  # streamed, chunks cut inside shards
    return rows


def test_chunked_probe_equals_the_in_memory_probe(tmp_path):
    (x, y), (xt, _) = features(203), features(50, seed=1)
    streamed = as_shards(tmp_path, x, y, parts=4, chunk_rows=23)
    for l2 in (1e-2, 10.0):
        one = fit_logistic(x, y, 4, l2, max_iter=500, tolerance=1e-8)
        chunked = fit_logistic(streamed, None, 4, l2, max_iter=500, tolerance=1e-8)
        assert objective(chunked, x, y) == pytest.approx(objective(one, x, y), rel=1e-5)
        assert objective(chunked, streamed) == pytest.approx(objective(one, x, y), rel=1e-5)
        assert torch.equal(chunked.logits(xt).argmax(1), one.logits(xt).argmax(1))
        torch.testing.assert_close(chunked.weight, one.weight, atol=2e-3, rtol=2e-3)


def test_chunked_knn_equals_one_block_knn(tmp_path):
    (x, y), (q, _) = features(157, d=16, classes=5), features(41, d=16, classes=5, seed=3)
    one = knn_predict(x, y, q, 5, k=7, temperature=0.07)
    bank = concat(as_shards(tmp_path / "a", x[:90], y[:90], parts=3, chunk_rows=11),
                  as_shards(tmp_path / "b", x[90:], y[90:], parts=2, chunk_rows=11))
    queries = Rows.from_tensors(q, torch.zeros(len(q), dtype=torch.int64), chunk_rows=9)
    chunked = knn_predict(bank, None, queries, 5, k=7, temperature=0.07, chunk=4)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)
    assert torch.equal(chunked.argmax(1), one.argmax(1))


def shards_of(cache: Path) -> dict[str, list[Path]]:
    """The shard files of each split folder under ``cache/features``."""
    return {d.name.split("-")[-2]: sorted(d.glob("shard-*.safetensors")) for d in (cache / "features").iterdir()}


def read_all(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file
    parts = [load_file(str(f)) for f in files]
    return torch.cat([p["features"] for p in parts]), torch.cat([p["kept"] for p in parts])


COMMON = ["backbone=rs50", "backbone.weights=random", "task.resolution=32", "trainer.precision=32-true",
          "trainer.num_workers=0", "trainer.eval_batch_size=2", "trainer.progress_bar=false",
          "logger.wandb.mode=disabled", "task.max_bad_fraction=0.2", "task.check_split_sizes=false",
          "trainer.accelerator=cpu", "protocol=knn", "protocol.k=3", "protocol.shard_images=3"]


def cli(tmp_path: Path, *args: str, env: dict | None = None, script: str | None = None):
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "transfer.run", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.e2e
def test_two_process_extraction_equals_one_process(tmp_path, image_folder, facts):
    classes, per_class = facts
    assert per_class["test"] * len(classes) == 9  # odd: 2 processes cannot split it evenly
    task = ["task=oxford_pets", f"task.data_dir={image_folder}"]
    one = cli(tmp_path, *COMMON, *task, f"run.dir={tmp_path / 'one'}", f"run.cache_dir={tmp_path / 'c1'}")
    two = cli(tmp_path, *COMMON, *task, "trainer.devices=2", f"run.dir={tmp_path / 'two'}",
              f"run.cache_dir={tmp_path / 'c2'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = shards_of(tmp_path / "c1"), shards_of(tmp_path / "c2")
    assert sorted(single) == sorted(double) == ["test", "train", "val"]
    for split in single:
        (f1, k1), (f2, k2) = read_all(single[split]), read_all(double[split])
        assert len(k2) == len(set(k2.tolist())), f"{split}: a row extracted twice"
        assert torch.equal(k1, k2), f"{split}: rows differ"
        torch.testing.assert_close(f2, f1, rtol=1e-5, atol=1e-5)
    assert len(read_all(single["test"])[1]) == 9  # every test image once
    r1, r2 = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert r1["metrics"] == r2["metrics"] and r2["counts"]["images_test_scored"] == 9


KILLING_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import tasks.classification.features as features

    marker, at = Path(os.environ["KILL_MARKER"]), int(os.environ["KILL_AT_ITEM"])
    original = features._Positions.__getitem__

    def getitem(self, i):  # the first time item `at` of a split is loaded, the process is SIGKILLed
        if i == at and not marker.exists():
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, i)

    features._Positions.__getitem__ = getitem
    from transfer.run import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.e2e
def test_sigkilled_extraction_resumes_from_its_finished_shards(tmp_path, image_folder):
    # train (the 18 readable train images less the 20 % held out for val) makes 5 shards of 3 items; item 7 is in
    # shard 2, so shards 0 and 1 (items 0-5) are finished when the kill comes.
    args = [*COMMON, "task=oxford_pets", f"task.data_dir={image_folder}", f"run.cache_dir={tmp_path / 'cache'}"]
    env = {"KILL_MARKER": str(tmp_path / "killed"), "KILL_AT_ITEM": "7"}
    killed = cli(tmp_path, *args, f"run.dir={tmp_path / 'a'}", env=env, script=KILLING_RUN)
    assert killed.returncode == -9 and (tmp_path / "killed").exists()
    (train_dir,) = [d for d in (tmp_path / "cache" / "features").iterdir() if "-train-" in d.name]
    finished = {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.safetensors")}
    assert sorted(finished) == [shard_file(train_dir, i, 5).name for i in (0, 1)]
    again = cli(tmp_path, *args, f"run.dir={tmp_path / 'b'}", env=env, script=KILLING_RUN)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.safetensors")
            if p.name in finished} == finished  # reused, not rewritten
    assert len(list(train_dir.glob("shard-*.safetensors"))) == 5 and not list(train_dir.glob(".*.tmp"))
    counts = json.loads((tmp_path / "b" / "results.json").read_text())["counts"]
    assert counts["feature_shards_reused"] == 2 and counts["feature_cache_hits"] == 0
    fresh = cli(tmp_path, *COMMON, "task=oxford_pets", f"task.data_dir={image_folder}", "protocol.cache=false",
                f"run.dir={tmp_path / 'fresh'}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    resumed, whole = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("b", "fresh"))
    assert resumed["metrics"] == whole["metrics"]


@pytest.mark.e2e
def test_killed_run_with_shards_in_its_folder_continues_with_resume_true(tmp_path, image_folder):
    # protocol.cache=false: the shards live in the run's folder, so the same command would start a new folder;
    # resume=true picks the killed run (it has finished shards, no checkpoint) and reuses them.
    args = [*COMMON, "task=oxford_pets", f"task.data_dir={image_folder}", "protocol.cache=false",
            f"run.root={tmp_path / 'runs'}"]
    env = {"KILL_MARKER": str(tmp_path / "killed"), "KILL_AT_ITEM": "7"}
    killed = cli(tmp_path, *args, env=env, script=KILLING_RUN)
    assert killed.returncode == -9 and (tmp_path / "killed").exists()
    (run,) = (tmp_path / "runs" / "oxford_pets" / "rs50-knn").iterdir()
    (train_dir,) = [d for d in (run / "features").iterdir() if "-train-" in d.name]
    finished = {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.safetensors")}
    assert len(finished) == 2
    resumed = cli(tmp_path, *args, "resume=true", env=env, script=KILLING_RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=true: continuing {run} (2 finished feature shard(s) under features/)" in resumed.stderr
    assert [p.name for p in (tmp_path / "runs" / "oxford_pets" / "rs50-knn").iterdir()] == [run.name]
    assert {p.name: p.stat().st_mtime_ns for p in train_dir.glob("shard-*.safetensors")
            if p.name in finished} == finished  # reused, not rewritten
    results = json.loads((run / "results.json").read_text())
    assert results["counts"]["feature_shards_reused"] == 2
    assert [p["resume"] for p in json.loads((run / "history.json").read_text())["processes"]] == [False, True]


def test_resume_with_run_dir_accepts_a_folder_of_finished_feature_shards_only(tmp_path):
    from transfer.config import compose, validate
    from transfer.errors import ConfigError
    from transfer.rundir import plan_run_dir

    run = tmp_path / "run"
    split = run / "features" / "rs50-oxford_pets-train-0123456789abcdef"
    split.mkdir(parents=True)
    (split / ".shard-00000-of-00002.safetensors.vm.99.ab.tmp").write_bytes(b"\0")  # a killed write: not a shard
    cfg = validate(compose(["task=oxford_pets", "task.data_dir=/tmp", "protocol=knn", f"run.dir={run}",
                            "resume=true"]))
    with pytest.raises(ConfigError, match="no finished feature shard under features/"):
        plan_run_dir(cfg)
    key = cache_key(backbone="rs50", dataset="oxford_pets", split="train")
    write_cache(shard_file(split, 0, 2), shard_key(key, 0, 0, 2),
                SplitFeatures(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2)))
    plan = plan_run_dir(cfg)
    assert plan.path == run and plan.resume
