"""Run directories: separate per SLURM step / array task / sweep, shared by the ranks of one launch, never
overwritten; a resume with a changed configuration is refused unless allowed, and then recorded."""
import json
import os
import subprocess
import sys

import pytest
import torch
from suite_helpers import QUICK, REPO, fake_task

from transfer.config import compose, validate
from transfer.engine import apply_hyperparameters
from transfer.errors import ConfigError
from transfer.optim import warmup_cosine
from transfer.run import main
from transfer.rundir import RUN_DIR_ENV, open_run_dir, plan_run_dir
from transfer.tasks import TaskOutput

SLURM = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_ARRAY_JOB_ID",
         "SLURM_ARRAY_TASK_ID", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launch(monkeypatch):
    """Set the environment of one process of a launch; everything else of SLURM/torchrun is cleared."""
    def set_env(**env):
        for var in SLURM:
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, str(value))
    return set_env


def _plan(tmp_path, *overrides, sweep_index=None):
    cfg = validate(compose([*QUICK, f"run.root={tmp_path}", *overrides]))
    return plan_run_dir(cfg, sweep_index=sweep_index).path


def test_ranks_of_one_slurm_step_agree_and_steps_arrays_and_sweeps_separate(tmp_path, launch):
    dirs = {}
    for key, env in {
        "step0/rank0": dict(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=0),
        "step0/rank1": dict(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_STEP_ID=0),
        "step1/rank0": dict(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=1),
        "array3": dict(SLURM_JOB_ID=80, SLURM_ARRAY_JOB_ID=77, SLURM_ARRAY_TASK_ID=3, SLURM_NTASKS=2, SLURM_STEP_ID=0),
        "array4": dict(SLURM_JOB_ID=81, SLURM_ARRAY_JOB_ID=77, SLURM_ARRAY_TASK_ID=4, SLURM_NTASKS=2, SLURM_STEP_ID=0),
        "torchrun/rank0": dict(WORLD_SIZE=2, RANK=0, TORCHELASTIC_RUN_ID="abc"),
        "torchrun/rank1": dict(WORLD_SIZE=2, RANK=1, TORCHELASTIC_RUN_ID="abc"),
    }.items():
        launch(**env)
        dirs[key] = _plan(tmp_path)
    assert dirs["step0/rank0"] == dirs["step0/rank1"]
    assert dirs["torchrun/rank0"] == dirs["torchrun/rank1"]
    assert len({dirs[k] for k in ("step0/rank0", "step1/rank0", "array3", "array4", "torchrun/rank0")}) == 5
    assert dirs["step1/rank0"].name == "job77-step1" and dirs["array4"].name == "job77-task4-step0"

    launch(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=0)
    sweep = [_plan(tmp_path, sweep_index=i) for i in range(2)]
    assert sweep[0] != sweep[1] and sweep[0].name == "job77-step0-sweep0"

    launch(SLURM_JOB_ID=77)  # one process of a job: nobody to agree with, a fresh timestamped folder each time
    assert _plan(tmp_path) != _plan(tmp_path)


def test_a_second_launch_into_the_same_directory_fails_before_writing(tmp_path, launch, capsys):
    launch(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=0)  # the same srun step launched again
    run = _plan(tmp_path, "protocol=finetune_strong")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "results.json").write_text('{"first": true}')
    before = sorted(p.name for p in run.rglob("*"))
    assert main([*QUICK, f"run.root={tmp_path}", "protocol=finetune_strong"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and str(run) in err
    assert sorted(p.name for p in run.rglob("*")) == before
    assert json.loads((run / "results.json").read_text()) == {"first": True}


def test_two_runs_of_one_slurm_job_without_a_step_get_their_own_directories(tmp_path, launch, monkeypatch):
    """python run in a batch script or under salloc: SLURM_JOB_ID and SLURM_NTASKS set, no srun step id."""
    launch(SLURM_JOB_ID=555, SLURM_NTASKS=4)
    first, second = _plan(tmp_path), _plan(tmp_path)  # decided before either wrote anything (concurrent runs)
    assert first != second
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"}))
    args = [a for a in QUICK if not a.startswith("logger.")]
    for _ in range(2):
        assert main([*args, "logger.wandb.mode=offline", f"run.root={tmp_path}"]) == 0
    done = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert len(done) == 2 and done[0] != done[1]
    assert (done[0] / "wandb_run_id.txt").read_text() != (done[1] / "wandb_run_id.txt").read_text()
    # torchrun inside the allocation: its ranks still agree, by its run id.
    launch(SLURM_JOB_ID=555, SLURM_NTASKS=4, WORLD_SIZE=2, RANK=1, TORCHELASTIC_RUN_ID="xyz")
    assert _plan(tmp_path).name == "job555-torchrun-xyz" == _plan(tmp_path).name


_HOLD = """
import sys
from transfer.config import compose, validate
from transfer.rundir import open_run_dir, plan_run_dir
cfg = validate(compose(sys.argv[2:]))
record = open_run_dir(cfg, plan_run_dir(cfg), writer=True)  # held while the record lives
print("claimed", flush=True)
sys.stdin.read()
"""


def test_a_directory_in_use_by_a_live_run_is_refused_and_freed_when_it_dies(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = tmp_path / "run"
    args = [*QUICK, f"run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, "x", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"}))
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by a live run" in err and f"pid {holder.pid}" in err, err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "the second run wrote"
    finally:
        holder.kill()  # SIGKILL: no cleanup of its own, the kernel drops its lock
        holder.wait()
    assert main(args) == 0
    history = json.loads((run / "history.json").read_text())["processes"]
    assert [p["status"] for p in history] == ["interrupted", "complete"]
    assert history[0]["pid"] == holder.pid


def test_two_slurm_steps_get_their_own_results_and_wandb_runs(tmp_path, launch, monkeypatch):
    """End to end through main(): a task that returns at once stands in for a long run."""
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"test/top1": 50.0}, weights={"source": "random"}))
    done = []
    for step in (0, 1):
        launch(SLURM_JOB_ID=77, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_STEP_ID=step)
        args = [a for a in QUICK if not a.startswith("logger.")]
        assert main([*args, "logger.wandb.mode=offline", f"run.root={tmp_path}"]) == 0
        done.append(next(tmp_path.rglob(f"job77-step{step}")))
    ids = [(d / "wandb_run_id.txt").read_text() for d in done]
    assert ids[0] != ids[1]
    for d in done:
        assert json.loads((d / "results.json").read_text())["metrics"] == {"test/top1": 50.0}
        assert len(list((d / "wandb").glob("offline-run-*"))) == 1


def _finished_run(tmp_path, *overrides):
    """A run directory as a finished process leaves it: config.yaml, history and a checkpoint."""
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.dir={tmp_path / 'run'}", *overrides]))
    plan = plan_run_dir(cfg)
    record = open_run_dir(cfg, plan, writer=True)
    record.finish("complete")
    (plan.path / "checkpoints").mkdir()
    torch.save({"epoch": 0}, plan.path / "checkpoints" / "last.ckpt")
    return plan.path


def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run = _finished_run(tmp_path, "protocol.lr=0.01")
    before = (run / "config.yaml").read_text(), (run / "history.json").read_text()
    args = [*QUICK, "protocol=finetune_strong", f"run.dir={run}", "resume=true", "protocol.lr=0.1",
            "trainer.num_workers=3", "logger.wandb.mode=offline"]
    with pytest.raises(ConfigError) as err:
        plan_run_dir(validate(compose(args)))
    assert "protocol.lr: 0.01 -> 0.1" in str(err.value) and "resume_allow_changes=true" in str(err.value)
    assert "num_workers" not in str(err.value) and "wandb" not in str(err.value)  # they change no number
    assert ((run / "config.yaml").read_text(), (run / "history.json").read_text()) == before

    cfg = validate(compose([*args, "resume_allow_changes=true"]))
    plan = plan_run_dir(cfg)
    assert plan.changed == {"protocol.lr": [0.01, 0.1]}
    open_run_dir(cfg, plan, writer=True)
    history = json.loads((run / "history.json").read_text())["processes"]
    assert [p["config"] for p in history] == ["history/config.0.yaml", "history/config.1.yaml"]
    assert history[1]["changed"] == {"protocol.lr": [0.01, 0.1]}
    assert "lr: 0.01" in (run / "history" / "config.0.yaml").read_text()
    assert "lr: 0.1" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("override", ["backbone=resnet50", "task=cifar10", "backbone.weights=pretrained"])
def test_a_resume_that_names_another_run_is_refused_even_when_changes_are_allowed(tmp_path, override):
    run = _finished_run(tmp_path)
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.dir={run}", "resume=true",
                            "resume_allow_changes=true", override, f"task.data_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="another run, not a continuation"):
        plan_run_dir(cfg)


def _optimizer(lr: float, steps: int):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [w], "weight_decay": 1e-4}], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup=2, total=10))
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt, sched


def test_an_allowed_lr_change_is_the_lr_that_runs_from_the_resumed_step():
    """Lightning restores the old param groups; the new lr must replace them at the same schedule position."""
    live, live_sched = _optimizer(0.01, 0)
    fresh = [[{k: v for k, v in g.items() if k != "params"} for g in live.param_groups]]  # this process: lr 0.01
    old, old_sched = _optimizer(0.1, 4)  # the checkpoint: lr 0.1, four steps in
    live.load_state_dict(old.state_dict())
    live_sched.load_state_dict(old_sched.state_dict())
    trainer = type("T", (), {"optimizers": [live], "lr_scheduler_configs": [type("C", (), {"scheduler": live_sched})]})
    apply_hyperparameters(trainer, fresh)
    expected = 0.01 * warmup_cosine(4, warmup=2, total=10)
    assert live.param_groups[0]["lr"] == pytest.approx(expected) and live.param_groups[0]["initial_lr"] == 0.01
    live.step()
    live_sched.step()
    assert live.param_groups[0]["lr"] == pytest.approx(0.01 * warmup_cosine(5, warmup=2, total=10))


@pytest.mark.e2e
def test_a_finished_run_continued_with_a_new_lr_records_what_ran(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*QUICK, "protocol=finetune_strong", "trainer.batch_size=16", "task.limit_per_split=32", f"run.dir={run}"]
    assert main([*args, "trainer.max_epochs=1"]) == 0
    first = json.loads((run / "results.json").read_text())

    changed = [*args, "trainer.max_epochs=2", "protocol.lr=0.1", "resume=true"]
    capsys.readouterr()
    assert main(changed) == 2
    assert "protocol.lr: 0.01 -> 0.1" in capsys.readouterr().err
    assert json.loads((run / "results.json").read_text()) == first, "a refused resume touches nothing"

    assert main([*changed, "resume_allow_changes=true"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["protocol_config"]["lr"] == 0.1 and results["extra"]["global_step"] == 2 * 2
    second = results["history"][1]
    assert second["changed"] == {"protocol.lr": [0.01, 0.1], "trainer.max_epochs": [1, 2]}
    fit = second["fits"][0]
    assert fit["first_epoch"] == 1 and fit["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert {group["initial_lr"] for group in fit["optimizer"][0]} == {0.1}, "the optimiser runs the new lr"
    assert json.loads((run / "history" / "results.0.json").read_text()) == first
    assert "lr: 0.01" in (run / "history" / "config.0.yaml").read_text()
    assert "lr: 0.1" in (run / "config.yaml").read_text() == (run / "history" / "config.1.yaml").read_text()


def test_a_resume_under_another_protocol_says_only_that(tmp_path):
    # The two protocols' sections share few keys: the refusal names the protocols, not every key of both.
    run = _finished_run(tmp_path)
    cfg = validate(compose([*QUICK, "protocol=linear", f"run.dir={run}", "resume=true", "resume_allow_changes=true",
                            f"task.data_dir={tmp_path}"]))
    with pytest.raises(ConfigError) as err:
        plan_run_dir(cfg)
    message = str(err.value)
    assert "protocol=finetune_strong, this one protocol=linear" in message and "new run folder" in message
    assert "->" not in message and "protocol.lr" not in message
