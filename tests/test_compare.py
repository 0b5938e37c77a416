"""Baselines next to a run's score: the rows for results.json, and what lands in an offline W&B run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfer.baselines import baselines_for
from transfer.compare import TABLE_COLUMNS, TABLE_KEY, baseline_rows, log_comparison
from transfer.config import WandbConfig
from transfer.tracking import RunLogger


def _results(task="cifar100", protocol="linear", metrics=None, backbone="rs50") -> dict:
    return {"task": task, "protocol": protocol, "backbone": backbone, "weights": {"source": "random"},
            "metrics": metrics if metrics is not None else {"test/top1": 75.0, "test/top5": 93.0},
            "run_dir": "/tmp/run"}


def test_rows_are_the_published_numbers_for_task_protocol_and_metric():
    results = _results()
    rows = baseline_rows(results)
    expected = baselines_for("cifar100", "linear", "test/top1")
    assert expected and sorted(r["value"] for r in rows) == sorted(b.value for b in expected)
    assert {r["metric"] for r in rows} == {"test/top1"}  # no published test/top5 for this task
    assert all(r["difference"] == pytest.approx(75.0 - r["value"]) and r["source"] for r in rows)
    assert len({r["label"] for r in rows}) == len(rows)


def test_labels_stay_unique_when_method_and_arch_repeat():
    # MoCo v3 has three ImageNet linear rows, same method and arch, different training lengths.
    rows = baseline_rows(_results("imagenet", "linear", {"val/top1": 70.0}))
    moco = [r for r in rows if r["method"] == "moco_v3"]
    published = [b for b in baselines_for("imagenet", "linear", "val/top1") if b.method == "moco_v3"]
    assert len(published) > 1 and len(moco) == len(published)
    assert len({r["label"] for r in rows}) == len(rows)


def test_eval_protocol_is_compared_with_the_supervised_rows():
    rows = baseline_rows(_results("imagenet", "eval", {"val/top1": 80.0}))
    assert rows and len(rows) == len(baselines_for("imagenet", "supervised", "val/top1"))


@pytest.mark.parametrize("task, protocol, metrics", [
    ("digits", "knn", {"test/top1": 50.0}),  # nothing published for the demo task
    ("cifar100", "linear", {"test/top5": 90.0}),  # nothing published for this metric
    ("cifar100", "some_new_protocol", {"test/top1": 50.0}),  # a protocol the baselines file does not know
    ("COCO-2017", "finetune", {"test/AP": 40.0}),  # names the baselines file cannot hold
])
def test_no_rows_when_nothing_matches(task, protocol, metrics):
    assert baseline_rows(_results(task, protocol, metrics)) == []


@pytest.fixture
def offline_logger(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RunLogger(WandbConfig(mode="offline"), tmp_path, name="cifar100/rs50/linear", group="cifar100",
                       job_type="linear", config={"task_name": "cifar100"})
    yield logger
    logger.finish()


def test_offline_run_holds_score_baselines_and_table(offline_logger):
    results = _results()
    offline_logger.summary(results["metrics"])
    rows = log_comparison(offline_logger, results)
    summary = dict(offline_logger.run.summary)
    assert summary["test/top1"] == 75.0
    assert rows and all(summary[f"baseline/{r['label']}/{r['metric']}"] == r["value"] for r in rows)
    table_ref = offline_logger.run.summary[TABLE_KEY]
    assert table_ref["_type"] == "table-file" and table_ref["nrows"] == len(rows) + 1  # + this run's row
    logged = json.loads((Path(offline_logger.run.dir) / table_ref["path"]).read_text())
    assert logged["columns"] == TABLE_COLUMNS
    assert [row[5] for row in logged["data"]] == [75.0, *(r["value"] for r in rows)]
    assert "comparison/test_top1_table" in summary  # the bar chart's data


def test_tracker_failure_only_warns_and_keeps_the_rows(offline_logger, monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError("upload refused")

    monkeypatch.setattr(offline_logger, "log", broken)
    with pytest.warns(UserWarning, match="upload refused"):
        rows = log_comparison(offline_logger, _results())
    assert rows == baseline_rows(_results())


def test_disabled_logger_still_returns_rows(tmp_path):
    logger = RunLogger(WandbConfig(mode="disabled"), tmp_path, name="n", group="g", job_type="j", config={})
    assert logger.run is None
    assert log_comparison(logger, _results()) == baseline_rows(_results())


def test_precomputed_rows_in_results_are_logged_as_given(offline_logger):
    results = {**_results(), "baselines": baseline_rows(_results())[:1]}
    assert log_comparison(offline_logger, results) == results["baselines"]
    assert offline_logger.run.summary[TABLE_KEY]["nrows"] == 2
