"""The published-baselines data file: packaged, valid, consistent with the registry; bad files fail clearly."""
from __future__ import annotations

import pytest

from transfer.backbones import BACKBONES
from transfer.baselines import COLUMNS, PROTOCOLS, baselines_for, default_path, load_baselines
from transfer.errors import ConfigError, DataError

HEADER = "# version: 1\n" + ",".join(COLUMNS) + "\n"
ROW = "byol,resnet50,ImageNet-1k,cifar100,linear,224px,test/top1,78.4,BYOL Table 3\n"


def _write(tmp_path, text: str, name: str = "baselines.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_packaged_file_loads_and_every_row_names_its_source():
    rows = load_baselines()
    assert default_path().is_file() and rows
    assert all(r.source and r.protocol in PROTOCOLS for r in rows)


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
    ("# version: 1\nmethod,arch,value\n", "columns"),
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
