"""``python -m transfer.run task=cifar100 backbone=rs152 [key=value ...]``: one transfer run.

``-m`` / ``--multirun`` runs every combination of comma-separated values, one run each
(``-m task=digits backbone=rs50,resnet50``). ``--cfg`` prints the composed configuration and exits.
``suite=NAME`` runs every column of a published table (``recipes/suite/``, :mod:`transfer.suite`) for the
backbone(s) given: ``suite=resnet_rs_table5 -m backbone=rs50,resnet50 suite.data_root=/data``.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from transfer.baselines import load_baselines
from transfer.compare import assess, log_comparison
from transfer.config import RunConfig, compose, validate
from transfer.errors import TransferError
from transfer.registry import UnknownNameError
from transfer.results import build_results, format_table, unscored, write_results
from transfer.rundir import RESULTS_FILE, RUN_DIR_ENV, config_tree, open_run_dir, plan_run_dir
from transfer.suite import requested as suite_requested
from transfer.suite import run_suite
from transfer.tasks import TASKS, RunContext
from transfer.tracking import RunLogger, is_global_zero

log = logging.getLogger("transfer")


def resolve_run_dir(cfg: RunConfig, *, sweep_index: int | None = None) -> Path:
    """The directory a run of ``cfg`` writes to (see :func:`transfer.rundir.plan_run_dir`)."""
    return plan_run_dir(cfg, sweep_index=sweep_index).path


def run_one(overrides: list[str], *, sweep_index: int | None = None) -> dict:
    """Compose, validate, run the task and write results.json; returns the results.

    Everything that can be checked is checked before the run directory or a W&B run exists: the
    config, the baselines file, the run directory (occupied, nothing to resume, a changed config).
    The metrics are printed before results.json is written, so a failed write loses no number.
    """
    cfg = validate(compose(overrides))
    load_baselines()  # a damaged baselines file fails here, not after the task's work is done
    plan = plan_run_dir(cfg, sweep_index=sweep_index)
    writer = is_global_zero()
    record = open_run_dir(cfg, plan, writer=writer)
    run_dir = plan.path
    os.environ[RUN_DIR_ENV] = str(run_dir)
    # Flat task_name/backbone_name/protocol_name keys: W&B groups and filters by config keys (not by tags),
    # and flat keys work in every W&B view and in the Reports API.
    names = {"task_name": cfg.task.name, "backbone_name": cfg.backbone.name, "protocol_name": cfg.protocol.name}
    start = time.time()
    logger, failure = None, None
    try:
        logger = RunLogger(cfg.logger.wandb, run_dir, name=f"{cfg.task.name}/{cfg.backbone.name}/{cfg.protocol.name}",
                           group=cfg.task.name, job_type=cfg.protocol.name,
                           config={**names, **config_tree(cfg)})
        ctx = RunContext(cfg=cfg, run_dir=run_dir, logger=logger, record=record)
        output = TASKS.get(cfg.task.adapter).run(ctx)
        failure = unscored(cfg.task.name, output)
        # history.json is written once results.json is: a full disk at results.json then leaves it "failed".
        record.finish("complete" if failure is None else "failed", failure, save=False)
        results = build_results(cfg, output, time.time() - start, run_dir, record=record)
        results.update(assess(results))  # comparable or not, and the published rows measured the same way
        if failure:
            results["error"] = failure
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
            raise TransferError(f"{failure} Counts are in {run_dir / RESULTS_FILE}.")
    except BaseException as e:
        if not (failure and isinstance(e, TransferError) and failure in str(e)):  # that one is recorded already
            record.finish("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise
    finally:
        if logger is not None:
            logger.finish()
        os.environ.pop(RUN_DIR_ENV, None)
        record.close()
    return results


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated values in ``overrides`` (Hydra's sweep syntax)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for ov in parsed:
        key = ov.get_key_element()
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
        if show_cfg:
            cfg = validate(compose(overrides))
            print(cfg.to_yaml())
            return 0
        jobs = expand_sweep(overrides) if multirun else [overrides]
        results, failures = [], []
        for i, job in enumerate(jobs):
            if multirun:
                print(f"[{i + 1}/{len(jobs)}] {' '.join(job)}", flush=True)
            try:
                results.append(run_one(job, sweep_index=i if multirun else None))
            except (TransferError, UnknownNameError) as e:
                if not multirun:
                    raise
                failures.append((job, e))
                print(f"error: {e}", file=sys.stderr)
    except (TransferError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(results) > 1 and is_global_zero():
        print("\n" + format_table(results))
        for r in results:
            print(f"results: {Path(r['run_dir']) / RESULTS_FILE}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
