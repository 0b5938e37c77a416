"""Run directories: where a run writes, which one ``resume=true`` continues, and what every process did.

Layout of a run directory::

    config.yaml        the configuration the latest process ran
    results.json       written last, when the run finished
    history.json       one entry per process that worked on the run: start, host, wall time, the
                       checkpoint it resumed from, the config keys it changed, its status
    history/           config.<i>.yaml for process i; results.<i>.json when a resumed run superseded it
    checkpoints/       last.ckpt (the latest epoch), the best epoch, final.safetensors
    features/          frozen protocols with protocol.cache=false: finished feature shards
                       (<split folder>/shard-<i>-of-<n>.safetensors)
    wandb/

Everything here is decided by :func:`plan_run_dir` before anything is written; :func:`open_run_dir`
then creates the directory and the records.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from transfer.errors import ConfigError, StorageError, TransferError
from transfer.io import atomic_write_json, atomic_write_text, remove_orphan_temporaries

log = logging.getLogger(__name__)

RUN_DIR_ENV = "TRANSFER_RUN_DIR"  # shared with the processes Lightning's DDP launcher starts
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.json"
HISTORY_DIR = "history"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FEATURE_DIR = "features"  # tasks/classification/features.py cache_path(run_dir, key) with protocol.cache=false

# Keys that change how a run is watched, not what it computes: they may differ on resume.
# (trainer.num_workers: the training epochs do not depend on it, see transfer/reproducible.py.)
NEUTRAL_KEYS = ("resume", "resume_allow_changes", "run.", "logger.", "trainer.progress_bar",
                "trainer.log_every_n_steps", "trainer.num_workers")
# Keys that name another run: never continued, even with resume_allow_changes=true.
IDENTITY_KEYS = ("task.name", "task.adapter", "task.dataset", "backbone.name", "backbone.weights", "protocol.name")


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (missing, truncated, not a torch checkpoint), or None if it can.

    Reads only the zip directory at the end of the file: a file cut short by a copy or a full disk fails.
    """
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete checkpoint ({e})"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "not a torch checkpoint (no data.pkl)"
    return None


CHECKPOINT_SUFFIXES = (".ckpt", ".pth")  # Lightning's and Detectron2's training checkpoints (torch zip files)


def usable_checkpoints(run_dir: Path) -> list[Path]:
    """Every complete training checkpoint under ``run_dir/checkpoints`` (Lightning's ``last.ckpt`` is the one
    the shared engine resumes from; Detectron2 keeps its own ``.pth`` files there)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and checkpoint_problem(p) is None)


def feature_shards(run_dir: Path) -> list[Path]:
    """Every finished feature shard a frozen protocol (linear probe, k-NN) wrote into ``run_dir`` under
    ``protocol.cache=false``: ``features/<split folder>/shard-*.safetensors`` (a shard is written atomically,
    so an unfinished one is only a temporary file). The protocol checks each one's key and sha256 on reuse."""
    root = Path(run_dir) / FEATURE_DIR
    return sorted(p for p in root.glob("*/shard-*.safetensors") if p.is_file()) if root.is_dir() else []


def resumable_state(run_dir: Path) -> list[Path]:
    """What ``resume=true`` continues from: complete training checkpoints (:func:`usable_checkpoints`) and
    finished feature shards (:func:`feature_shards`)."""
    return usable_checkpoints(run_dir) + feature_shards(run_dir)


def _holds_a_run(path: Path) -> str | None:
    if (path / RESULTS_FILE).exists():
        return RESULTS_FILE
    ckpts = path / CHECKPOINT_DIR
    if ckpts.is_dir() and any(p.suffix in (*CHECKPOINT_SUFFIXES, ".safetensors") for p in ckpts.rglob("*")):
        return "checkpoints"
    return None


# ---------------------------------------------------------------------------------------------------
# Choosing the directory


def launch_name(sweep_index: int | None = None) -> str | None:
    """A name every rank of one multi-process launch computes alike, or None for a single process.

    SLURM: job (or array job), array task and job step; torchrun: its run id (or rendezvous endpoint).
    The sweep index of ``-m`` keeps the runs of one sweep apart.
    """
    env = os.environ
    parts: list[str] = []
    if int(env.get("SLURM_NTASKS") or 1) > 1 and env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            parts += [f"job{env['SLURM_ARRAY_JOB_ID']}", f"task{env['SLURM_ARRAY_TASK_ID']}"]
        else:
            parts.append(f"job{env['SLURM_JOB_ID']}")
        step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
        if step:
            parts.append(f"step{step}")
    elif int(env.get("WORLD_SIZE") or 1) > 1:
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        if run_id and run_id != "none":
            parts.append(f"torchrun-{run_id}")
        else:
            parts.append(f"torchrun-{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}")
    else:
        return None
    if sweep_index is not None:
        parts.append(f"sweep{sweep_index}")
    return "-".join(parts).replace(os.sep, "_")


def _timestamped(parent: Path, sweep_index: int | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if sweep_index is not None:
        stamp += f"-sweep{sweep_index}"
    path, n = parent / stamp, 1
    while path.exists():
        path, n = parent / f"{stamp}-{n}", n + 1
    return path


def _pick_resumable(parent: Path) -> tuple[Path, str]:
    """The newest run under ``parent`` with a usable checkpoint and no results.json; and what was skipped."""
    runs = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True) \
        if parent.is_dir() else []
    skipped = []
    for run in runs:
        if (run / RESULTS_FILE).exists():
            skipped.append(f"{run.name} (finished: has {RESULTS_FILE})")
        elif not resumable_state(run):
            skipped.append(f"{run.name} (no usable checkpoint or feature shard)")
        else:
            note = f"; skipped newer: {', '.join(skipped)}" if skipped else ""
            return run, note
    raise ConfigError("resume=true but no interrupted run with a usable checkpoint or finished feature shards is "
                      f"under {str(parent)!r}"
                      + (f" (found: {', '.join(skipped[:5])})" if skipped else "")
                      + ". Pass the run's directory as run.dir=PATH, or start a new run without resume=true.")


@dataclass
class RunDirPlan:
    """Where this process writes and why; decided before anything is written."""

    path: Path
    resume: bool
    changed: dict[str, list] = field(default_factory=dict)  # key -> [value in the run, value now]
    inherited: bool = False  # a process started by Lightning's launcher: the parent decided everything
    note: str = ""


def plan_run_dir(cfg, *, sweep_index: int | None = None) -> RunDirPlan:
    """Resolve the run directory and check it can be used, writing nothing.

    Raises :class:`ConfigError` for a directory that holds another run (without ``resume=true``), a
    resume with nothing to resume, or a resume whose configuration differs from the run's.
    """
    if os.environ.get(RUN_DIR_ENV):
        return RunDirPlan(Path(os.environ[RUN_DIR_ENV]), resume=cfg.resume, inherited=True)
    parent = Path(cfg.run.root).expanduser() / cfg.task.name / f"{cfg.backbone.name}-{cfg.protocol.name}"
    note = ""
    if cfg.run.dir:
        path = Path(cfg.run.dir).expanduser()
        if cfg.resume and not resumable_state(path):
            found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())[:5] \
                if path.is_dir() else []
            raise ConfigError(f"resume=true but run.dir={str(path)!r} holds no usable checkpoint under "
                              f"{CHECKPOINT_DIR}/ and no finished feature shard under {FEATURE_DIR}/ (found: "
                              f"{found or 'nothing'}); the run stopped before its first checkpoint, or this is not "
                              "its directory. Run without resume=true to start it afresh.")
    elif cfg.resume:
        path, skipped = _pick_resumable(parent)
        state = usable_checkpoints(path)
        if state:
            newest = max(state, key=lambda p: p.stat().st_mtime)
            what = f"newest checkpoint {newest.relative_to(path)}"
        else:
            what = f"{len(feature_shards(path))} finished feature shard(s) under {FEATURE_DIR}/"
        note = f"resume=true: continuing {path} ({what}){skipped}"
    else:
        name = launch_name(sweep_index)
        path = parent / name if name else _timestamped(parent, sweep_index)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} exists and is not a folder; pass another run.dir.")
    if not cfg.resume and (what := _holds_a_run(path)):
        raise ConfigError(f"run directory {str(path)!r} already holds a run ({what}); nothing was overwritten. "
                          "Continue it with resume=true, or pass another run.dir (two launches of one job step "
                          "resolve to the same directory: give each its own srun step or run.dir).")
    changed = config_changes(cfg, path) if cfg.resume else {}
    return RunDirPlan(path, resume=cfg.resume, changed=changed, note=note)


# ---------------------------------------------------------------------------------------------------
# Configuration changes on resume


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_tree(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_changes(cfg, run_dir: Path) -> dict[str, list]:
    """Keys whose value differs from the run's ``config.yaml``; raises unless they may change.

    Raises :class:`ConfigError` listing the keys when ``resume_allow_changes`` is false, or when an
    identity key (task, backbone, weights, protocol, or one of the adapter's ``model_keys``) differs.
    """
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.exists():
        return {}
    try:
        old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    except Exception as e:  # noqa: BLE001 - any parse error of a damaged file
        raise ConfigError(f"cannot read {str(saved)!r} to compare the configuration before resuming: "
                          f"{str(e).splitlines()[0]}") from None
    new = _flatten(config_tree(cfg))
    absent = "<absent>"
    changed = {k: [old.get(k, absent), new.get(k, absent)] for k in sorted(set(old) | set(new))
               if old.get(k, absent) != new.get(k, absent) and not k.startswith(NEUTRAL_KEYS)}
    listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    from transfer.tasks import TASKS

    model_keys = TASKS.get(cfg.task.adapter).model_keys
    identity = [k for k in changed if k in IDENTITY_KEYS or k in model_keys
                or k.startswith(tuple(m for m in model_keys if m.endswith(".")))]
    if identity:
        raise ConfigError(f"resume=true: {', '.join(identity)} differ(s) from the run in {str(run_dir)!r} "
                          f"({listing}); that is another run, not a continuation. Start it without resume=true.")
    if changed and not cfg.resume_allow_changes:
        raise ConfigError(f"resume=true: the configuration differs from the run's {str(saved)!r}: {listing}. "
                          "Resume with the run's values, or add resume_allow_changes=true to continue with the "
                          "new ones from the resumed epoch on (recorded in history.json).")
    return changed


# ---------------------------------------------------------------------------------------------------
# The record of every process


class RunRecord:
    """``history.json`` of a run directory; only the writing process (global rank 0) touches the file.

    Wall time is saved at every call of :meth:`beat` (at most every ``interval`` seconds unless forced),
    so a killed process leaves its time up to its last beat (the engine beats every few batches and at
    every epoch end and checkpoint).
    """

    def __init__(self, run_dir: Path, *, writer: bool, interval: float = 30.0):
        self.path = Path(run_dir) / HISTORY_FILE
        self.writer, self.interval = writer, interval
        self._start = time.monotonic()
        self._last_save = float("-inf")
        self._warned = False
        self.processes: list[dict] = self._read() if writer else []
        self.index = len(self.processes)
        self.entry: dict[str, Any] = {}

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("processes"), list):
                return data["processes"]
        except (OSError, json.JSONDecodeError):
            pass
        warnings.warn(f"{self.path} is damaged; the history of earlier processes is lost.", stacklevel=2)
        return []

    def start(self, cfg, plan: RunDirPlan) -> None:
        """Record this process and its configuration (``history/config.<i>.yaml`` and ``config.yaml``)."""
        if not self.writer:
            return
        text = cfg.to_yaml()
        config_rel = f"{HISTORY_DIR}/config.{self.index}.yaml"
        atomic_write_text(self.path.parent / config_rel, text)
        atomic_write_text(self.path.parent / CONFIG_FILE, text)
        self.entry = {"index": self.index, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                      "host": socket.gethostname(), "pid": os.getpid(), "config": config_rel,
                      "resume": plan.resume, "changed": plan.changed, "fits": [], "wall_time_s": 0.0,
                      "status": "running"}
        self.processes.append(self.entry)
        self.beat(force=True)

    def add_fit(self, fit: dict) -> None:
        """One ``trainer.fit`` of this process: its checkpoint folder, resumed-from file, first epoch, optimiser."""
        if self.writer and self.entry:
            self.entry["fits"].append(fit)
            self.beat(force=True)

    def beat(self, *, force: bool = False) -> None:
        if not self.writer or not self.entry:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self.interval:
            return
        self.entry["wall_time_s"] = round(now - self._start, 3)
        self._last_save = now
        try:
            atomic_write_json(self.path, {"processes": self.processes})
        except StorageError as e:  # the record is a convenience; the run's own writes report the fault
            if not self._warned:
                warnings.warn(f"history not updated: {e}", stacklevel=2)
                self._warned = True

    def finish(self, status: str, error: str | None = None) -> None:
        if self.writer and self.entry:
            self.entry["status"] = status
            if error:
                self.entry["error"] = error
            self.beat(force=True)

    def wall_time_this_process(self) -> float:
        return time.monotonic() - self._start

    def total_wall_time(self) -> float:
        """Seconds over every process of the run, this one up to now."""
        earlier = sum(float(p.get("wall_time_s", 0.0)) for p in self.processes if p is not self.entry)
        return earlier + self.wall_time_this_process()


def open_run_dir(cfg, plan: RunDirPlan, *, writer: bool) -> RunRecord:
    """Create the directory, clear interrupted temporaries, keep the superseded results, record this process."""
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {str(plan.path)!r}: {e.strerror or e}. Pass run.root= "
                          "or run.dir= on a writable disk.") from None
    record = RunRecord(plan.path, writer=writer and not plan.inherited)
    if not record.writer:
        return record
    if plan.note:
        log.info("%s", plan.note)
    remove_orphan_temporaries(plan.path)
    # What killed writers of this host left in the neighbouring runs and the shared cache goes as well.
    neighbours = [p for p in plan.path.parent.iterdir() if p.is_dir() and p != plan.path]
    for folder in (*neighbours, Path(cfg.run.cache_dir or Path(cfg.run.root) / ".cache")):
        remove_orphan_temporaries(folder, any_host=False)
    results = plan.path / RESULTS_FILE
    if results.exists():  # a finished run resumed: its results stay beside the config that produced them
        try:
            writer_index = int(json.loads(results.read_text()).get("process_index", record.index - 1))
        except (OSError, ValueError, AttributeError, TypeError):
            writer_index = record.index - 1
        kept = plan.path / HISTORY_DIR / f"results.{max(writer_index, 0)}.json"
        try:
            kept.parent.mkdir(exist_ok=True)
            os.replace(results, kept)
        except OSError as e:
            raise TransferError(f"cannot move {results} aside to {kept}: {e.strerror or e}") from None
    record.start(cfg, plan)
    return record
