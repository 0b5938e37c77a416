"""The data-setting checks every task config shares (transfer.data_settings): one message per key, whatever the task."""
from __future__ import annotations

import pytest

from transfer.data_settings import check_data_settings, local_data_dir
from transfer.errors import ConfigError


@pytest.mark.parametrize("kwargs, key", [({"max_bad_fraction": 1.0}, "task.max_bad_fraction=1.0"),
                                         ({"max_bad_fraction": -0.1}, "task.max_bad_fraction=-0.1"),
                                         ({"limit_per_split": 0}, "task.limit_per_split=0")])
def test_a_bad_value_is_refused_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_data_settings(**kwargs)


def test_good_values_and_unset_keys_pass():
    check_data_settings(max_bad_fraction=0.0, limit_per_split=1)
    check_data_settings()


@pytest.mark.parametrize("task", ["nyu_depth", "ade20k", "voc_detection", "kinetics400", "imagenet", "cifar100"])
def test_each_task_config_uses_the_shared_check(task, tmp_path):
    from transfer.config import compose, validate

    # An existing (empty) folder: the value check, not a missing copy, is what must fail.
    with pytest.raises(ConfigError, match=r"task\.max_bad_fraction=1\.5 must be in \[0, 1\)"):
        validate(compose([f"task={task}", f"task.data_dir={tmp_path}", "task.max_bad_fraction=1.5"]))


def test_an_unset_data_dir_shows_the_layout(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="task 'voc07' needs task.data_dir=PATH, a local VOC copy laid out as:\nTREE"):
        local_data_dir(None, task="voc07", copy="VOC", tree="TREE")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/x below: an existing folder
    (tmp_path / "x").mkdir()
    assert local_data_dir("~/x", task="t", copy="c", tree="") == local_data_dir("~/x", task="t", copy="c", tree="")
    assert "~" not in str(local_data_dir("~/x", task="t", copy="c", tree=""))
