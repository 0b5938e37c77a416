"""``python -m transfer.run task=cifar100 backbone=rs152 [key=value ...]``: one transfer run.

``-m`` / ``--multirun`` runs every combination of comma-separated values, one run each
(``-m task=digits backbone=rs50,resnet50``). ``--cfg`` prints the composed configuration and exits (with ``-m``,
each job's, headed ``# [i/n] overrides``).
``suite=NAME`` runs every column of a published table (``recipes/suite/``, :mod:`transfer.suite`) for the
backbone(s) given: ``suite=resnet_rs_table5 -m backbone=rs50,resnet50 suite.data_root=/data``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from transfer.backbones import check_weights
from transfer.baselines import load_baselines
from transfer.compare import assess, log_comparison
from transfer.config import RunConfig, check_top_level_keys, compose, validate
from transfer.console import setup_logging
from transfer.errors import ConfigError, TransferError
from transfer.protocols import config_protocol_label
from transfer.registry import UnknownNameError
from transfer.results import build_results, format_metric, format_table, unscored, write_results
from transfer.rundir import RESULTS_FILE, RUN_DIR_ENV, config_tree, open_run_dir, plan_run_dir
from transfer.suite import requested as suite_requested
from transfer.suite import run_suite
from transfer.sweeps import expand_sweep, sweep_axes
from transfer.tables import markdown_table
from transfer.tasks import TASKS, RunContext
from transfer.tracking import RunLogger, is_global_zero

log = logging.getLogger("transfer")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # scancel, pre-emption, a time limit; Ctrl+C


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: the run stops, is recorded ``interrupted`` (not failed: ``resume=true`` continues
    it), a sweep starts no further job, and ``python -m transfer.run`` exits ``128 + signal`` (143 for SIGTERM).

    A ``BaseException`` so that no ``except Exception`` of a task or a library counts it as the run's own fault.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_status = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _StopOnSignal:
    """Installs handlers for :data:`STOP_SIGNALS` (main thread only) that raise :class:`Interrupted` once.

    Lightning adds its own SIGTERM handler during a fit and calls the one it found (this one), so the signal
    reaches us inside a fit too. A later signal while the run winds down is ignored, so that the run's record
    is still written; a forked DataLoader worker that inherited the handler dies by the signal as usual.
    """

    def __init__(self):
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked worker: die by the signal, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)


_stop = _StopOnSignal()  # set by main(); read by run_one to record an interrupted run as such


def resolve_run_dir(cfg: RunConfig, *, sweep_index: int | None = None) -> Path:
    """The directory a run of ``cfg`` writes to (see :func:`transfer.rundir.plan_run_dir`)."""
    return plan_run_dir(cfg, sweep_index=sweep_index).path


def run_one(overrides: list[str], *, sweep_index: int | None = None) -> dict:
    """Compose, validate, run the task and write results.json; returns the results.

    Everything that can be checked is checked before the run directory or a W&B run exists: the
    config, the baselines file, the run directory (occupied, nothing to resume, a changed config), the weights
    (downloaded or found, keys matched to the backbone; before the task reads any data).
    The metrics are printed before results.json is written, so a failed write loses no number.
    """
    cfg = validate(compose(overrides))
    load_baselines()  # a damaged baselines file fails here, not after the task's work is done
    plan = plan_run_dir(cfg, sweep_index=sweep_index)  # writes nothing: an occupied or missing run dir fails first
    b = cfg.backbone  # weights found, read and matched to the architecture before any data work
    check_weights(b.name, weights=b.weights, strict=b.strict, min_loaded_fraction=b.min_loaded_fraction)
    writer = is_global_zero()
    record = open_run_dir(cfg, plan, writer=writer)
    run_dir = plan.path
    os.environ[RUN_DIR_ENV] = str(run_dir)
    # Flat task_name/backbone_name/protocol_name keys: W&B groups and filters by config keys (not by tags),
    # and flat keys work in every W&B view and in the Reports API.
    # protocol_name is the protocol label (finetune-frozen for finetune with freeze_backbone=true).
    protocol = config_protocol_label(cfg)
    names = {"task_name": cfg.task.name, "backbone_name": cfg.backbone.name, "protocol_name": protocol}
    start = time.time()
    logger, failure, error_type = None, None, TransferError
    try:
        logger = RunLogger(cfg.logger.wandb, run_dir, name=f"{cfg.task.name}/{cfg.backbone.name}/{protocol}",
                           group=cfg.task.name, job_type=protocol,
                           config={**names, **config_tree(cfg)})
        ctx = RunContext(cfg=cfg, run_dir=run_dir, logger=logger, record=record)
        # The one place a run is seeded (torch, numpy, random, and the DataLoader workers): adapters do not reseed.
        from transfer.engine import seed_everything  # Lightning: imported once a run starts, not to refuse a value

        seed_everything(cfg.trainer)
        try:
            output = TASKS.get(cfg.task.adapter).run(ctx)
            failure = unscored(cfg.task.name, output)
        except TransferError as e:
            if getattr(e, "output", None) is None:
                raise
            # The task stopped on bad input but says what it counted (transfer.tasks.attach_output): a failed
            # results.json keeps those counts, without any metric.
            output, failure, error_type = e.output, str(e), type(e)
            output.metrics = {}
        # history.json is written once results.json is: a full disk at results.json then leaves it "failed".
        record.finish("complete" if failure is None else "failed", failure, save=False)
        results = build_results(cfg, output, time.time() - start, run_dir, record=record)
        results.update(assess(results))  # comparable or not, and the published rows measured the same way
        if failure:
            results["error"] = failure
            results["status"] = "failed"
        if writer:
            if results["metrics"]:
                print("\n" + format_table([results]), flush=True)  # before the write: a full disk loses nothing
            path = write_results(run_dir, results)
            record.beat(force=True)
            logger.summary({**results["metrics"], **{f"counts/{k}": v for k, v in results["counts"].items()},
                            "wall_time_s": results["wall_time_s"]})
            log_comparison(logger, results)
            print(f"results: {path}", flush=True)
        if failure:
            raise error_type(f"{failure} Counts are in {run_dir / RESULTS_FILE}.")
    except BaseException as e:
        if isinstance(e, Interrupted) or _stop.received is not None:  # also a worker's death by the same signal
            record.finish("interrupted", str(e if isinstance(e, Interrupted) else Interrupted(_stop.received)))
            if not isinstance(e, Interrupted):
                raise Interrupted(_stop.received) from e
        elif not (failure and isinstance(e, TransferError) and failure in str(e)):  # that one is recorded already
            record.finish("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    finally:
        if logger is not None:
            logger.finish()
        os.environ.pop(RUN_DIR_ENV, None)
        record.close()
    return results


def check_sweep(jobs: list[list[str]]) -> None:
    """Compose and validate every job of a sweep before the first one starts: a nested-key typo
    (``trainer.max_epoch=1,2``) or a bad value in any job fails once, naming the job, and nothing runs.

    Raises :class:`ConfigError` (or the job's own :class:`TransferError` / :class:`UnknownNameError` message,
    prefixed with the job) for the first job that cannot start.
    """
    for i, job in enumerate(jobs, start=1):
        try:
            validate(compose(job))
        except (TransferError, UnknownNameError) as e:
            raise ConfigError(f"sweep job [{i}/{len(jobs)}] ({' '.join(job)}) cannot start; no job was run: "
                              f"{e}") from None


@dataclass
class JobOutcome:
    """One job of a ``-m`` sweep: its overrides, its results or its exit status and error."""

    overrides: list[str]
    results: dict | None = None
    status: int = 0  # the exit status the job alone would have had: 2 for a TransferError, 1 for a crash
    error: str = ""
    interrupted: bool = False  # stopped by SIGTERM/SIGINT (status 128 + signal); no later job was started


def sweep_summary(swept: list[str], outcomes: list[JobOutcome], not_started: list[list[str]] = ()) -> str:
    """A table with one row per job: the swept keys' values, its exit status, its metrics and results file; then
    every failed job with its exit status and error, the interrupted one and the jobs a signal kept from starting."""
    metrics = sorted({k for o in outcomes if o.results for k in o.results["metrics"]})
    head = [*swept, "status", *metrics, "results"]
    rows = []
    for o in outcomes:
        values = dict(ov.lstrip("+~").split("=", 1) for ov in o.overrides if "=" in ov)
        got = o.results["metrics"] if o.results else {}
        where = str(Path(o.results["run_dir"]) / RESULTS_FILE) if o.results else "—"
        state = "ok" if not o.status else f"{'interrupted' if o.interrupted else 'failed'} ({o.status})"
        rows.append([*(values.get(k, "") for k in swept), state,
                     *(format_metric(got[m]) if m in got else "" for m in metrics), where])
    total = len(outcomes) + len(not_started)
    stopped = [(i, o) for i, o in enumerate(outcomes, start=1) if o.interrupted]
    failed = [(i, o) for i, o in enumerate(outcomes, start=1) if o.status and not o.interrupted]
    head_line = f"sweep: {total} job(s), {len(failed)} failed"
    if stopped or not_started:
        head_line += f", {len(stopped)} interrupted, {len(not_started)} not started"
    out = [head_line, markdown_table(head, rows, align=True)]
    for title, listed in (("failed jobs:", failed), ("interrupted:", stopped)):
        if listed:
            out += ["", title]
            out += [f"  [{i}/{total}] {' '.join(o.overrides)}: exit status {o.status}: {o.error}" for i, o in listed]
    if not_started:
        out += ["", "not started:"]
        out += [f"  [{i}/{total}] {' '.join(job)}" for i, job in enumerate(not_started, start=len(outcomes) + 1)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m transfer.run``; returns the exit status (0, 1: a run failed or crashed, 2: bad input,
    128 + signal: stopped by SIGTERM/SIGINT, the run recorded as interrupted)."""
    global _stop
    _stop = _StopOnSignal()
    with _stop:
        try:
            return _main(argv)
        except Interrupted as e:
            print(f"error: {e}; the run is recorded as interrupted (resume=true continues a run that has a "
                  "checkpoint).", file=sys.stderr, flush=True)
            return e.exit_status


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from transfer.usage import help_text

        try:
            print(help_text(__doc__, [a for a in argv if a not in ("-h", "--help")]), end="")
        except (TransferError, UnknownNameError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    setup_logging()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # The engine's first ModelCheckpoint is the best epoch on purpose (last.ckpt is the second).
    warnings.filterwarnings("ignore", message=".*multiple `ModelCheckpoint` callbacks.*")
    # A fresh run never gets a directory holding checkpoints (rundir refuses it); only a resume does.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("-m", "--multirun", "--cfg")]
    try:
        if suite_requested(overrides):  # suite=NAME: every column of a published table (transfer/suite.py)
            return run_suite(overrides, multirun=multirun, show=show_cfg, run_one=run_one)
        if show_cfg and multirun:  # every job's configuration, each validated, nothing run
            check_top_level_keys(overrides)
            jobs = expand_sweep(overrides)
            shown = []
            for i, job in enumerate(jobs):
                try:
                    shown.append(validate(compose(job)).to_yaml())
                except (TransferError, UnknownNameError) as e:
                    raise ConfigError(f"job {i + 1}/{len(jobs)} ({' '.join(job)}): {e}") from None
            for i, (job, text) in enumerate(zip(jobs, shown)):
                print(f"# [{i + 1}/{len(jobs)}] {' '.join(job)}\n{text}")
            return 0
        if show_cfg:
            cfg = validate(compose(overrides))
            print(cfg.to_yaml())
            return 0
        if not multirun:
            run_one(overrides)
            return 0
        check_top_level_keys(overrides)  # a typo fails once, not once per job
        swept = [key.lstrip("+~") for key, values in sweep_axes(overrides) if len(values) > 1]
        jobs = expand_sweep(overrides)
        check_sweep(jobs)
    except (TransferError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outcomes, stop = [], None
    for i, job in enumerate(jobs):
        print(f"[{i + 1}/{len(jobs)}] {' '.join(job)}", flush=True)
        try:
            outcomes.append(JobOutcome(job, run_one(job, sweep_index=i)))
        except Interrupted as e:  # scancel, pre-emption, a time limit, Ctrl+C: no further job starts
            stop = e
            outcomes.append(JobOutcome(job, status=e.exit_status, interrupted=True,
                                       error=f"{e}; recorded as interrupted"))
            print(f"error: {e}; no further job of the sweep is started.", file=sys.stderr, flush=True)
            break
        except (TransferError, UnknownNameError) as e:
            outcomes.append(JobOutcome(job, status=2, error=str(e)))
            print(f"error: {e}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one crashed job must not lose the others; its traceback is logged
            log.exception("job %d/%d (%s) crashed", i + 1, len(jobs), " ".join(job))
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            outcomes.append(JobOutcome(job, status=1, error=f"{type(e).__name__}: {first}"))
    if is_global_zero():
        print("\n" + sweep_summary(swept, outcomes, jobs[len(outcomes):] if stop else []), flush=True)
    if stop is not None:
        return stop.exit_status
    return 1 if any(o.status for o in outcomes) else 0

if __name__ == "__main__":
    sys.exit(main())
