"""The command line as a new user meets it: unknown keys refused with the closest name, ``--help`` built from the
registries, weights checked before any data work, a sweep's summary with its swept keys and failures, the report
telling weights apart, and the console (one line per log record, tidy metrics, shared file modes)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from detection_copies import detection_data_overrides
from suite_helpers import QUICK, REPO, fake_task, run_cli

from transfer.backbones import BACKBONES
from transfer.config import compose, recipe_names, task_adapter, validate
from transfer.errors import ConfigError, WeightsError
from transfer.results import read_results, tidy_metric
from transfer.run import JobOutcome, main, sweep_summary
from transfer.tasks import TASKS, TaskOutput, load_adapters
from transfer.weights import load_strict


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- 2. unknown keys ------------------------------------------------------------------------------------------------

def test_a_misspelt_group_exits_2_naming_the_valid_key(tmp_path):
    # The one test of `python -m transfer.run` itself in a fresh process (exit status, stderr); the others call main().
    proc = run_cli("protocl=knn", f"run.root={tmp_path / 'runs'}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'protocl'" in proc.stderr and "Did you mean protocol=knn?" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, fragment", [
    ("+protocl=knn", "Did you mean protocol=knn?"),  # Hydra's own hint for the typo: refused all the same
    ("trainr.max_epochs=3", "Did you mean trainer.max_epochs=3?"),
    ("trainer.max_epoch=3", "Did you mean trainer.max_epochs=3?"),
    ("+trainer.max_epoch=3", "Did you mean trainer.max_epochs=3?"),
    ("logger.wandb.mod=disabled", "Did you mean logger.wandb.mode=disabled?"),
    ("task.limit_per_splt=5", "Did you mean task.limit_per_split=5?"),
    ("suit=resnet_rs_table5", "Did you mean suite=resnet_rs_table5?"),  # suite= is read before any run config
])
def test_unknown_keys_are_refused_with_the_closest_name(override, fragment, tmp_path, capsys):
    assert main([override, f"run.root={tmp_path}"]) == 2
    assert fragment in _one_error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, fragment, never", [
    # video's randaugment is a task key: say so, never "Did you mean protocol.name=rand-m9"
    (["task=kinetics400", "task.data_dir={tmp}", "protocol.randaugment=rand-m9"],
     "protocol.randaugment is not a key of video's finetune protocol; the task has task.randaugment", "Did you mean"),
    (["task=cifar10", "protocol=finetune", "task.lr=0.1"],
     "task.lr is not a key of classification's task schema; the protocol has protocol.lr", "Did you mean"),
    # no far name carrying the typed value (ema_decay=False)
    (["task=cifar10", "protocol=finetune", "protocol.ema_warmup=false"], "unknown key 'protocol.ema_warmup'",
     "Did you mean"),
    (["task=cifar10", "protocol=finetune", "protocol.nme=x"], "unknown key 'protocol.nme'", "protocol.name"),
    # a recipe's name is chosen with group=NAME: the key swap would report keys the user never typed
    (["task=digits", "protocol.name=finetune"], "use protocol=finetune (a recipe), not protocol.name=finetune",
     "l2_min"),
    (["task=voc_detection", "protocol.name=frozen"], "use protocol=frozen (a recipe), not protocol.name=frozen",
     "freeze_backbone"),
    (["task.name=cifar10"], "use task=cifar10 (a recipe), not task.name=cifar10", "Did you mean"),
    (["task.adapter=video"], "task.adapter cannot be overridden", "Did you mean"),
    # a protocol of another task: name the task(s) taking it
    (["protocol=eval"], "eval is taken by task imagenet: run python -m transfer.run protocol=eval task=imagenet",
     "Did you mean"),
    (["--help", "protocol=eval"], "run python -m transfer.run --help protocol=eval task=imagenet", "Did you mean"),
])
def test_misleading_messages_are_not_given(args, fragment, never, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    assert main([a.format(tmp=data) for a in args] + [f"run.root={tmp_path / 'runs'}"]) == 2
    err = _one_error_line(capsys)
    assert fragment in err and never not in err, err
    assert not (tmp_path / "runs").exists()


def test_published_facts_are_refused_on_the_command_line(tmp_path, capsys):
    """A task schema's published_* / scratch_recipe keys are what the paper did, against which a run is judged
    comparable: setting one (task.published_drop_path_rate=0.3 moved backbone.drop_path_rate and the run stayed
    comparable) is refused, naming what to set instead. Every such key of every adapter."""
    from transfer.config import is_published_fact, published_fact_keys, task_adapter

    load_adapters()
    facts = published_fact_keys()
    assert {"task.published_epochs", "task.published_drop_path_rate", "task.scratch_recipe"} <= set(facts)
    for name in TASKS.names():  # the rule finds every such field
        for key in TASKS.get(name).config_class.__dataclass_fields__:
            if key.startswith("published") or "recipe" in key:
                assert is_published_fact(key) and name in facts[f"task.{key}"], key
    instead = {"task.published_epochs": "set trainer.max_epochs instead",
               "task.published_drop_path_rate": "set backbone.drop_path_rate instead"}
    for key, adapters in facts.items():
        task = next(t for t in recipe_names("task") if task_adapter(t) in adapters)
        for prefix in ("", "+"):
            assert main([f"task={task}", f"{prefix}{key}=1", f"run.root={tmp_path / 'runs'}"]) == 2
            err = _one_error_line(capsys)
            assert f"{key} is a fact of the published recipe" in err and instead.get(key, "") in err, err
    assert not (tmp_path / "runs").exists()


def test_cfg_with_a_sweep_prints_every_job(tmp_path, capsys):
    assert main(["-m", "--cfg", "task=digits,kinetics400", "protocol=finetune", f"task.data_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "# [1/2] task=digits protocol=finetune" in out and "# [2/2] task=kinetics400 protocol=finetune" in out
    assert "name: kinetics400" in out and "name: digits" in out
    assert main(["-m", "--cfg", "task=digits,kinetics400", "protocol=finetune"]) == 2
    assert "job 2/2 (task=kinetics400 protocol=finetune): task 'kinetics400' needs task.data_dir" in \
        _one_error_line(capsys)


def test_a_sweep_with_an_unknown_key_fails_once_before_any_job(tmp_path, capsys):
    assert main(["-m", *QUICK, "protocl=knn,linear", f"run.root={tmp_path}"]) == 2
    assert "Did you mean protocol=knn,linear?" in _one_error_line(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("sweep, fragment", [
    ("trainer.max_epoch=1,2", "Did you mean trainer.max_epochs=1?"),  # a nested typo: every job has it
    ("task.resolution=32,-4", "[2/2]"),  # only the second job's value is bad: the first does not run either
])
def test_a_sweep_validates_every_job_before_the_first_runs(sweep, fragment, tmp_path, capsys, monkeypatch):
    ran = []
    fake_task(monkeypatch, lambda ctx: ran.append(ctx) or TaskOutput(metrics={"test/top1": 1.0}, weights={}))
    assert main(["-m", *QUICK, sweep, f"run.root={tmp_path}"]) == 2
    err = _one_error_line(capsys)
    assert fragment in err and "no job was run" in err
    assert not ran and not any(tmp_path.iterdir())


# --- 3. --help ------------------------------------------------------------------------------------------------------

def test_help_lists_every_task_backbone_and_protocol_and_the_common_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    load_adapters()
    for name in [*recipe_names("task"), *BACKBONES.names(), *recipe_names("protocol")]:
        assert name in out, name
    for key in ("task.data_dir=null", "task.limit_per_split=null", "backbone.weights=pretrained", "run.root=runs",
                "logger.wandb.mode="):
        assert key in out, key
    assert "results.json" in out and "docs/classification.md" in out and "python -m transfer.report" in out


def test_help_for_one_task_shows_its_keys_with_the_recipes_values(capsys):
    assert main(["--help", "task=cifar100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task=cifar100 (adapter classification")
    for key in ("task.hub_id=uoft-cs/cifar100", "task.data_dir=null", "task.limit_per_split=null",
                "task.split_seed=0", "task.val_fraction=0.2"):
        assert key in out, key
    assert "stratified" in out  # the key's own comment is its description


def test_help_takes_a_fields_comment_from_the_class_that_declares_it():
    import dataclasses

    from transfer.usage import schema_comments

    @dataclasses.dataclass
    class Base:
        kept: int = 1  # the base's value, with its source
        redeclared: int = 2  # the base's 2 and why

    @dataclasses.dataclass
    class Child(Base):
        redeclared: int = 3
        own: int = 4  # the child's own

    assert schema_comments(Child) == {"kept": "the base's value, with its source", "own": "the child's own"}


def test_help_for_an_unknown_task_is_one_error(capsys):
    assert main(["--help", "task=cifar101"]) == 2
    assert "cifar100" in _one_error_line(capsys)


# --- 4. weights before data -----------------------------------------------------------------------------------------

def test_a_bad_weights_file_fails_before_the_data_set_is_read(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from tasks.classification.datasets import DATASETS

    read = []
    monkeypatch.setitem(DATASETS._items, "digits", lambda cfg: read.append(cfg) or pytest.fail("data was read"))
    bad = tmp_path / "w.safetensors"
    save_file({"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}, str(bad))
    args = [a for a in QUICK if not a.startswith("backbone.")]
    assert main([*args, f"backbone.weights={bad}", "backbone=resnet50", f"run.root={tmp_path / 'runs'}"]) == 2
    err = _one_error_line(capsys)
    assert "do not match the model" in err and str(bad) in err
    assert read == [] and not (tmp_path / "runs").exists()


def test_a_common_prefix_is_named_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    # backbone., encoder., module. … are removed by themselves (transfer.weights.WRAPPER_PREFIXES); "trunk." is not.
    sd = {f"trunk.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_strict(model, sd, origin="ckpt.safetensors")
    message = str(err.value)
    assert "Hint: 9 of the 9 missing keys are in the file under the prefix 'trunk.'" in message
    assert "'trunk.0.weight' is the model's '0.weight'" in message and "k[6:]" in message
    # Unrelated keys: no hint is made up.
    with pytest.raises(WeightsError) as err:
        load_strict(model, {"something.else": torch.zeros(1)}, origin="x")
    assert "Hint" not in str(err.value)


def test_check_weights_loads_nothing_and_hands_the_read_file_to_the_build(tmp_path):
    from safetensors.torch import save_file

    from transfer.backbones import build_backbone, check_weights

    source = build_backbone("resnet50", weights="random").model
    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    info = check_weights("resnet50", weights=str(path))
    assert info.load is not None and info.load.fraction == 1.0
    built = build_backbone("resnet50", weights=str(path)).model
    assert all(torch.equal(built.state_dict()[k], v) for k, v in source.state_dict().items())


# --- 5. sweep summary -----------------------------------------------------------------------------------------------

def test_sweep_summary_has_the_swept_keys_and_lists_failures():
    ok = {"metrics": {"test/top1": 97.5}, "run_dir": "/r/a"}
    text = sweep_summary(["backbone.weights"], [
        JobOutcome(["task=digits", "backbone.weights=/w/a.safetensors"], ok),
        JobOutcome(["task=digits", "backbone.weights=/w/b.safetensors"], status=2, error="weights do not match"),
    ])
    lines = text.splitlines()
    assert lines[0] == "sweep: 2 job(s), 1 failed"
    assert lines[1].split("|")[1].strip() == "backbone.weights"
    assert "/w/a.safetensors" in lines[3] and "| ok " in lines[3] and "97.50" in lines[3]
    assert "/w/b.safetensors" in lines[4] and "failed (2)" in lines[4]
    assert "failed jobs:" in lines and lines[-1] == ("  [2/2] task=digits backbone.weights=/w/b.safetensors: exit "
                                                    "status 2: weights do not match")


def test_a_sweep_prints_the_swept_key_and_its_failed_job(tmp_path, capsys, monkeypatch):
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"}))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code = main(["-m", *QUICK, f"backbone.weights=random,{bad}", f"run.root={tmp_path / 'runs'}"])
    assert code == 1
    out = capsys.readouterr().out
    summary = out[out.index("sweep: 2 job(s), 1 failed"):]
    head, _, first, second = summary.splitlines()[1:5]
    assert "backbone.weights" in head and "status" in head and "test/top1" in head
    assert "| random " in first and "| ok " in first and "50.00" in first and "results.json" in first
    assert str(bad) in second and "failed (2)" in second
    failed = summary.split("failed jobs:\n", 1)[1].splitlines()
    assert len(failed) == 1 and failed[0].startswith("  [2/2] ") and f"backbone.weights={bad} " in failed[0]
    assert "exit status 2: " in failed[0] and "not a readable safetensors file" in failed[0]


def test_a_sweep_stops_on_sigterm_recording_the_job_as_interrupted(tmp_path, capsys, monkeypatch):
    import signal
    import time

    dirs = []

    def task(ctx):  # the second job is stopped by SIGTERM (scancel, pre-emption) while it works
        dirs.append(ctx.run_dir)
        if len(dirs) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                time.sleep(0.1)
        return TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"})

    fake_task(monkeypatch, task)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["-m", *QUICK, "trainer.seed=0,1,2", f"run.root={tmp_path / 'runs'}"])
    assert code == 128 + signal.SIGTERM and len(dirs) == 2  # exit 143, the third job never started
    assert signal.getsignal(signal.SIGTERM) == before
    history = json.loads((dirs[1] / "history.json").read_text())["processes"][-1]
    assert history["status"] == "interrupted" and "SIGTERM" in history["error"]
    assert not (dirs[1] / "results.json").exists() and (dirs[0] / "results.json").exists()
    out = capsys.readouterr().out
    summary = out[out.index("sweep: 3 job(s), 0 failed, 1 interrupted, 1 not started"):]
    assert "| interrupted (143) " in summary.splitlines()[4]
    assert summary.split("interrupted:\n", 1)[1].splitlines()[0].startswith("  [2/3] ")
    assert "trainer.seed=2" in summary.split("not started:\n", 1)[1].splitlines()[0]


# --- 5. the report tells weights apart ------------------------------------------------------------------------------

def test_report_keeps_runs_with_different_weights_apart(tmp_path):
    from transfer.report import write_report
    from transfer.results import SCHEMA_VERSION, write_results

    root = tmp_path / "runs"
    for i, (sha, value) in enumerate([("a" * 64, 70.0), ("b" * 64, 60.0), ("a" * 64, 71.0)]):
        run_dir = root / "cifar100" / "rs50-linear" / str(i)
        run_dir.mkdir(parents=True)
        path = write_results(run_dir, {
            "schema_version": SCHEMA_VERSION, "task": "cifar100", "backbone": "rs50", "protocol": "linear",
            "weights": {"source": "file", "path": f"/w/{sha[0]}.safetensors", "sha256": sha},
            "metrics": {"test/top1": value}, "counts": {}, "packages": {}, "wall_time_s": 1.0,
            "primary_metric": "test/top1", "extra": {"resolution": 224}})
        os.utime(path, (1000 + i, 1000 + i))
    write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    overview = md.split("## cifar100")[0]
    assert "| rs50 [sha256 aaaaaaaaaa] | 71.00 @224px (newest of 2)" in overview
    assert "| rs50 [sha256 bbbbbbbbbb] | 60.00 @224px" in overview
    assert "(newest of 3)" not in md


# --- 6 is in tests/tasks/classification/test_datasets.py; 7. console, metrics, files ------------------------------

def test_library_log_lines_print_once(tmp_path):
    code = ("import logging, lightning\n"  # Lightning attaches its own console handler on import
            "from transfer.console import setup_logging\n"
            "setup_logging()\n"
            "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('GPU available: False (test line)')\n"
            "logging.getLogger('transfer').info('own line')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    both = proc.stdout + proc.stderr
    assert both.count("GPU available: False (test line)") == 1 and both.count("own line") == 1, both


def test_metrics_lose_float32_noise():
    assert tidy_metric(97.50000238418579) == 97.5 and tidy_metric(0.123456789) == 0.1234568
    assert tidy_metric(torch.tensor(0.975, dtype=torch.float32)) == 0.975  # float(...) alone: 0.9750000238418579
    assert tidy_metric(float("inf")) == float("inf")


def test_results_caches_and_converted_weights_are_written_with_the_shared_mode(tmp_path):
    from transfer.io import atomic_path, atomic_write_json
    from transfer.weights import write_safetensors

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        write_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("r.json", "w.safetensors", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_an_unreachable_host_fails_at_once(monkeypatch):
    from transfer.weights import check_reachable

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"cannot reach 127.0.0.1:{port}"):
        check_reachable(f"http://127.0.0.1:{port}/model.safetensors", timeout=2)


def test_every_adapter_still_composes_after_the_key_checks(tmp_path):
    """The unknown-key check must not refuse a key some task's schema has (every recipe composes)."""
    load_adapters()
    for task in recipe_names("task"):
        adapter = task_adapter(task)  # the recipe's adapter: key
        protocol = next(iter(TASKS.get(adapter).protocols))
        data = (detection_data_overrides(task, tmp_path / task) if adapter == "detection"
                else [f"task.data_dir={tmp_path}"])
        validate(compose([f"task={task}", f"protocol={protocol}", *data]))
    with pytest.raises(ConfigError):
        validate(compose(["task.no_such_key=1"]))


def test_results_json_metrics_are_tidy_end_to_end(tmp_path, monkeypatch):
    noisy = 97.50000238418579  # a float32 mean of 39 / 40 hits, as torchmetrics returns it
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": noisy}, weights={"source": "random"}))
    assert main([*QUICK, f"run.dir={tmp_path / 'run'}"]) == 0
    assert read_results(tmp_path / "run" / "results.json")["metrics"]["test/top1"] == 97.5
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["test/top1"] == 97.5


def test_lists_of_floats_in_extra_are_tidy_too(tmp_path, monkeypatch):
    curve = [(1e-4, 80.0000011920929), (3.1622776601683795e-05, 96.66666388511658)]  # val scores via float32
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"},
                                                  extra={"l2_curve": curve, "best_l2": 1e-4, "note": "kept",
                                                         "search": {"scores": [0.30000001192092896]}}))
    assert main([*QUICK, f"run.dir={tmp_path / 'run'}"]) == 0
    extra = json.loads((tmp_path / "run" / "results.json").read_text())["extra"]
    assert extra["l2_curve"] == [[1e-4, 80.0], [3.162278e-05, 96.66666]] and extra["note"] == "kept"
    assert extra["search"] == {"scores": [0.3]} and extra["best_l2"] == 1e-4


@pytest.mark.e2e
def test_startup_bench_times_every_refusal_next_to_import_torch():
    proc = subprocess.run([sys.executable, "bench/bench_startup.py", "--repeats", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("import ", "transfer.run "))]
    assert len(rows) == 5 and all(line.rstrip().endswith("x") for line in rows), proc.stdout
    assert "expected" not in proc.stdout, proc.stdout  # every refusal exited 2, every import 0
