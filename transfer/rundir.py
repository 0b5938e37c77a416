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
    .run.lock          held by the live process that writes the run (two runs never share a directory)

Everything here is decided by :func:`plan_run_dir` before anything is written; :func:`open_run_dir`
then creates the directory and the records.
"""
from __future__ import annotations

import errno
import fcntl
import functools
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
from transfer.io import _alive, atomic_write_text, remove_orphan_temporaries
from transfer.protocols import config_protocol_label

log = logging.getLogger(__name__)

RUN_DIR_ENV = "TRANSFER_RUN_DIR"  # shared with the processes Lightning's DDP launcher starts
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.json"
HISTORY_DIR = "history"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOCK_FILE = ".run.lock"  # held by the process that writes the run (see claim_run_dir)
FEATURE_DIR = "features"  # tasks/classification/features.py cache_path(run_dir, key) with protocol.cache=false

# Keys that change how a run is watched, not what it computes: they may differ on resume.
# (trainer.num_workers: the training epochs do not depend on it, see transfer/reproducible.py.)
NEUTRAL_KEYS = ("resume", "resume_allow_changes", "run.", "logger.", "trainer.progress_bar",
                "trainer.log_every_n_steps", "trainer.num_workers")
# Keys that name another run: never continued, even with resume_allow_changes=true.
# protocol.freeze_backbone: a frozen and a fine-tuned run are different protocols (transfer.protocols.protocol_label)
IDENTITY_KEYS = ("task.name", "task.adapter", "task.dataset", "backbone.name", "backbone.weights", "protocol.name",
                 "protocol.freeze_backbone")


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (missing, truncated, damaged, not a torch checkpoint), or None if it can.

    Reads the whole file and checks the CRC-32 of every member of the zip archive (``ZipFile.testzip``):
    a file cut short by a copy or a full disk fails, and so does one with flipped bytes (the damaged member
    is named). The answer is remembered while the file's size and modification time stay the same.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return "no such file"
    if not path.is_file():
        return "no such file"
    return _checkpoint_problem(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _checkpoint_problem(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # ValueError: a header field out of range
        return f"not a complete checkpoint ({e})"
    if bad is not None:
        return f"damaged: member {bad!r} fails its CRC check (flipped or overwritten bytes)"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "not a torch checkpoint (no data.pkl)"
    return None


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names (``a/b/c``) of the floating-point tensors in a nested dict/list that hold NaN or inf."""
    import torch

    if isinstance(tree, torch.Tensor):
        return [prefix or "<tensor>"] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}/{k}" if prefix else str(k))]


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
    The sweep index of ``-m`` keeps the runs of one sweep apart. A process of a SLURM job without a job
    step (run in the batch script or under salloc, not by srun) is a launch of its own: None.
    """
    env = os.environ
    parts: list[str] = []
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    slurm = int(env.get("SLURM_NTASKS") or 1) > 1 and env.get("SLURM_JOB_ID")
    if slurm and env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = [f"job{env['SLURM_ARRAY_JOB_ID']}", f"task{env['SLURM_ARRAY_TASK_ID']}"]
    else:
        job = [f"job{env['SLURM_JOB_ID']}"] if slurm else []
    if slurm and step:  # srun started every rank of this step: they all see the same step id
        parts += [*job, f"step{step}"]
    elif int(env.get("WORLD_SIZE") or 1) > 1:
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        if run_id and run_id != "none":
            parts += [*job, f"torchrun-{run_id}"]
        else:
            parts += [*job, f"torchrun-{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '0')}"]
    else:
        # A process of a SLURM job that srun did not start (the batch script, salloc): nothing marks it apart
        # from another such process of the job, so it gets a timestamped folder of its own.
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


def _recorded_time(run: Path) -> float:
    """When ``run`` last recorded progress: its newest checkpoint, history.json or results.json (files only its
    own processes write; a folder's mtime also moves when another run clears a temporary file in it)."""
    ckpts = run / CHECKPOINT_DIR
    files = [p for p in ckpts.rglob("*") if p.suffix in (*CHECKPOINT_SUFFIXES, ".safetensors")] \
        if ckpts.is_dir() else []
    times = []
    for f in (*files, run / HISTORY_FILE, run / RESULTS_FILE, run / CONFIG_FILE):
        try:
            times.append(f.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=float("-inf"))


def _pick_resumable(parent: Path) -> tuple[Path, str]:
    """The run under ``parent`` with the newest recorded progress (:func:`_recorded_time`), a usable checkpoint,
    no results.json and no live process; and a note naming every other candidate and why it was not taken."""
    runs = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: (_recorded_time(p), p.name),
                  reverse=True) if parent.is_dir() else []
    skipped, chosen = [], None
    for run in runs:
        if (run / RESULTS_FILE).exists():
            skipped.append(f"{run.name} (finished: has {RESULTS_FILE})")
        elif chosen is not None:  # older: not read through (every checkpoint's CRC), unless it has none at all
            skipped.append(f"{run.name} (no usable checkpoint or feature shard)"
                           if _holds_a_run(run) is None and not feature_shards(run) else f"{run.name} (older)")
        elif not resumable_state(run):
            skipped.append(f"{run.name} (no usable checkpoint or feature shard)")
        elif holder := lock_holder(run):
            skipped.append(f"{run.name} (in use by a live run: {holder})")
        else:
            chosen = run
    if chosen is not None:
        return chosen, f"; not taken: {', '.join(skipped)}" if skipped else ""
    raise ConfigError("resume=true but no interrupted run with a usable checkpoint or finished feature shards is "
                      f"under {str(parent)!r}"
                      + (f" (found: {', '.join(skipped)})" if skipped else "")
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
    parent = Path(cfg.run.root).expanduser() / cfg.task.name / f"{cfg.backbone.name}-{config_protocol_label(cfg)}"
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
# One live run per directory


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """The claim of one process on a run directory: ``.run.lock`` held with ``flock`` (released by the kernel when
    the process ends, however it ends), naming the holder's pid and host. On a file system without ``flock`` the
    file is created exclusively instead, and a file left by a dead process of this host is taken over."""

    def __init__(self, path: Path, file, flock: bool) -> None:
        self.path, self._file, self._flock = path, file, flock

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a process that opened it meanwhile retries
        finally:
            self._file.close()
            self._file = None


def _holder_text() -> str:
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}"


def _in_use(run_dir: Path, holder: str) -> ConfigError:
    return ConfigError(f"run directory {str(run_dir)!r} is in use by a live run ({holder or 'holder unknown'}); two "
                       "runs never share a directory. Wait for it to end, or pass another run.dir.")


def claim_run_dir(run_dir: Path) -> RunLock:
    """Claim ``run_dir`` for this process; raises :class:`ConfigError` naming the live run that holds it."""
    path = Path(run_dir) / LOCK_FILE
    for _ in range(10):
        try:
            f = open(path, "a+")
        except OSError as e:
            raise ConfigError(f"cannot create {str(path)!r}: {e.strerror or e}. Pass run.root= or run.dir= on a "
                              "writable disk.") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise _in_use(run_dir, holder) from None
        except OSError as e:
            f.close()
            if e.errno not in _NO_FLOCK:
                raise
            return _claim_exclusive(path)
        try:  # the holder before us may have removed the file between our open and our flock
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            f.seek(0)
            f.truncate()
            f.write(_holder_text() + "\n")
            f.flush()
            return RunLock(path, f, flock=True)
        f.close()
    raise _in_use(run_dir, "its lock file keeps changing")


def _claim_exclusive(path: Path) -> RunLock:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").strip() if path.exists() else ""
            parts = holder.split()
            if len(parts) >= 4 and parts[2] == socket.gethostname() and parts[1].isdigit() \
                    and not _alive(int(parts[1])):
                path.unlink(missing_ok=True)  # left by a killed process of this host
                continue
            raise ConfigError(f"run directory {str(path.parent)!r} is in use by {holder or 'another run'} (this file "
                              f"system has no flock, so a run killed on another host leaves {str(path)!r} behind: "
                              "delete it if no run is using the directory).") from None
        f = os.fdopen(fd, "w")
        f.write(_holder_text() + "\n")
        f.flush()
        return RunLock(path, f, flock=False)
    raise _in_use(path.parent, "")


def lock_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir`` now (pid and host), or None when no live process does. Changes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        f = open(path)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "holder unknown"
        except OSError:  # no flock: the exclusive file of a live process, or of a dead one on this host
            holder = f.read().strip()
            parts = holder.split()
            dead = len(parts) >= 4 and parts[2] == socket.gethostname() and parts[1].isdigit() \
                and not _alive(int(parts[1]))
            return None if dead else holder or "holder unknown"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


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
    if "protocol.name" in identity:
        # Another protocol's section has other keys altogether: listing them would hide the one that matters.
        before, after = changed["protocol.name"]
        raise ConfigError(f"resume=true: the run in {str(run_dir)!r} is protocol={before}, this one protocol={after}: "
                          "the protocols differ, so this is another run and needs a new run folder. Start it without "
                          "resume=true.")
    if identity:
        named = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in identity)
        raise ConfigError(f"resume=true: {', '.join(identity)} differ(s) from the run in {str(run_dir)!r} "
                          f"({named}); that is another run, not a continuation. Start it without resume=true.")
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
        self.lock: RunLock | None = None  # set by open_run_dir for the writing process

    def close(self) -> None:
        """Let another process claim the run directory (this process's work on it is over)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        for earlier in self.processes:  # this process holds the directory: no earlier one is still running
            if earlier.get("status") == "running":
                earlier["status"] = "interrupted"
                earlier.setdefault("error", "the process ended without recording an outcome (killed, or its "
                                            "last write failed)")
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
        # Trailing blanks (valid JSON) keep room for the final status when the disk is full (_overwrite_in_place).
        text = json.dumps({"processes": self.processes}, indent=2, default=str) + "\n" + " " * 1024 + "\n"
        try:
            atomic_write_text(self.path, text)
        except StorageError as e:  # the record is a convenience; the run's own writes report the fault
            if force and self.entry.get("status") != "running" and _overwrite_in_place(self.path, text.rstrip()):
                return
            if not self._warned:
                warnings.warn(f"history not updated: {e}", stacklevel=2)
                self._warned = True

    def finish(self, status: str, error: str | None = None, *, save: bool = True) -> None:
        """Record this process's outcome; ``save=False`` only sets it (for results.json), :meth:`beat` writes it."""
        if self.writer and self.entry:
            self.entry["status"] = status
            if error:
                self.entry["error"] = error
            if save:
                self.beat(force=True)
            else:  # results.json embeds this entry: its time must be as of now, not of the last save
                self.entry["wall_time_s"] = round(time.monotonic() - self._start, 3)

    def wall_time_this_process(self) -> float:
        return time.monotonic() - self._start

    def total_wall_time(self) -> float:
        """Seconds over every process of the run, this one up to now."""
        earlier = sum(float(p.get("wall_time_s", 0.0)) for p in self.processes if p is not self.entry)
        return earlier + self.wall_time_this_process()


def _overwrite_in_place(path: Path, text: str) -> bool:
    """Write ``text`` over ``path`` without a temporary file, padded to the file's size, when it fits there: on a
    full disk this needs no new block. Not atomic; used only for the final status of history.json."""
    data = text.encode()
    try:
        size = path.stat().st_size
        if len(data) > size:
            return False
        with open(path, "r+b") as f:
            f.write(data + b" " * (size - len(data)))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def open_run_dir(cfg, plan: RunDirPlan, *, writer: bool) -> RunRecord:
    """Create the directory, claim it (:func:`claim_run_dir`: a directory a live run uses is never shared), clear
    interrupted temporaries, keep the superseded results, record this process. Call ``record.close()`` at the end."""
    try:
        plan.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {str(plan.path)!r}: {e.strerror or e}. Pass run.root= "
                          "or run.dir= on a writable disk.") from None
    lock = claim_run_dir(plan.path) if writer and not plan.inherited else None  # before anything is read or written
    try:
        record = RunRecord(plan.path, writer=writer and not plan.inherited)
        record.lock = lock
        _prepare(cfg, plan, record)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return record


def _prepare(cfg, plan: RunDirPlan, record: RunRecord) -> None:
    if not record.writer:
        return
    if not plan.resume and (what := _holds_a_run(plan.path)):  # written by a run that ended since plan_run_dir
        raise ConfigError(f"run directory {str(plan.path)!r} already holds a run ({what}); nothing was overwritten. "
                          "Continue it with resume=true, or pass another run.dir.")
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
