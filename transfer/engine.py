"""The one place that builds a Lightning Trainer from the config; every task that trains uses it.

Checkpoints: ``checkpoints/<subdir>/last.ckpt`` holds the state after the latest epoch (rewritten every
epoch), ``epoch<NNN>.ckpt`` the best epoch by the adapter's monitor (every epoch without one) and
``final.safetensors`` the module's weights when training ends. ``resume=true`` continues from
``last.ckpt`` and replays the uninterrupted run exactly (:mod:`transfer.reproducible`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar, WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from transfer.config import TrainerConfig, resolve_accelerator
from transfer.errors import ConfigError, TransferError
from transfer.io import atomic_path
from transfer.reproducible import ReproducibleEpochs
from transfer.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT, checkpoint_problem, nonfinite_tensors
from transfer.tasks import RunContext
from transfer.weights import write_safetensors

FINAL_WEIGHTS = "final.safetensors"
# What a checkpoint restores into the model and optimisers (WeightAveraging adds the last two).
RESTORED_STATES = ("state_dict", "optimizer_states", "current_model_state", "averaging_state")
log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 instructions (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


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
    """A Trainer for ``ctx``: accelerator, devices/nodes (DDP when > 1), precision, checkpoints, progress bar.

    Every trainer it builds writes ``last.ckpt`` each epoch, the best epoch by ``monitor``, and the final
    weights, makes its training epochs reproducible from ``trainer.seed`` and records its progress in the
    run's ``history.json``.
    """
    cfg = ctx.cfg.trainer
    accelerator = resolve_accelerator(cfg)
    multi = cfg.num_nodes > 1 or (cfg.devices == "auto" and accelerator != "cpu" and torch.cuda.device_count() > 1) \
        or (isinstance(cfg.devices, int) and cfg.devices > 1)
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if multi else "auto")
    ckpt_dir = Path(ctx.run_dir) / CHECKPOINT_DIR / subdir
    # The best epoch first: last.ckpt, written after it, then holds the best-epoch bookkeeping of this epoch.
    # One epoch file at most (the best by ``monitor``, else the latest): a checkpoint per epoch would fill a disk
    # (a ResNet-RS-50 checkpoint with optimizer state is ~0.3 GB; 100 epochs would be 30 GB).
    best = RunCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                         monitor=monitor, mode=mode, save_top_k=1, enable_version_counter=False)
    last = LastCheckpoint(dirpath=ckpt_dir, filename=LAST_CHECKPOINT.removesuffix(".ckpt"), save_top_k=1,
                          enable_version_counter=False)
    record = getattr(ctx, "record", None)
    all_callbacks = [best, last, ProgressRecord(subdir=subdir, record=record), ReproducibleEpochs(cfg.seed),
                     FiniteLoss(), FinalWeights(ckpt_dir / FINAL_WEIGHTS), *(callbacks or [])]
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
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError) as e:  # settings vs this machine or launcher
        raise ConfigError(f"the trainer settings cannot run here: {str(e).splitlines()[0]}") from None


def progress_of(trainer: L.Trainer) -> dict:
    """Resume facts for results.json: the first epoch trained by this process, the final step, the files."""
    record = next(c for c in trainer.callbacks if isinstance(c, ProgressRecord))
    final = next(c for c in trainer.callbacks if isinstance(c, FinalWeights))
    best = trainer.checkpoint_callback
    return {"first_epoch_this_process": record.first_epoch, "epochs": trainer.current_epoch,
            "global_step": trainer.global_step, "best_checkpoint": best.best_model_path if best else None,
            "final_weights": final.written, "final_weights_sha256": final.sha256}


def resume_path(ctx: RunContext, subdir: str = "") -> str | None:
    """The checkpoint to continue from when ``resume=true``; None starts this part fresh.

    Raises :class:`TransferError` for a ``last.ckpt`` that exists but cannot be read back.
    """
    if not ctx.cfg.resume:
        return None
    path = Path(ctx.run_dir) / CHECKPOINT_DIR / subdir / LAST_CHECKPOINT
    if not path.exists():
        log.info("resume=true: no %s in %s; this part trains from its start", LAST_CHECKPOINT, path.parent)
        return None
    if problem := checkpoint_problem(path):
        raise TransferError(f"cannot resume from {str(path)!r}: {problem}. Move it aside to train this part "
                            "from its start, or resume from a copy of the run that holds a complete file.")
    return str(path)


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose bookkeeping follows the run directory when it is moved or copied.

    Lightning keeps absolute paths in the checkpoint; from another directory it would write
    ``last-v1.ckpt`` and test the original location's "best" file. Here the saved paths are re-rooted.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and os.path.normpath(old) != os.path.normpath(new):
            def move(p):
                return os.path.join(new, os.path.relpath(p, old)) if isinstance(p, str) and p.startswith(old) else p
            state_dict = {**state_dict, "dirpath": new,
                          **{k: move(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path",
                                                                  "last_model_path") if k in state_dict},
                          "best_k_models": {move(k): v for k, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


class LastCheckpoint(RunCheckpoint):
    """``last.ckpt`` after every epoch. (Lightning's ``save_last`` with a monitor rewrites it only when the
    monitored value improves, so it could hold an old epoch.)"""


class ProgressRecord(Callback):
    """Which epoch this process started training at, and each fit in the run's history.json."""

    def __init__(self, *, subdir: str = "", record=None) -> None:
        self.first_epoch: int | None = None
        self.subdir, self.record = subdir, record
        self._fresh: list[list[dict]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # The optimisers exist (from this process's config) and are not yet overwritten by the checkpoint's.
        self._fresh = [[_hyper(g) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path:
            apply_hyperparameters(trainer, self._fresh)
        if self.record is not None and trainer.is_global_zero:
            self.record.add_fit({"checkpoints": f"{CHECKPOINT_DIR}/{self.subdir}".rstrip("/"),
                                 "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
                                 "first_epoch": trainer.current_epoch,
                                 "optimizer": [[_hyper(g) for g in opt.param_groups] for opt in trainer.optimizers]})

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.record is not None:
            self.record.beat()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.record is not None:
            self.record.beat(force=True)


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, type(None)))}


def apply_hyperparameters(trainer: L.Trainer, fresh: list[list[dict]]) -> None:
    """After a resume, use this process's optimiser settings, keep the checkpoint's progress.

    Lightning restores each optimiser's param groups (lr, momentum, weight decay) from the checkpoint,
    which would silently keep the old values when ``resume_allow_changes=true`` changed them. The
    checkpoint's schedule position is kept: the current lr is rescaled by new/old ``initial_lr``.
    Without a change every value is already equal and nothing moves.
    """
    configs = trainer.lr_scheduler_configs
    for opt, groups in zip(trainer.optimizers, fresh):
        scheds = [c.scheduler for c in configs if c.scheduler.optimizer is opt]
        for j, (group, new) in enumerate(zip(opt.param_groups, groups)):
            old_initial, new_initial = group.get("initial_lr"), new.get("initial_lr")
            for k, v in new.items():
                if k not in ("lr", "initial_lr"):
                    group[k] = v
            if old_initial and new_initial and old_initial != new_initial:
                group["lr"] = group["lr"] * new_initial / old_initial
                group["initial_lr"] = new_initial
                for sched in scheds:
                    if hasattr(sched, "base_lrs"):
                        sched.base_lrs[j] = new_initial
                    if hasattr(sched, "_last_lr"):
                        sched._last_lr[j] = group["lr"]
            elif old_initial is None and group["lr"] != new["lr"]:  # no scheduler: the lr is the setting
                group["lr"] = new["lr"]


class FiniteLoss(Callback):
    """Stop a diverged run with one message instead of scoring NaN weights.

    The check costs no synchronisation per step: a flag accumulates on the device and is read at
    logging steps and at the end of each epoch.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad = bad if self._bad is None else self._bad | bad
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer) -> None:
        if self._bad is not None and bool(self._bad):
            raise TransferError(f"training diverged: the loss is not finite (NaN or inf) by epoch "
                                f"{trainer.current_epoch}, step {trainer.global_step}. Lower the learning rate "
                                "(protocol.lr), check the input data and weights for NaN, or use "
                                "trainer.precision=32-true.")


class FinalWeights(Callback):
    """The module's weights when training ends, as safetensors (readable without unpickling anything).

    They are the same whatever path reached the end: a fit resumed from a checkpoint with no step left (a run
    resumed after it finished, or killed between its last checkpoint and its end) trains nothing, so Lightning
    calls no ``on_train_end``; the end-of-training step of a weight-averaging callback (EMA: the averaged
    weights replace the current ones) is then applied here, to the module that is tested as well.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.written: str | None = None
        self.sha256: str | None = None
        self._trained = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._trained = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._trained = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self._trained:
            for cb in trainer.callbacks:
                if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                    cb.on_train_end(trainer, pl_module)
        state = trainer.strategy.lightning_module_state_dict()  # gathers sharded weights; every rank calls it
        if not trainer.is_global_zero:
            return
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()
                   if isinstance(v, torch.Tensor)}
        self.sha256 = write_safetensors(tensors, self.path, metadata={"epochs": str(trainer.current_epoch),
                                                                     "global_step": str(trainer.global_step)})
        self.written = str(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place: a killed run never leaves half a file.

    Written through a Python file object, so a full disk surfaces as ``OSError(ENOSPC)`` (turned into one
    :class:`~transfer.errors.StorageError` line) rather than torch's ``unexpected pos``.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Every checkpoint Lightning reads back (a resume, ``trainer.test(ckpt_path="best")``) is checked first:
        each zip member's CRC, then the weights and optimiser states it restores must be finite.

        Raises :class:`TransferError` naming the file and the damaged member or tensor.
        """
        if problem := checkpoint_problem(Path(path)):
            raise TransferError(f"cannot read checkpoint {str(path)!r}: {problem}. Move it aside (a resume then starts "
                                "that part from its start), or use a complete copy of the run.")
        kwargs = {} if map_location is None else {"map_location": map_location}
        checkpoint = super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        used = {k: checkpoint[k] for k in RESTORED_STATES if k in checkpoint}
        if bad := nonfinite_tensors(used):
            raise TransferError(f"cannot read checkpoint {str(path)!r}: {len(bad)} tensor(s) hold NaN or inf "
                                f"({', '.join(bad[:3])}); the run diverged before it was saved. Resume from an "
                                "earlier checkpoint, or start the run again with a lower protocol.lr.")
        return checkpoint

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
            except RuntimeError as e:  # torch's zip writer reports the failed write as "unexpected pos"
                cause = _os_error_in(e)
                if cause is None:
                    raise
                raise cause from None


def _os_error_in(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def seed_everything(cfg: TrainerConfig) -> None:
    """Seed torch, numpy, ``random`` and the DataLoader workers from ``trainer.seed``: called once per run, by
    ``transfer.run`` before the adapter starts (adapters do not reseed)."""
    os.environ.setdefault("PL_GLOBAL_SEED", str(cfg.seed))
    L.seed_everything(cfg.seed, workers=True, verbose=False)


class FreezesBackbone:
    """Mixin for a :class:`lightning.LightningModule` (list it first) that may keep one submodule frozen.

    :meth:`freeze_submodule` turns off the submodule's gradients and puts it in eval mode, so its batch norms
    keep the loaded running statistics (and ``num_batches_tracked``) and its dropout / stochastic depth is off.
    Lightning 2.x never calls ``module.train()`` during ``fit`` (it flips ``.training`` per submodule and
    restores captured flags after validation), so overriding ``train()`` alone does not hold: eval mode is put
    back at the start of every training epoch and batch, and on every ``train()`` call.
    """

    _frozen_submodule: str | None = None  # dotted name of the frozen submodule (a name: not registered twice)

    def freeze_submodule(self, name: str) -> None:
        """Freeze ``self.get_submodule(name)``; :class:`AttributeError` when there is no such submodule."""
        module = self.get_submodule(name)
        module.requires_grad_(False)
        module.eval()
        self._frozen_submodule = name

    def _hold_frozen_in_eval(self) -> None:
        if self._frozen_submodule is not None:
            self.get_submodule(self._frozen_submodule).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._hold_frozen_in_eval()
        return self

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._hold_frozen_in_eval()

    def on_train_batch_start(self, batch, batch_idx: int):
        self._hold_frozen_in_eval()
        return super().on_train_batch_start(batch, batch_idx)
