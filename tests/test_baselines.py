"""The published-baselines data file: packaged, valid, consistent with the registry and with the metric
keys the adapters emit; bad files fail clearly."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from transfer.backbones import BACKBONES
from transfer.baselines import (
    COLUMNS,
    METRIC,
    NO_SUITE_TASK,
    PRETRAINING,
    PROTOCOLS,
    baselines_for,
    default_path,
    load_baselines,
)
from transfer.config import RECIPES_DIR
from transfer.errors import ConfigError, DataError
from transfer.tasks import TASKS, load_adapters

HEADER = "# version: 2\n" + ",".join(COLUMNS) + "\n"
ROW = "byol,resnet50,imagenet1k_self_supervised,cifar100,linear,224px,preprocess=paper,test/top1,78.4,BYOL Table 3\n"


def _adapter_of(task: str) -> str | None:
    """The adapter a task recipe names, or None when the suite has no recipe for the task."""
    path = RECIPES_DIR / "task" / f"{task}.yaml"
    return str(OmegaConf.load(path).adapter) if path.is_file() else None


def _write(tmp_path, text: str, name: str = "baselines.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_packaged_file_loads_and_every_row_names_its_source():
    rows = load_baselines()
    assert default_path().is_file() and rows
    assert all(r.source and r.protocol in PROTOCOLS and r.pretrain in PRETRAINING for r in rows)


# A baseline row whose metric key no adapter emits could never sit beside a run's score.
@pytest.mark.parametrize("task", sorted({r.task for r in load_baselines()} - set(NO_SUITE_TASK)))
def test_every_baseline_metric_key_is_one_an_adapter_emits(task):
    load_adapters()
    adapter = _adapter_of(task)
    assert adapter is not None, (f"baseline rows for task {task!r}, which has no recipe in {RECIPES_DIR / 'task'}: "
                                 "add the task, or list it in transfer.baselines.NO_SUITE_TASK with the reason")
    declared = TASKS.get(adapter).metrics
    missing = sorted({r.metric for r in baselines_for(task)} - set(declared))
    assert not missing, f"{task}: baseline metric keys {missing} are not among adapter {adapter!r}'s {declared}"


def test_rows_for_tasks_outside_the_suite_are_declared_and_reported():
    # Rows of tasks the suite does not run are never silently ignored: each such task is listed with its reason
    # (they stay in the file as context for the papers' full tables), and really has no recipe.
    outside = {r.task for r in load_baselines() if _adapter_of(r.task) is None}
    assert outside == set(NO_SUITE_TASK), "update transfer.baselines.NO_SUITE_TASK"
    assert all(NO_SUITE_TASK[t] for t in outside)
    counts = {t: sum(r.task == t for r in load_baselines()) for t in sorted(outside)}
    print(f"baseline rows for tasks outside the suite (context only): {counts}")


def test_docs_list_the_protocol_of_every_task_with_published_rows():
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "comparison.md").read_text()
    section = docs.split("## The protocol of each published row, per task", 1)[1]
    assert all(f"`{task}`" in section for task in {r.task for r in load_baselines()})


def test_every_adapter_declares_lower_case_split_name_keys():
    load_adapters()
    for name in TASKS.names():
        keys = TASKS.get(name).metrics
        bad = [k for k in keys if not METRIC.match(k)]
        assert not bad, f"adapter {name!r} declares metric keys {bad} outside the split/name lower-case convention"


def test_the_3d_resnet_rs_50_rows_are_from_scratch_at_32x2():
    rows = {r.metric: r for r in baselines_for("kinetics400", "scratch") if r.arch == "r3d_rs50"}
    assert {m: r.value for m, r in rows.items()} == {"test/top1": 78.2, "test/top5": 93.7}
    assert all(r.pretrain == "none" and r.conditions == (("clip", "32x2"),) for r in rows.values())


def test_transfer_tables_cover_all_twelve_datasets_for_each_method():
    tables = ("SimCLR (arXiv 2002.05709) Table B.5", "BYOL (arXiv 2006.07733) Table 3")
    rows = [r for r in load_baselines() if r.arch == "resnet50" and r.source.startswith(tables)]
    per_method: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        per_method.setdefault((r.method, r.protocol), set()).add(r.task)
    assert per_method and all(len(tasks) == 12 for tasks in per_method.values()), per_method


@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if BACKBONES.get(n).family == "resnet_rs"])
def test_resnet_rs_entries_match_their_published_imagenet_top1(name):
    spec = BACKBONES.get(name)
    found = [r for r in baselines_for("imagenet", "supervised", "val/top1")
             if r.arch == spec.arch and r.setting.startswith(f"{spec.test_res}px")]
    assert len(found) == 1 and found[0].value == spec.top1
    # The row an ImageNet eval of this entry is comparable with: its checkpoint, at its resolution.
    assert dict(found[0].conditions) == {"resolution": str(spec.test_res), "checkpoint": spec.checkpoint}


def test_every_row_that_names_its_input_size_carries_it_as_a_resolution_condition():
    """A run at another resolution must not match: the size a row's setting states ("224px") is a condition."""
    rows = load_baselines()
    sized = [r for r in rows if re.search(r"\d+\s*px", r.setting)]
    assert len(sized) > 100
    for r in sized:
        assert dict(r.conditions).get("resolution") == re.search(r"(\d+)\s*px", r.setting).group(1), r
    assert all("resolution" not in dict(r.conditions) for r in rows if r not in sized)


def test_every_supervised_imagenet_row_names_its_checkpoint():
    rows = baselines_for("imagenet", "supervised")
    assert rows and all(dict(r.conditions).get("checkpoint") for r in rows)
    assert len({dict(r.conditions)["checkpoint"] for r in rows}) == len(rows)


def test_query_filters_by_protocol_and_metric(tmp_path):
    path = _write(tmp_path, HEADER + ROW + ROW.replace("linear", "finetune").replace("78.4", "86.1")
                  + ROW.replace("cifar100", "dtd").replace("test/top1", "test/mean_per_class"))
    assert [r.value for r in baselines_for("cifar100", path=path)] == [78.4, 86.1]
    assert [r.value for r in baselines_for("cifar100", "finetune", "test/top1", path=path)] == [86.1]
    assert baselines_for("cifar100", metric="test/mean_per_class", path=path) == []
    assert baselines_for("unlisted_task", path=path) == []


@pytest.mark.parametrize("kwargs, match", [({"task": "CIFAR-100"}, "lower-case"), ({"protocol": "probe"}, "probe"),
                                           ({"metric": "top1"}, "split/name")])
def test_bad_queries_name_the_value(kwargs, match):
    args = {"task": "cifar100", **kwargs}
    with pytest.raises(ConfigError, match=match):
        baselines_for(args.pop("task"), **args)


@pytest.mark.parametrize("text, match", [
    (",".join(COLUMNS) + "\n" + ROW, "version"),
    ("# version: 9\n" + ",".join(COLUMNS) + "\n" + ROW, "version 9"),
    ("# version: 1\n" + ",".join(COLUMNS) + "\n" + ROW, "reads version 2"),
    ("# version: 2\nmethod,arch,value\n", "columns"),
    (HEADER + ROW.replace("imagenet1k_self_supervised", "ImageNet-1k"), "pretrain='ImageNet-1k'"),
    (HEADER + ROW.replace("preprocess=paper", "preprocess"), "condition 'preprocess'"),
    (HEADER + ROW.replace("preprocess=paper", "Preprocess=paper"), "lower-case key"),
    (HEADER + ROW.replace("78.4", "n/a"), r":3: value='n/a'"),
    (HEADER + ROW.replace("linear", "probe"), "protocol='probe'"),
    (HEADER + ROW.replace("test/top1", "top1"), "metric='top1'"),
    (HEADER + ROW.replace("BYOL Table 3", ""), "empty source"),
    (HEADER + ROW.replace("byol", "BYOL"), "method='BYOL'"),
    (HEADER + ROW + ROW.replace("78.4", "70.0"), ":4: same"),
    (HEADER + "byol,resnet50,cifar100\n", "3 cells"),
])
def test_invalid_files_fail_with_the_line_and_the_fix(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        load_baselines(_write(tmp_path, text))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_baselines(tmp_path / "nope.csv")
