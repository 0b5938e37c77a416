"""The engine (transfer/engine.py): the Trainer ``build_trainer`` makes from a TrainerConfig, and its checkpoints."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

import transfer.engine as engine
from transfer.config import TrainerConfig
from transfer.engine import (
    ChannelsLast,
    FinalWeights,
    FiniteLoss,
    build_trainer,
    resolve_precision,
    resume_path,
)
from transfer.errors import ConfigError, TransferError
from transfer.loaders import build_loader
from transfer.reproducible import ReproducibleEpochs
from transfer.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT


def _ctx(tmp_path: Path, resume: bool = False, **trainer) -> SimpleNamespace:
    """What build_trainer reads of a RunContext: the trainer section, the run directory, a logger without W&B."""
    cfg = TrainerConfig(**{"accelerator": "cpu", "progress_bar": False, **trainer})
    return SimpleNamespace(cfg=SimpleNamespace(trainer=cfg, resume=resume), run_dir=tmp_path,
                           logger=SimpleNamespace(lightning=lambda: None), record=None)


@pytest.mark.parametrize("bf16_cpu, expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_precision_on_cpu_follows_the_cpu_bf16_support(monkeypatch, tmp_path, bf16_cpu, expected):
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: bf16_cpu)
    assert resolve_precision(TrainerConfig(), "cpu") == expected
    assert build_trainer(_ctx(tmp_path)).precision == expected


@pytest.mark.parametrize("bf16_gpu, expected", [(False, "16-mixed"), (True, "bf16-mixed")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_precision(TrainerConfig(), "cuda") == expected


def test_an_explicit_precision_is_kept_and_32_means_32_true():
    assert resolve_precision(TrainerConfig(precision="32"), "cpu") == "32-true"
    assert resolve_precision(TrainerConfig(precision="16-mixed"), "cuda") == "16-mixed"


def test_one_device_runs_without_ddp_and_two_devices_choose_ddp(tmp_path):
    one = build_trainer(_ctx(tmp_path / "a"))
    assert one.num_devices == 1 and "DDP" not in type(one.strategy).__name__
    two = build_trainer(_ctx(tmp_path / "b", devices=2))
    assert two.num_devices == 2 and type(two.strategy).__name__ == "DDPStrategy"


def test_an_explicit_strategy_is_passed_to_lightning(tmp_path):
    trainer = build_trainer(_ctx(tmp_path, devices=2, strategy="ddp_spawn"))
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.strategy._start_method == "spawn"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_accelerator_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="trainer.accelerator='gpu' but no CUDA device is visible"):
        build_trainer(_ctx(tmp_path, accelerator="gpu"))


def test_every_trainer_carries_the_run_callbacks_and_the_config_values(tmp_path):
    trainer = build_trainer(_ctx(tmp_path, seed=11, max_epochs=3, limit_train_batches=2, channels_last=True,
                                 progress_bar=True, log_every_n_steps=4))
    kinds = {type(c) for c in trainer.callbacks}
    assert {FiniteLoss, FinalWeights, ChannelsLast, TQDMProgressBar} <= kinds
    assert next(c for c in trainer.callbacks if isinstance(c, ReproducibleEpochs)).seed == 11
    assert trainer.max_epochs == 3 and trainer.limit_train_batches == 2 and trainer.log_every_n_steps == 4
    bar = next(c for c in trainer.callbacks if isinstance(c, TQDMProgressBar))
    assert bar.refresh_rate == 2
    quiet = build_trainer(_ctx(tmp_path / "q", channels_last=False))
    assert not {ChannelsLast, TQDMProgressBar} & {type(c) for c in quiet.callbacks}
    # keyword overrides win over the config (depth trains by steps: max_epochs=-1)
    assert build_trainer(_ctx(tmp_path / "o"), max_epochs=-1, max_steps=5).max_steps == 5


class _Tiny(L.LightningModule):
    """A linear model whose logged ``val/score`` per epoch is set by the test (to choose the best epoch)."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.scores = scores

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        self.log("val/score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return build_loader(torch.randn(4, 2), batch_size=2, num_workers=0, train=True)


@pytest.mark.parametrize("monitor, kept", [(None, "epoch002.ckpt"), ("val/score", "epoch001.ckpt")])
def test_one_epoch_checkpoint_is_kept_beside_last_and_the_final_weights(tmp_path, monitor, kept):
    trainer = build_trainer(_ctx(tmp_path, max_epochs=3, log_every_n_steps=1), monitor=monitor, mode="max",
                            subdir="part")
    trainer.fit(_Tiny([0.1, 0.9, 0.5]))
    folder = tmp_path / CHECKPOINT_DIR / "part"
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept, LAST_CHECKPOINT, engine.FINAL_WEIGHTS])
    assert torch.load(folder / LAST_CHECKPOINT, weights_only=True)["epoch"] == 2
    assert engine.progress_of(trainer)["best_checkpoint"] == str(folder / kept)


def test_resume_path_is_none_unless_asked_and_refuses_a_damaged_last_checkpoint(tmp_path):
    assert resume_path(_ctx(tmp_path, resume=False)) is None
    assert resume_path(_ctx(tmp_path, resume=True)) is None  # nothing to continue: this part starts fresh
    last = tmp_path / CHECKPOINT_DIR / LAST_CHECKPOINT
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(TransferError, match="cannot resume from"):
        resume_path(_ctx(tmp_path, resume=True))
