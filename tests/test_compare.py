"""The matching rule: which published rows stand next to a run, which are context, and what lands in W&B."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from transfer.baselines import baselines_for
from transfer.compare import TABLE_COLUMNS, TABLE_KEY, assess, baseline_rows, log_comparison, run_facts
from transfer.config import WandbConfig, recipe_names, task_adapter
from transfer.tasks import TASKS, load_adapters
from transfer.tracking import RunLogger

load_adapters()

HUB = {"source": "hub:timm/resnetrs50.tf_in1k"}


def _results(task="cifar100", protocol="linear", metrics=None, backbone="rs50", weights=None, extra=None,
             protocol_config=None) -> dict:
    """A results.json as transfer.run writes it; protocol_config defaults to the protocol's own recipe (the schema
    of the task's adapter)."""
    adapter = task_adapter(task) if task in recipe_names("task") else None
    if protocol_config is None and adapter and protocol in TASKS.get(adapter).protocols:
        protocol_config = asdict(_schema(task, protocol)())
    return {"task": task, "adapter": adapter, "protocol": protocol, "backbone": backbone, "weights": weights or HUB,
            "metrics": metrics if metrics is not None else {"test/top1": 75.0, "test/top5": 93.0},
            "extra": extra or {}, "protocol_config": protocol_config, "run_dir": "/tmp/run"}


def _schema(task: str, protocol: str) -> type:
    return TASKS.get(task_adapter(task)).protocols[protocol]


# (a task of the adapter, protocol) for every protocol of every adapter
ADAPTER_PROTOCOLS = [(next(t for t in recipe_names("task") if task_adapter(t) == a), p)
                     for a in TASKS.names() for p in TASKS.get(a).protocols]


def _split(verdict: dict) -> tuple[dict, dict]:
    rows = verdict["baselines"]
    return ({(r["method"], r["arch"], r["metric"]): r for r in rows if r["comparable"]},
            {(r["method"], r["arch"], r["protocol"], r["metric"]): r for r in rows if not r["comparable"]})


def test_supervised_linear_run_matches_the_supervised_linear_rows_at_the_papers_preprocessing():
    verdict = assess(_results(extra={"preprocess": "paper", "resolution": 224}))
    comparable, context = _split(verdict)
    assert verdict["comparable"] and verdict["comparison"]["pretraining"] == "imagenet1k_supervised"
    expected = [b for b in baselines_for("cifar100", "linear", "test/top1") if b.pretrain == "imagenet1k_supervised"]
    assert expected and sorted(r["value"] for r in comparable.values()) == sorted(b.value for b in expected)
    assert all(r["difference"] == pytest.approx(75.0 - r["value"]) for r in comparable.values())
    simclr = context["simclr", "resnet50", "linear", "test/top1"]
    assert simclr["difference"] is None and "pretraining: row imagenet1k_self_supervised" in simclr["context"]
    assert "protocol: row finetune, run linear" in context["simclr", "resnet50", "finetune", "test/top1"]["context"]
    assert {r["metric"] for r in verdict["baselines"]} == {"test/top1"}  # nothing published for test/top5
    assert len({r["label"] for r in verdict["baselines"]}) == len(verdict["baselines"])


def test_without_the_preprocess_field_the_papers_rows_are_context():
    # Runs that record no extra.preprocess used the checkpoint's own resolution and crop, not the papers' 224.
    assert run_facts(_results())["preprocess"] == "checkpoint"
    verdict = assess(_results())
    comparable, context = _split(verdict)
    assert verdict["comparable"] and not comparable
    row = context["supervised_simclr_baseline", "resnet50", "linear", "test/top1"]
    assert row["context"] == "preprocess: row paper, run checkpoint; resolution: row 224, run not recorded"


def test_self_supervised_run_matches_the_self_supervised_rows():
    verdict = assess(_results(backbone="simclr_r50", weights={"source": "file:simclr_r50.safetensors"},
                              extra={"preprocess": "paper", "resolution": 224}))
    comparable, _ = _split(verdict)
    assert verdict["comparison"]["pretraining"] == "imagenet1k_self_supervised"
    assert {k[0] for k in comparable} == {"simclr", "byol", "simclr_byol_repro"}


def test_a_random_weight_run_is_not_comparable_and_shows_no_difference():
    verdict = assess(_results(weights={"source": "random"}, extra={"preprocess": "paper", "resolution": 224}))
    assert verdict["comparable"] is False
    assert any("backbone.weights=random" in r for r in verdict["comparison"]["reasons"])
    assert verdict["baselines"] and not any(r["comparable"] for r in verdict["baselines"])
    assert all(r["difference"] is None and "the run is not comparable" in r["context"] for r in verdict["baselines"])


@pytest.mark.parametrize("extra, match", [
    ({"not_comparable": ["task.limit_per_split=60: only the first 60 images of each split are used"]},
     "limit_per_split"),
    ({"not_comparable": ["task.check_split_sizes=false: flowers102 copy has train 7,169"]}, "check_split_sizes"),
    ({"not_comparable": ["task.allow_partial=true: 10 of 1000 ImageNet-1k classes evaluated"]}, "allow_partial"),
])
def test_a_non_standard_copy_is_not_comparable(extra, match):
    verdict = assess(_results(extra={"preprocess": "paper", **extra}))
    assert verdict["comparable"] is False and match in verdict["comparison"]["reasons"][0]
    assert not any(r["comparable"] for r in verdict["baselines"])


def test_a_protocol_setting_changed_from_the_published_recipe_is_not_comparable():
    config = {**asdict(_schema("cifar100", "linear")()), "l2_steps": 40}
    verdict = assess(_results(extra={"preprocess": "paper", "resolution": 224}, protocol_config=config))
    assert verdict["comparison"]["reasons"] == ["protocol.l2_steps=40 differs from the linear recipe's 45"]
    # Settings that do not change the protocol (the feature cache) leave it comparable.
    config = {**asdict(_schema("cifar100", "linear")()), "cache": False}
    assert assess(_results(extra={"preprocess": "paper", "resolution": 224}, protocol_config=config))["comparable"]


def _changed(value):
    """A value of the same kind that differs from ``value`` (a protocol field's default)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, (list, tuple)):
        return [*value, 7.0] if value else [7.0]
    return "changed" if value is None else None


@pytest.mark.parametrize("task, protocol", ADAPTER_PROTOCOLS,
                         ids=[f"{task_adapter(t)}/{p}" for t, p in ADAPTER_PROTOCOLS])
def test_every_protocol_key_changed_from_the_published_recipe_is_a_reason(task, protocol):
    """Every field of every adapter's protocol schema is checked unless the schema declares it irrelevant, with a
    reason: a key added later cannot be forgotten (linear max_iter=1 and tolerance were once comparable)."""
    schema = _schema(task, protocol)
    unchecked = getattr(schema, "UNCHECKED_KEYS", {})
    fields = [f.name for f in dataclasses.fields(schema) if f.name != "name"]
    assert set(unchecked) <= set(fields) and all(isinstance(why, str) and why for why in unchecked.values())
    recipe = asdict(schema())
    for key in fields:
        verdict = assess(_results(task=task, protocol=protocol, extra={"preprocess": "paper", "resolution": 224},
                                  protocol_config={**recipe, key: _changed(recipe[key])}))
        named = [r for r in verdict["comparison"]["reasons"] if r.startswith(f"protocol.{key}=")]
        if key in unchecked or not getattr(schema, "PUBLISHED", True):
            assert not named
        else:
            assert named and not verdict["comparable"], key


def test_a_linear_probe_with_max_iter_1_is_not_comparable():
    config = {**asdict(_schema("cifar100", "linear")()), "max_iter": 1, "tolerance": 0.1}
    verdict = assess(_results(extra={"preprocess": "paper", "resolution": 224}, protocol_config=config))
    assert not verdict["comparable"] and not any(r["comparable"] for r in verdict["baselines"])
    assert verdict["comparison"]["reasons"] == ["protocol.max_iter=1 differs from the linear recipe's 200",
                                                "protocol.tolerance=0.1 differs from the linear recipe's 1e-06"]


def test_knn_rows_are_context_labelled_with_their_protocol():
    verdict = assess(_results(protocol="knn", extra={"preprocess": "paper", "resolution": 224}))
    assert verdict["comparable"] and verdict["baselines"]
    assert not any(r["comparable"] for r in verdict["baselines"])  # nothing published under k-NN
    assert all(r["label"].startswith(f"{r['protocol']}/") for r in verdict["baselines"])
    assert all(f"protocol: row {r['protocol']}, run knn" in r["context"] for r in verdict["baselines"])


def test_the_suites_strong_finetune_recipe_has_no_published_counterpart():
    verdict = assess(_results(protocol="finetune_strong", extra={"preprocess": "paper", "resolution": 224}))
    assert verdict["comparison"]["baseline_protocol"] is None
    assert not any(r["comparable"] for r in verdict["baselines"])
    assert all("finetune_strong, which has no published counterpart" in r["context"] for r in verdict["baselines"])


def test_the_papers_finetune_recipe_matches_the_finetune_rows():
    verdict = assess(_results(protocol="finetune", extra={"preprocess": "paper", "resolution": 224}))
    comparable, _ = _split(verdict)
    assert verdict["comparable"] and comparable
    assert all(r["protocol"] == "finetune" and r["pretrain"] == "imagenet1k_supervised" for r in comparable.values())


def _kinetics(weights: dict) -> dict:
    # As the video adapter writes it: clip [frames, stride], and the from-scratch recipe the task follows.
    return _results(task="kinetics400", protocol="finetune", metrics={"test/top1": 70.0, "test/top5": 89.0},
                    weights=weights, extra={"clip": [32, 2], "scratch_recipe": "k400_resnet3drs_50_tpu.yaml"})


def test_a_kinetics400_run_from_scratch_lists_the_3d_resnet_rs_50_row_as_comparable():
    verdict = assess(_kinetics({"source": "random"}))
    comparable, context = _split(verdict)
    assert verdict["comparable"] and verdict["comparison"]["baseline_protocol"] == "scratch"
    assert comparable["r3d_rs", "r3d_rs50", "test/top1"]["value"] == 78.2
    assert comparable["r3d_rs", "r3d_rs50", "test/top5"]["value"] == 93.7
    assert comparable["r3d_rs", "r3d_rs50", "test/top1"]["difference"] == pytest.approx(70.0 - 78.2)
    # The web-video pre-trained 83.5 is never the comparison; nor is a 48-frame row for a 32-frame run.
    assert "pretraining: row wvt_video_text" in context["r3d_rs", "r3d_rs", "finetune", "test/top1"]["context"]
    assert any(r["context"] == "clip: row 48x2, run 32x2" for r in context.values())


def test_a_kinetics400_run_from_inflated_imagenet_weights_sees_the_scratch_rows_as_context():
    verdict = assess(_kinetics(HUB))
    comparable, context = _split(verdict)
    assert verdict["comparable"] and not comparable
    row = context["r3d_rs", "r3d_rs50", "scratch", "test/top1"]
    assert "pretraining: row none, run imagenet1k_supervised" in row["context"]


def test_random_weights_without_a_published_scratch_recipe_are_not_comparable():
    verdict = assess(_results(task="kinetics600", protocol="finetune", weights={"source": "random"},
                              extra={"clip": [32, 2]}))
    assert not verdict["comparable"] and "not a published from-scratch recipe" in verdict["comparison"]["reasons"][0]


def test_conditions_read_the_runs_extra_then_its_protocol_config():
    metrics = {"test/ap": 50.0, "test/ap50": 80.0, "test/ap75": 55.0}
    task = "voc_detection_moco_c4"
    moco = {"detector": "faster_rcnn_c4", "freeze_backbone": False, "freeze_at": 0,
            "train_splits": "2007_trainval+2012_trainval", "test_split": "2007_test", "ims_per_batch": 16,
            "base_lr": 0.02, "max_iter": 24000, "steps": [18000, 22000]}
    # A run that records no detector: every VOC row is context, saying why.
    verdict = assess(_results(task, "finetune", metrics))
    assert verdict["comparable"] and not any(r["comparable"] for r in verdict["baselines"])
    assert all("detector: row faster_rcnn_c4, run not recorded" in r["context"] for r in verdict["baselines"])
    # The facts of MoCo's protocol, from extra: the supervised fine-tuned rows (a supervised backbone) match.
    verdict = assess(_results(task, "finetune", metrics, extra=moco))
    comparable = {(r["method"], r["metric"], r["value"]) for r in verdict["baselines"] if r["comparable"]}
    assert comparable == {("supervised", "test/ap50", 81.3), ("supervised", "test/ap", 53.5),
                          ("supervised", "test/ap75", 58.8)}
    # A fact missing from extra is read from protocol_config.
    verdict = assess(_results(task, "finetune", metrics, extra={k: v for k, v in moco.items() if k != "freeze_at"},
                              protocol_config={**asdict(_schema(task, "finetune")()), "freeze_at": 0}))
    assert len([r for r in verdict["baselines"] if r["comparable"]]) == 3
    assert verdict["comparison"]["facts"]["max_iter"] == "24000"


def _imagenet_eval(backbone: str, resolution: int) -> dict:
    # As tasks/imagenet writes it: the resolution evaluated at and the entry's published checkpoint.
    from transfer.backbones import BACKBONES
    return _results("imagenet", "eval", {"val/top1": 80.0}, backbone=backbone,
                    extra={"resolution": resolution, "checkpoint": BACKBONES.get(backbone).checkpoint})


def test_eval_protocol_is_compared_with_its_own_checkpoints_row_only():
    """rs152 is resnet-rs-152-i256: of the 15 supervised ImageNet rows (160..320 px, several checkpoints) only
    that checkpoint's 256-px row is measured the same way."""
    verdict = assess(_imagenet_eval("rs152", 256))
    comparable = [r for r in verdict["baselines"] if r["comparable"]]
    assert [(r["arch"], r["conditions"], r["value"]) for r in comparable] == [
        ("resnetrs152", "resolution=256;checkpoint=resnet-rs-152-i256", 83.0)]
    assert comparable[0]["difference"] == pytest.approx(80.0 - 83.0)
    supervised = [r for r in verdict["baselines"] if r["protocol"] == "supervised"]
    assert len(supervised) == len(baselines_for("imagenet", "supervised", "val/top1")) == 15
    i192 = next(r for r in supervised if "resnet-rs-152-i192" in r["conditions"])
    assert i192["context"] == "resolution: row 192, run 256; checkpoint: row resnet-rs-152-i192, run resnet-rs-152-i256"


def test_eval_at_another_resolution_than_the_checkpoints_row_is_context():
    verdict = assess(_imagenet_eval("rs50", 128))
    assert not any(r["comparable"] for r in verdict["baselines"])
    row = next(r for r in verdict["baselines"] if "resnet-rs-50-i160" in r["conditions"])
    assert row["context"] == "resolution: row 160, run 128"
    assert [r["value"] for r in assess(_imagenet_eval("rs50", 160))["baselines"] if r["comparable"]] == [78.8]


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_a_run_at_another_resolution_than_the_published_rows_is_context(protocol):
    """A linear (or fine-tune) run at task.resolution=32 with the papers' crop is not the papers' 224-px protocol."""
    extra = {"preprocess": "paper", "resolution": 32}
    verdict = assess(_results("flowers102", protocol, {"test/mean_per_class": 40.0}, extra=extra))
    assert verdict["baselines"] and not any(r["comparable"] for r in verdict["baselines"])
    row = next(r for r in verdict["baselines"] if r["method"] == "supervised_simclr_baseline"
               and r["protocol"] == protocol)
    assert row["value"] in (94.7, 97.6) and row["difference"] is None
    assert row["context"] == "resolution: row 224, run 32"
    assert verdict["comparison"]["facts"]["resolution"] == "32"


def test_labels_stay_unique_when_method_and_arch_repeat():
    # MoCo v3 has three ImageNet linear rows, same method and arch, different training lengths.
    rows = baseline_rows(_results("imagenet", "linear", {"val/top1": 70.0}, backbone="moco_v3_r50"))
    moco = [r for r in rows if r["method"] == "moco_v3"]
    assert len(moco) == len([b for b in baselines_for("imagenet", "linear", "val/top1") if b.method == "moco_v3"]) > 1
    assert len({r["label"] for r in rows}) == len(rows)


@pytest.mark.parametrize("task, protocol, metrics", [
    ("digits", "knn", {"test/top1": 50.0}),  # nothing published for the demo task
    ("cifar100", "linear", {"test/top5": 90.0}),  # nothing published for this metric
    ("COCO-2017", "finetune", {"test/AP": 40.0}),  # names the baselines file cannot hold
])
def test_no_rows_when_nothing_is_published(task, protocol, metrics):
    assert baseline_rows(_results(task, protocol, metrics)) == []


@pytest.fixture
def offline_logger(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RunLogger(WandbConfig(mode="offline"), tmp_path, name="cifar100/rs50/linear", group="cifar100",
                       job_type="linear", config={"task_name": "cifar100"})
    yield logger
    logger.finish()


def _logged_table(logger) -> dict:
    ref = logger.run.summary[TABLE_KEY]
    assert ref["_type"] == "table-file"
    return json.loads((Path(logger.run.dir) / ref["path"]).read_text())


def test_offline_run_holds_verdict_comparable_rows_and_labelled_context(offline_logger):
    results = {**_results(extra={"preprocess": "paper", "resolution": 224})}
    results.update(assess(results))
    offline_logger.summary(results["metrics"])
    rows = log_comparison(offline_logger, results)
    summary = dict(offline_logger.run.summary)
    assert summary["test/top1"] == 75.0 and summary["comparable"] is True
    for r in rows:
        prefix = "baseline" if r["comparable"] else "context"
        assert summary[f"{prefix}/{r['label']}/{r['metric']}"] == r["value"]
    assert any(k.startswith("context/finetune/") for k in summary)
    logged = _logged_table(offline_logger)
    assert logged["columns"] == TABLE_COLUMNS
    assert [row[6] for row in logged["data"]] == [75.0, *(r["value"] for r in rows)]
    assert [row[8] for row in logged["data"][1:]] == ["yes" if r["comparable"] else f"context: {r['context']}"
                                                       for r in rows]
    assert "comparison/test_top1_table" in summary  # the bar chart of the comparable rows


def test_offline_run_of_a_random_weight_run_says_not_comparable(offline_logger):
    results = _results(weights={"source": "random"})
    results.update(assess(results))
    log_comparison(offline_logger, results)
    summary = dict(offline_logger.run.summary)
    assert summary["comparable"] is False and "backbone.weights=random" in summary["comparison/reasons"]
    assert not any(k.startswith("baseline/") for k in summary)
    assert "comparison/test_top1_table" not in summary  # no chart: nothing stands next to this run
    assert _logged_table(offline_logger)["data"][0][8].startswith("no: backbone.weights=random")


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


@pytest.mark.e2e
def test_a_kinetics400_run_records_what_the_video_rows_are_matched_on(tmp_path):
    from transfer.run import main
    from video.synthetic import write_dataset

    root = write_dataset(tmp_path / "data", "csv", classes=5, per_class=1, damaged=False)  # 5: top-5 too
    run_dir = tmp_path / "run"
    # The recipe's 32 frames x stride 2 (fps 32 fits the 2-second synthetic clips); a tiny schedule and size.
    code = main(["task=kinetics400", "backbone=rs50", "backbone.weights=random", f"task.data_dir={root}",
                 "task.num_classes=5", "task.fps=32", "task.train_size=32", "task.eval_size=32", "task.test_clips=1",
                 "task.test_crops=1", "task.inflation.stage_temporal_kernels=[1,1,1,3]", "trainer.max_steps=1",
                 "trainer.max_epochs=1", "trainer.batch_size=5", "trainer.eval_batch_size=5",
                 "trainer.num_workers=0", "trainer.progress_bar=false", "logger.wandb.mode=disabled",
                 f"run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["extra"]["clip"] == [32, 2] and "k400_resnet3drs_50_tpu.yaml" in results["extra"]["scratch_recipe"]
    assert results["comparison"]["baseline_protocol"] == "scratch" and results["comparison"]["pretraining"] == "none"
    rs50 = {r["metric"]: r for r in results["baselines"] if r["arch"] == "r3d_rs50"}
    assert {m: r["value"] for m, r in rs50.items()} == {"test/top1": 78.2, "test/top5": 93.7}
    # Matched on protocol, pretraining and clip=32x2, yet this toy run (5 classes, 1 step, 32-pixel frames) is no
    # like-for-like run of the published recipe: it says why, and the rows are context.
    assert not results["comparable"] and not any(r["comparable"] for r in rs50.values())
    assert all(r["context"] == "the run is not comparable (see comparison.reasons)" for r in rs50.values())
    reasons = results["comparison"]["reasons"]
    assert "5 classes, not the 400 of kinetics400: a subset of the data" in reasons
    assert "trainer.max_steps=1 stops training before the schedule's end" in reasons
    assert "task.train_size=32 differs from the kinetics400 recipe's 224" in reasons
