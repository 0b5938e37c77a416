"""A killed fine-tune resumed with resume=true ends bit-identical to the uninterrupted run; last.ckpt is the
last epoch; the resume picks the right directory and cleans up after a kill."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from suite_helpers import QUICK, REPO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.config import compose, validate
from transfer.engine import FINAL_WEIGHTS, AtomicCheckpointIO, build_trainer, resume_path
from transfer.errors import ConfigError, TransferError
from transfer.io import remove_orphan_temporaries, sha256_file
from transfer.run import main
from transfer.rundir import plan_run_dir
from transfer.tasks import RunContext
from transfer.tracking import RunLogger

# Dropout and mixup draw on the training process, RandAugment and the random crop on the loader: every
# kind of randomness a resumed epoch has to replay. EMA adds callback state to the checkpoint.
FINETUNE = [a for a in QUICK if not a.startswith("trainer.num_workers")] + [
    "protocol=finetune_strong", "trainer.max_epochs=3", "trainer.batch_size=16", "task.limit_per_split=64",
    "protocol.dropout=0.3", "protocol.mixup=0.2", "protocol.ema_decay=0.5"]


def _cli(tmp_path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "cli.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "transfer.run", *FINETUNE, *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log,
                            start_new_session=True)


def _tail(tmp_path) -> str:
    return (tmp_path / "cli.log").read_text()[-3000:]


@pytest.mark.e2e
def test_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path):
    reference, killed, moved = tmp_path / "reference", tmp_path / "killed", tmp_path / "moved"
    assert _cli(tmp_path, f"run.dir={reference}", "trainer.num_workers=0").wait(timeout=1800) == 0, _tail(tmp_path)

    proc = _cli(tmp_path, f"run.dir={killed}", "trainer.num_workers=2")
    first = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 1800
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run ended or timed out before writing its first checkpoint\n" + _tail(tmp_path)
    assert not (killed / "results.json").exists(), "the run finished before it could be interrupted"

    # Resumed from a copy elsewhere, with a different worker count: neither may change a single bit.
    shutil.copytree(killed, moved)
    (moved / "checkpoints" / ".last.ckpt.otherhost.4242.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert _cli(tmp_path, f"run.dir={moved}", "trainer.num_workers=0", "resume=true").wait(timeout=1800) == 0, \
        _tail(tmp_path)

    want, got = (load_file(d / "checkpoints" / FINAL_WEIGHTS) for d in (reference, moved))
    assert want.keys() == got.keys()
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run: {differ[:5]}"
    ref, res = (json.loads((d / "results.json").read_text()) for d in (reference, moved))
    assert res["metrics"] == ref["metrics"]
    assert res["extra"]["resumed_from"] == str(moved / "checkpoints" / "last.ckpt")
    assert res["extra"]["first_epoch_this_process"] == 1 and res["extra"]["global_step"] == 3 * 4
    assert res["extra"]["best_checkpoint"].startswith(str(moved)), "the test used the original run's file"
    assert os.path.basename(res["extra"]["best_checkpoint"]) == os.path.basename(ref["extra"]["best_checkpoint"])

    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not [n for n in names if "-v1" in n or n.endswith(".tmp")], names
    processes = res["history"]
    assert [p["status"] for p in processes] == ["interrupted", "complete"]  # the first was killed
    assert processes[1]["fits"][0]["first_epoch"] == 1
    assert res["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in processes), abs=5.0)
    assert res["wall_time_s"] > res["wall_time_this_process_s"]


class _Shrinking(L.LightningModule):
    """A model whose validation score only gets worse: the best epoch stays epoch 0."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/top1", -float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _ctx(tmp_path, *overrides: str) -> RunContext:
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", "trainer.max_epochs=3", "trainer.channels_last=false",
                            *overrides]))
    logger = RunLogger(cfg.logger.wandb, tmp_path, name="n", group="g", job_type="j", config={})
    return RunContext(cfg=cfg, run_dir=tmp_path, logger=logger)


def test_last_ckpt_is_the_last_epoch_when_validation_stops_improving(tmp_path):
    ctx = _ctx(tmp_path)
    trainer = build_trainer(ctx, monitor="val/top1")
    data = TensorDataset(torch.randn(8, 2))
    trainer.fit(_Shrinking(), train_dataloaders=DataLoader(data, batch_size=4),
                val_dataloaders=DataLoader(data, batch_size=4))
    ckpts = tmp_path / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6, "last.ckpt must hold the last epoch, not the best"
    assert trainer.checkpoint_callback.best_model_path == str(ckpts / "epoch000.ckpt")
    final = load_file(ckpts / FINAL_WEIGHTS)
    assert all(torch.equal(final[k], v) for k, v in last["state_dict"].items()), "final weights are the last state"


def test_resume_picks_the_newest_run_with_a_usable_checkpoint_and_says_which(tmp_path):
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.root={tmp_path}", "resume=true"]))
    parent = tmp_path / "digits" / "rs50-finetune_strong"
    runs = {}
    for name in ("good", "finished", "orphan", "truncated"):
        runs[name] = parent / name
        (runs[name] / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1}, runs["good"] / "checkpoints" / "last.ckpt")
    torch.save({"epoch": 1}, runs["finished"] / "checkpoints" / "last.ckpt")
    (runs["finished"] / "results.json").write_text("{}")
    (runs["orphan"] / "checkpoints" / ".last.ckpt.vm.99999.abcd.tmp").write_bytes(b"\0" * 100)
    torch.save({"epoch": 1, "w": torch.zeros(1000)}, runs["truncated"] / "checkpoints" / "last.ckpt")
    data = (runs["truncated"] / "checkpoints" / "last.ckpt").read_bytes()
    (runs["truncated"] / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])
    for name, age in (("good", 1), ("finished", 2), ("orphan", 3), ("truncated", 4)):
        os.utime(runs[name], (1e9 + age, 1e9 + age))

    plan = plan_run_dir(cfg)
    assert plan.path == runs["good"]
    assert str(runs["good"]) in plan.note
    assert "truncated (no usable checkpoint or feature shard)" in plan.note
    assert "orphan (no usable checkpoint or feature shard)" in plan.note
    assert "finished (finished: has results.json)" in plan.note

    shutil.rmtree(runs["good"])
    with pytest.raises(ConfigError, match="no interrupted run with a usable checkpoint"):
        plan_run_dir(cfg)


def test_resume_of_a_run_dir_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.ckpt.vm.99999.abcd.tmp").write_bytes(b"\0")
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.dir={run}", "resume=true"]))
    with pytest.raises(ConfigError, match="holds no usable checkpoint"):
        plan_run_dir(cfg)


def test_a_damaged_last_checkpoint_is_refused_by_name(tmp_path):
    ctx = _ctx(tmp_path, "resume=true")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(Exception, match="cannot resume from .*last.ckpt"):
        resume_path(ctx)


def test_orphan_temporaries_are_removed_but_a_live_writer_is_left_alone(tmp_path):
    from transfer.io import _HOST

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        (tmp_path / "checkpoints").mkdir()
        orphan = tmp_path / "checkpoints" / f".last.ckpt.{_HOST}.{dead}.k2j4.tmp"
        foreign = tmp_path / f".results.json.otherhost.{live.pid}.a1b2.tmp"
        writing = tmp_path / f".config.yaml.{_HOST}.{live.pid}.z9y8.tmp"
        old_style = tmp_path / ".history.json.q8w7e6.tmp"
        for f in (orphan, foreign, writing, old_style):
            f.write_bytes(b"partial")
        shared = sorted(remove_orphan_temporaries(tmp_path, any_host=False))
        assert shared == [orphan], "a shared folder loses only this host's dead writers' files"
        removed = remove_orphan_temporaries(tmp_path)
        assert sorted(removed) == sorted([foreign, old_style])
        assert writing.exists()
    finally:
        live.kill()
        live.wait()


def test_the_next_run_clears_what_killed_writers_of_this_host_left_nearby(tmp_path):
    from transfer.io import _HOST
    from transfer.rundir import open_run_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    parent = tmp_path / "digits" / "rs50-finetune_strong"
    killed = parent / "killed" / "checkpoints" / f".last.ckpt.{_HOST}.{dead}.k2j4.tmp"
    cache = tmp_path / ".cache" / "features" / f".rs50-digits-train.safetensors.{_HOST}.{dead}.f00d.tmp"
    elsewhere = parent / "other-host" / f".results.json.otherhost.{dead}.beef.tmp"  # may be a live writer there
    for f in (killed, cache, elsewhere):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"partial")
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.root={tmp_path}"]))
    open_run_dir(cfg, plan_run_dir(cfg), writer=True)
    assert not killed.exists() and not cache.exists()
    assert elsewhere.exists()


# One finished EMA fine-tune, copied by the tests below (a few seconds on a CPU).
SHORT = [a for a in FINETUNE if not a.startswith(("trainer.max_epochs", "task.limit_per_split"))] + [
    "trainer.max_epochs=1", "task.limit_per_split=32"]


@pytest.fixture(scope="module")
def finished_ema_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SHORT, f"run.dir={run}"]) == 0
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _member_data_offset(path, name) -> int:
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


@pytest.mark.e2e
def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_member(finished_ema_run, tmp_path, capsys):
    import zipfile

    run = _copy(finished_ema_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    with zipfile.ZipFile(last) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert member.file_size > 4096
    start = _member_data_offset(last, member.filename) + 1024
    data = bytearray(last.read_bytes())
    data[start:start + 1024] = bytes(b ^ 0xFF for b in data[start:start + 1024])
    last.write_bytes(bytes(data))
    (run / "results.json").unlink()
    before = sha256_file(run / "checkpoints" / FINAL_WEIGHTS)
    capsys.readouterr()
    assert main([*SHORT, f"run.dir={run}", "resume=true"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(last) in err[0] and member.filename in err[0] and "CRC" in err[0], err[0]
    assert sha256_file(run / "checkpoints" / FINAL_WEIGHTS) == before and not (run / "results.json").exists()


def test_a_checkpoint_holding_nan_weights_is_not_read_back(tmp_path):
    path = tmp_path / "epoch000.ckpt"
    torch.save({"state_dict": {"head.weight": torch.tensor([1.0, float("nan")])}, "epoch": 0}, path)
    with pytest.raises(TransferError, match=r"epoch000.ckpt.*state_dict/head.weight"):
        AtomicCheckpointIO().load_checkpoint(path)
    torch.save({"state_dict": {"head.weight": torch.ones(2)}, "epoch": 0}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["epoch"] == 0


@pytest.mark.e2e
def test_the_final_weights_are_the_same_whatever_path_reached_the_end(finished_ema_run, tmp_path):
    """EMA: the averaged weights are the final ones. A resume with no epoch left (results.json damaged, or a kill
    between the last checkpoint and the end) trains nothing and must write the same file, and test the same model."""
    final = finished_ema_run / "checkpoints" / FINAL_WEIGHTS
    want = sha256_file(final)
    first = json.loads((finished_ema_run / "results.json").read_text())
    assert first["extra"]["final_weights_sha256"] == want
    assert os.stat(final).st_mode & 0o777 == os.stat(finished_ema_run / "results.json").st_mode & 0o777

    resumed = _copy(finished_ema_run, tmp_path / "a")
    text = (resumed / "results.json").read_text()
    (resumed / "results.json").write_text(text[: len(text) // 2])  # truncated
    assert main([*SHORT, f"run.dir={resumed}", "resume=true"]) == 0
    again = json.loads((resumed / "results.json").read_text())
    assert sha256_file(resumed / "checkpoints" / FINAL_WEIGHTS) == want == again["extra"]["final_weights_sha256"]
    assert again["metrics"] == first["metrics"]

    killed = _copy(finished_ema_run, tmp_path / "b")  # killed after its last checkpoint, before its end
    (killed / "results.json").unlink()
    (killed / "checkpoints" / FINAL_WEIGHTS).unlink()
    assert main([*SHORT, f"run.dir={killed}", "resume=true"]) == 0
    assert sha256_file(killed / "checkpoints" / FINAL_WEIGHTS) == want
    assert json.loads((killed / "results.json").read_text())["metrics"] == first["metrics"]


def test_the_same_tensors_and_metadata_give_the_same_safetensors_file(tmp_path):
    """safetensors orders metadata by a Rust HashMap, differently at each write; the sha256 must not change."""
    from transfer.weights import write_safetensors

    meta = {"epochs": "1", "global_step": "2", "converter": "x", "source": "y.ckpt"}
    shas = {write_safetensors({"w": torch.ones(3)}, tmp_path / f"{i}.safetensors", metadata=meta) for i in range(6)}
    assert len(shas) == 1


def test_resume_orders_runs_by_their_recorded_progress_not_folder_times(tmp_path):
    """Another run clearing a temporary file in a folder moves the folder's mtime, not its checkpoints'."""
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", f"run.root={tmp_path}", "resume=true"]))
    parent = tmp_path / "digits" / "rs50-finetune_strong"
    runs = {name: parent / name for name in ("older", "newer", "done", "empty")}
    for name, run in runs.items():
        (run / "checkpoints").mkdir(parents=True)
        if name != "empty":
            torch.save({"epoch": 1}, run / "checkpoints" / "last.ckpt")
    (runs["done"] / "results.json").write_text("{}")
    for name, age in (("older", 1), ("newer", 3), ("done", 2), ("empty", 0)):
        for f in runs[name].rglob("*"):
            os.utime(f, (1e9 + age, 1e9 + age))
    for run in runs.values():
        os.utime(run, (2e9, 2e9))  # every folder touched later, "older" last of all
    os.utime(runs["older"], (2e9 + 5, 2e9 + 5))
    plan = plan_run_dir(cfg)
    assert plan.path == runs["newer"]
    assert "done (finished: has results.json)" in plan.note and "older (older)" in plan.note
    assert "empty (no usable checkpoint or feature shard)" in plan.note


@pytest.mark.parametrize("task", [[*QUICK, "protocol=finetune"],
                                  ["task=kinetics400", "backbone=resnet50", "backbone.weights=random"]])
def test_a_frozen_finetune_run_has_its_own_folder_and_cannot_be_resumed_unfrozen(tmp_path, task):
    """protocol.freeze_backbone=true is another protocol (finetune-frozen): its own run folder, and a resume that
    unfreezes it is refused even with resume_allow_changes=true (the protocol never changes on resume)."""
    from omegaconf import OmegaConf

    from transfer.rundir import CONFIG_FILE, config_changes, config_tree

    base = [*task, f"run.root={tmp_path}", f"task.data_dir={tmp_path}"]
    frozen = validate(compose([*base, "protocol.freeze_backbone=true"]))
    tuned = validate(compose(base))
    backbone = frozen.backbone.name
    assert plan_run_dir(frozen).path.parent == tmp_path / frozen.task.name / f"{backbone}-finetune-frozen"
    assert plan_run_dir(tuned).path.parent == tmp_path / tuned.task.name / f"{backbone}-finetune"
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config_tree(frozen))))
    unfrozen = validate(compose([*base, "protocol.freeze_backbone=false", "resume=true",
                                 "resume_allow_changes=true"]))
    with pytest.raises(ConfigError, match=r"protocol\.freeze_backbone: True -> False"):
        config_changes(unfrozen, run)
