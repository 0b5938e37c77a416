"""Dense runs (VOC segmentation, NYU depth) against the published rows: which rows are comparable, and that
error metrics (depth's rms, rel) say lower is better wherever a difference is shown."""
from __future__ import annotations

import pytest

from tasks.depth.metrics import METRICS as DEPTH_METRICS
from transfer.baselines import baselines_for
from transfer.compare import assess
from transfer.report import build_comparison, markdown_table, task_rows
from transfer.results import SCHEMA_VERSION, write_results
from transfer.tasks import TASKS, load_adapters

DEPTH = {"test/delta1": 82.0, "test/delta2": 95.0, "test/delta3": 98.9, "test/rel": 0.120, "test/rms": 0.560,
         "test/sq_rel": 0.08, "test/rms_log": 0.19, "test/log10": 0.05}


def _results(task: str, backbone: str, protocol: str, metrics: dict, *, extra: dict, weights: str = "pretrained",
             lower: list[str] | None = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "task": task, "backbone": backbone, "protocol": protocol,
            "weights": {"source": weights}, "metrics": metrics, "counts": {}, "packages": {}, "wall_time_s": 1.0,
            "extra": extra, "protocol_config": {"name": protocol}, "recipe": {},
            "lower_is_better": lower if lower is not None else [k for k in metrics if k.endswith(("rel", "rms",
                                                                                                   "log10"))]}


def test_the_depth_adapter_declares_its_error_metrics_lower_is_better():
    load_adapters()
    adapter = TASKS.get("depth")
    assert set(adapter.lower_is_better) == {"test/rel", "test/sq_rel", "test/rms", "test/rms_log", "test/log10"}
    assert set(adapter.lower_is_better) <= set(DEPTH_METRICS)
    for name in TASKS.names():  # every declared direction names a metric the adapter emits
        assert set(TASKS.get(name).lower_is_better) <= set(TASKS.get(name).metrics), name


def test_fine_tuned_supervised_depth_run_is_compared_with_the_supervised_row_and_says_lower_is_better():
    verdict = assess(_results("nyu_depth", "resnet50", "finetune", DEPTH, extra={"head": "fcrn"}))
    assert verdict["comparable"]
    comparable = [r for r in verdict["baselines"] if r["comparable"]]
    # BYOL Table 4(b): the supervised ImageNet ResNet-50 row, five metrics; the self-supervised rows are context.
    assert {r["method"] for r in comparable} == {"supervised"} and len(comparable) == 5
    by_metric = {r["metric"]: r for r in comparable}
    assert by_metric["test/rms"]["value"] == 0.573 and by_metric["test/rms"]["better"] == "lower"
    assert by_metric["test/rms"]["difference"] == pytest.approx(0.560 - 0.573)  # negative: the run is better
    assert by_metric["test/delta1"]["better"] == "higher"
    assert by_metric["test/delta1"]["difference"] == pytest.approx(82.0 - 81.1)
    context = [r for r in verdict["baselines"] if not r["comparable"]]
    assert context and all("pretraining: row imagenet1k_self_supervised" in r["context"] for r in context)


def test_a_frozen_depth_run_matches_no_fine_tuned_row():
    verdict = assess(_results("nyu_depth", "resnet50", "frozen", DEPTH, extra={"head": "fcrn"}))
    assert verdict["comparison"]["baseline_protocol"] == "frozen"  # a published protocol (BYOL's frozen VOC detection)
    assert verdict["baselines"] and not any(r["comparable"] for r in verdict["baselines"])
    assert all("protocol: row finetune, run frozen" in r["context"] for r in verdict["baselines"])


def test_random_weights_under_the_frozen_protocol_are_no_representation():
    verdict = assess(_results("nyu_depth", "rs50", "frozen", DEPTH, extra={"head": "fcrn"}, weights="random"))
    assert not verdict["comparable"]
    assert "features of an untrained network" in verdict["comparison"]["reasons"][0]


def test_semantic_fpn_segmentation_is_context_for_byols_fcn_rows():
    verdict = assess(_results("voc_semseg", "resnet50", "finetune", {"test/miou": 70.0, "test/pixel_acc": 92.0},
                              extra={"head": "semantic_fpn"}))
    assert verdict["comparable"]  # the run itself is fine ...
    rows = verdict["baselines"]
    assert len(rows) == len(baselines_for("voc_semseg")) == 4
    # ... but BYOL's VOC numbers come from an FCN head: shown as context, with the reason, no difference.
    assert all(not r["comparable"] and "head: row fcn, run semantic_fpn" in r["context"] and r["difference"] is None
               for r in rows)


def test_adapter_reasons_make_a_dense_run_not_comparable():
    verdict = assess(_results("nyu_depth", "resnet50", "finetune", DEPTH,
                              extra={"head": "fcrn", "not_comparable": ["task.limit_per_split=3: a subset"]}))
    assert not verdict["comparable"] and not any(r["comparable"] for r in verdict["baselines"])


def test_report_columns_of_error_metrics_say_lower_is_better(tmp_path):
    run_dir = tmp_path / "nyu_depth" / "resnet50-finetune" / "1"
    run_dir.mkdir(parents=True)
    path = write_results(run_dir, {**_results("nyu_depth", "resnet50", "finetune", DEPTH, extra={"head": "fcrn"}),
                                   "primary_metric": None})
    (task,) = build_comparison([(path, {**_results("nyu_depth", "resnet50", "finetune", DEPTH,
                                                   extra={"head": "fcrn"})})])
    titles = {c.metric: c.title for c in task.columns}
    assert titles["test/rms"] == "finetune test/rms (lower is better)"
    assert titles["test/delta1"] == "finetune test/delta1"
    assert "(lower is better)" in markdown_table(*task_rows(task))
