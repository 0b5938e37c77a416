"""Faults that end a run end it with one line naming the cause: a full disk, NaN weights, a diverged loss, a
task that scored nothing. The numbers computed before the fault are printed, and the run's files agree."""
import errno
import io
import json
import os
import pathlib
import shutil
import subprocess

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from suite_helpers import QUICK, fake_task, run_cli
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import transfer.engine
from transfer.backbones import BACKBONES, build_backbone
from transfer.config import compose, validate
from transfer.engine import build_trainer
from transfer.errors import StorageError, TransferError, WeightsError
from transfer.run import main
from transfer.tasks import RunContext, TaskOutput
from transfer.tracking import RunLogger

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _only_run_dir(root: pathlib.Path) -> pathlib.Path:
    found = [p.parent for p in root.rglob("config.yaml") if p.parent.name != "history"]
    assert len(found) == 1, found
    return found[0]


def test_full_disk_at_results_json_prints_the_metrics_first_and_names_the_file(tmp_path, monkeypatch, capsys):
    output = TaskOutput(metrics={"test/top1": 87.5}, weights={"source": "random"}, counts={"bad": 1})
    fake_task(monkeypatch, lambda ctx: output)
    real_write = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name.startswith(".results.json."):
            raise ENOSPC
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert main([*QUICK, f"run.root={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert "87.50" in out, "the metrics must be printed before results.json is written"
    lines = _error_lines(err)
    assert len(lines) == 1 and "results.json" in lines[0] and "no space left on device (ENOSPC" in lines[0]
    run = _only_run_dir(tmp_path)
    assert not (run / "results.json").exists() and not list(run.rglob("*.tmp"))
    history = json.loads((run / "history.json").read_text())["processes"]
    assert history[-1]["status"] == "failed" and "ENOSPC" in history[-1]["error"]
    assert "name: digits" in (run / "config.yaml").read_text()


class _FullDiskFile(io.FileIO):
    """A file on a disk that fills up after ``budget`` bytes, as the kernel reports it."""

    def __init__(self, path, mode, budget=4096):
        super().__init__(path, mode)
        self.budget = budget

    def write(self, data):
        if len(data) > self.budget:
            raise ENOSPC
        self.budget -= len(data)
        return super().write(data)


@pytest.mark.e2e
def test_full_disk_at_a_checkpoint_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transfer.engine, "open", _FullDiskFile, raising=False)  # the checkpoint writer's files
    run = tmp_path / "run"
    code = main([*QUICK, "protocol=finetune_strong", "trainer.max_epochs=1", "trainer.batch_size=16",
                 "task.limit_per_split=32", f"run.dir={run}"])
    assert code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "checkpoints/epoch000.ckpt" in lines[0] and "no space left on device (ENOSPC" in lines[0]
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.ckpt")) and not (run / "results.json").exists()
    assert json.loads((run / "history.json").read_text())["processes"][-1]["status"] == "failed"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root ({done.stderr.strip()[:120]}); "
                    "test_full_disk_at_a_checkpoint_is_one_line_naming_the_checkpoint covers it with a patched writer")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.e2e
def test_a_real_full_disk_is_one_line_with_no_traceback(tmp_path, small_disk):
    run = small_disk / "run"
    proc = run_cli(*QUICK, "protocol=finetune_strong", "trainer.max_epochs=1", "trainer.batch_size=16",
                   "task.limit_per_split=32", f"run.dir={run}", f"run.cache_dir={tmp_path / 'cache'}", cwd=tmp_path,
                   timeout=1800)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "ENOSPC" in lines[0] and str(run / "checkpoints") in lines[0], proc.stderr[-3000:]
    assert not list(run.rglob("*.tmp"))


def test_a_task_that_scored_nothing_fails_and_keeps_its_counts(tmp_path, monkeypatch, capsys, caplog):
    counts = {"test/skipped_views": 9, "test/videos_without_views": 3}
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={}, weights={"source": "random"}, counts=counts))
    with caplog.at_level("INFO"):
        assert main([*QUICK, f"run.root={tmp_path}"]) == 2
    assert "metrics=" not in caplog.text and "the run produced no metric" in caplog.text
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "produced no metric" in lines[0] and "test/skipped_views" in lines[0]
    run = _only_run_dir(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and results["counts"] == counts and results["metrics"] == {}
    assert json.loads((run / "history.json").read_text())["processes"][-1]["status"] == "failed"


def test_a_task_stopped_by_bad_data_keeps_what_it_counted(tmp_path, monkeypatch, capsys):
    """A task's error that carries its counts (transfer.tasks.attach_output) still ends in one line of the same
    error type, and results.json holds the counts with status failed, the error and no metric."""
    from transfer.errors import DataError
    from transfer.run import run_one
    from transfer.tasks import attach_output

    counts = {"val/videos": 10, "val/missing": 4}

    def task(ctx):
        error = DataError("split 'val': 4 of 10 videos are unusable.")
        attach_output(error, TaskOutput(metrics={"test/top1": 50.0}, weights={}, counts=counts))
        raise error

    fake_task(monkeypatch, task)
    assert main([*QUICK, f"run.root={tmp_path}"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "4 of 10 videos are unusable" in lines[0] and "Counts are in" in lines[0]
    run = _only_run_dir(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and results["counts"] == counts and results["metrics"] == {}
    assert results["error"] == "split 'val': 4 of 10 videos are unusable."
    assert json.loads((run / "history.json").read_text())["processes"][-1]["status"] == "failed"
    with pytest.raises(DataError, match="Counts are in"):  # the task's own error type reaches the caller
        run_one([*QUICK, f"run.root={tmp_path / 'again'}"])


def test_a_run_without_its_primary_metric_fails_even_with_other_metrics(tmp_path, monkeypatch, capsys, caplog):
    counts = {"images_test_scored": 0, "undecodable_images": 8}
    fake_task(monkeypatch, lambda ctx: TaskOutput(metrics={"val/best": 68.75}, weights={"source": "random"},
                                                  counts=counts, primary_metric="test/top1"))
    assert main([*QUICK, f"run.root={tmp_path}"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "primary metric 'test/top1'" in lines[0] and "images_test_scored" in lines[0]
    run = _only_run_dir(tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "failed" and results["metrics"] == {"val/best": 68.75} and results["counts"] == counts
    assert json.loads((run / "history.json").read_text())["processes"][-1]["status"] == "failed"


def test_a_full_disk_at_results_json_and_history_still_records_the_failure(tmp_path, monkeypatch, capsys):
    """The disk fills while the task runs: no temporary file can be written any more, history.json included."""
    full = []

    def task(ctx):
        full.append(True)
        return TaskOutput(metrics={"test/top1": 87.5}, weights={"source": "random"})

    fake_task(monkeypatch, task)
    real_write = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        if full and self.name.endswith(".tmp"):
            raise ENOSPC
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    assert main([*QUICK, f"run.root={tmp_path}"]) == 2
    assert "87.50" in capsys.readouterr().out
    run = _only_run_dir(tmp_path)
    history = json.loads((run / "history.json").read_text())["processes"]
    assert history[-1]["status"] == "failed" and "results.json" in history[-1]["error"], history[-1]
    assert not (run / "results.json").exists() and not list(run.rglob("*.tmp"))


def test_the_free_space_named_is_measured_after_the_failed_file_is_gone(tmp_path, monkeypatch):
    from transfer import io as tio

    seen, real_usage = [], shutil.disk_usage

    def disk_usage(path):
        seen.append(sorted(p.name for p in pathlib.Path(path).iterdir()))
        return real_usage(path)

    def write_text(self, text, *args, **kwargs):
        self.write_bytes(b"x" * 4096)  # part of the file made it to disk before the disk filled
        raise ENOSPC

    monkeypatch.setattr(tio.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(StorageError, match="no space left on device"):
        tio.atomic_write_text(tmp_path / "results.json", "{}")
    assert seen == [[]], "measured while the failed temporary file still took space"


def test_every_file_written_atomically_gets_the_mode_of_a_plain_open(tmp_path):
    from transfer.io import atomic_path, atomic_write_text
    from transfer.weights import write_safetensors

    mask = os.umask(0o022)
    os.umask(mask)
    with open(tmp_path / "plain", "w"):
        pass
    write_safetensors({"w": torch.ones(2)}, tmp_path / "final.safetensors")  # safetensors recreates its file
    atomic_write_text(tmp_path / "results.json", "{}")
    with atomic_path(tmp_path / "x.pt") as tmp:
        torch.save({}, tmp)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_weights_holding_nan_are_refused_naming_the_file_and_tensor(tmp_path):
    spec = BACKBONES.get("resnet50")
    sd = timm.create_model(spec.arch, pretrained=False, **spec.arch_kwargs).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet50", weights=str(path))
    assert str(path) in str(err.value) and "layer1.0.conv1.weight" in str(err.value) and "NaN" in str(err.value)


class _Diverging(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).mean()
        return loss * float("nan") if self.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_diverged_loss_stops_the_run_with_one_message(tmp_path):
    cfg = validate(compose([*QUICK, "protocol=finetune_strong", "trainer.max_epochs=2", "trainer.channels_last=false"]))
    ctx = RunContext(cfg=cfg, run_dir=tmp_path,
                     logger=RunLogger(cfg.logger.wandb, tmp_path, name="n", group="g", job_type="j", config={}))
    trainer = build_trainer(ctx)
    with pytest.raises(TransferError, match="training diverged: the loss is not finite"):
        trainer.fit(_Diverging(), train_dataloaders=DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=4))
    assert trainer.current_epoch == 0, "stopped in the epoch it diverged"
