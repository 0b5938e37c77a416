"""The one place that builds a Lightning Trainer from the config; every task that trains uses it."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from transfer.config import TrainerConfig, check_accelerator
from transfer.io import atomic_path
from transfer.tasks import RunContext

CHECKPOINT_DIR = "checkpoints"


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 instructions (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_accelerator(cfg: TrainerConfig) -> str:
    if cfg.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_accelerator(cfg)
    return cfg.accelerator


def resolve_precision(cfg: TrainerConfig, accelerator: str) -> str:
    """``auto`` -> bf16-mixed where the hardware supports it, 16-mixed on older GPUs, else 32-true."""
    if cfg.precision != "auto":
        return "32-true" if cfg.precision == "32" else cfg.precision
    if accelerator in ("cuda", "gpu"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def autocast_dtype(cfg: TrainerConfig, accelerator: str) -> torch.dtype | None:
    """The autocast dtype matching the resolved precision (for work done outside Lightning)."""
    precision = resolve_precision(cfg, accelerator)
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


class ChannelsLast(Callback):
    """Put the model in channels_last memory format; convolutions on CPU and CUDA run faster so.

    3D models (5-D conv weights) take ``channels_last_3d``.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        is_3d = any(p.ndim == 5 for p in pl_module.parameters())
        pl_module.to(memory_format=torch.channels_last_3d if is_3d else torch.channels_last)

    on_test_start = on_validation_start = on_predict_start = on_fit_start


def build_trainer(ctx: RunContext, *, callbacks: list[Callback] | None = None, monitor: str | None = None,
                  mode: str = "max", subdir: str = "", **overrides) -> L.Trainer:
    """A Trainer for ``ctx``: accelerator, devices/nodes (DDP when > 1), precision, checkpoints, progress bar."""
    cfg = ctx.cfg.trainer
    accelerator = resolve_accelerator(cfg)
    multi = cfg.num_nodes > 1 or (cfg.devices == "auto" and accelerator != "cpu" and torch.cuda.device_count() > 1) \
        or (isinstance(cfg.devices, int) and cfg.devices > 1)
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if multi else "auto")
    ckpt_dir = Path(ctx.run_dir) / CHECKPOINT_DIR / subdir
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                 save_last=True, monitor=monitor, mode=mode, save_top_k=1 if monitor else -1)
    all_callbacks = [checkpoint, ProgressRecord(), *(callbacks or [])]
    if cfg.progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.log_every_n_steps // 2)))
    if cfg.channels_last:
        all_callbacks.append(ChannelsLast())
    logger = ctx.logger.lightning()
    if logger:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs = dict(plugins=[AtomicCheckpointIO()], accelerator=accelerator, devices=cfg.devices,
                  num_nodes=cfg.num_nodes, strategy=strategy,
                  precision=resolve_precision(cfg, accelerator), max_epochs=cfg.max_epochs, max_steps=cfg.max_steps,
                  limit_train_batches=cfg.limit_train_batches, limit_val_batches=cfg.limit_eval_batches,
                  limit_test_batches=cfg.limit_eval_batches, log_every_n_steps=cfg.log_every_n_steps,
                  deterministic=cfg.deterministic, enable_progress_bar=cfg.progress_bar,
                  default_root_dir=str(ctx.run_dir), callbacks=all_callbacks, logger=logger,
                  enable_model_summary=False)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def progress_of(trainer: L.Trainer) -> dict:
    """Resume facts for results.json: the first epoch trained by this process and the final step."""
    record = next(c for c in trainer.callbacks if isinstance(c, ProgressRecord))
    return {"first_epoch_this_process": record.first_epoch, "epochs": trainer.current_epoch,
            "global_step": trainer.global_step}


def resume_path(ctx: RunContext, subdir: str = "") -> str | None:
    """The checkpoint to continue from when ``resume=true``; None starts fresh."""
    if not ctx.cfg.resume:
        return None
    path = Path(ctx.run_dir) / CHECKPOINT_DIR / subdir / "last.ckpt"
    return str(path) if path.exists() else None


class ProgressRecord(Callback):
    """Which epoch this process started training at: shows that ``resume=true`` continued a run."""

    def __init__(self) -> None:
        self.first_epoch: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place: a killed run never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def seed_everything(cfg: TrainerConfig) -> None:
    os.environ.setdefault("PL_GLOBAL_SEED", str(cfg.seed))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
