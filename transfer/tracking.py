"""W&B tracking that never costs a result: offline by default, online falls back to offline."""
from __future__ import annotations

import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from transfer.config import WandbConfig
from transfer.io import atomic_write_text

log = logging.getLogger(__name__)
RUN_ID_FILE = "wandb_run_id.txt"


def is_global_zero() -> bool:
    """Rank 0 of a distributed launch (torchrun, SLURM, Lightning's launcher), or a single process."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var) not in (None, ""):
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def has_credentials() -> bool:
    """Whether W&B has credentials for its host without asking anyone (env, settings file, ~/.netrc)."""
    import wandb

    if wandb.run is not None:  # a live run is already authenticated (or offline): nothing to ask
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 - a malformed key or settings file: online would fail too
        return False


class RunLogger:
    """One W&B run per suite run; ``run`` is None when disabled or on ranks other than 0."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, *, name: str, group: str, job_type: str,
                 config: dict[str, Any]):
        self.cfg = cfg
        self.run = None
        self.mode = "disabled"
        if cfg.mode == "disabled" or not is_global_zero():
            return
        import wandb

        # An exported-but-empty WANDB_* variable (`WANDB_MODE=`) means "not set" to a shell user, but wandb
        # validates it as a value and stops with a pydantic traceback; the run's config says what to do.
        for var in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
            del os.environ[var]
        mode = cfg.mode
        if mode == "online" and not has_credentials():
            # wandb.init would otherwise show its interactive login menu in a terminal and wait for ever.
            warnings.warn("W&B online mode found no usable API key (WANDB_API_KEY, `wandb login` or ~/.netrc); "
                          f"logging offline instead. Upload later with: wandb sync {run_dir / 'wandb'}",
                          stacklevel=2)
            mode = "offline"
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        atomic_write_text(id_file, run_id)
        kwargs = dict(project=cfg.project, entity=cfg.entity, name=name, group=cfg.group or group,
                      job_type=job_type, tags=list(cfg.tags), config=config, dir=str(run_dir), id=run_id,
                      resume="allow", reinit="finish_previous")
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=cfg.init_timeout), **kwargs)
            self.mode = mode
        except Exception as e:  # noqa: BLE001 - no account, no network, a bad key: all fall back
            if mode != "online":
                raise
            warnings.warn(f"W&B online mode failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"logging offline instead. Upload later with: wandb sync {run_dir / 'wandb'}",
                          stacklevel=2)
            # wandb-core keeps the failed attempt's run id reserved in this process ("run ID ... is in use"),
            # so the offline run takes a fresh one; the id file follows so a resumed run finds it.
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id)
            self.run = wandb.init(mode="offline", **{**kwargs, "id": run_id})
            self.mode = "offline"

    def lightning(self):
        """A Lightning logger writing to this run, or False when W&B is off."""
        if self.run is None:
            return False
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run, log_model=False)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001 - results.json is already written; a failed upload must not fail the run
                warnings.warn(f"W&B could not finish the run ({type(e).__name__}: {e}); the run's files stay in "
                              f"{Path(self.run.dir).parent}.", stacklevel=2)
                return
            if self.mode == "offline":
                log.info("W&B run saved offline; upload with: wandb sync %s", Path(self.run.dir).parent)
