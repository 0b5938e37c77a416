"""``python -m transfer.run task=cifar100 backbone=rs152 [key=value ...]``: one transfer run.

``-m`` / ``--multirun`` runs every combination of comma-separated values, one run each
(``-m task=digits backbone=rs50,resnet50``). ``--cfg`` prints the composed configuration and exits.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from transfer.baselines import load_baselines
from transfer.compare import baseline_rows, log_comparison
from transfer.config import RunConfig, compose, validate
from transfer.errors import ConfigError, TransferError
from transfer.io import atomic_write_text
from transfer.registry import UnknownNameError
from transfer.results import build_results, format_table, write_results
from transfer.tasks import TASKS, RunContext
from transfer.tracking import RunLogger, is_global_zero

RUN_DIR_ENV = "TRANSFER_RUN_DIR"  # shared with the processes Lightning's DDP launcher starts
log = logging.getLogger("transfer")


def _stamp() -> str:
    # Ranks started by torchrun or SLURM must agree on the run directory without talking to each other.
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(var) and os.environ[var] != "none":
            return f"job{os.environ[var]}"
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def resolve_run_dir(cfg: RunConfig) -> Path:
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if cfg.run.dir:
        return Path(cfg.run.dir).expanduser()
    parent = Path(cfg.run.root) / cfg.task.name / f"{cfg.backbone.name}-{cfg.protocol.name}"
    if cfg.resume:
        previous = sorted(p for p in parent.glob("*") if (p / "checkpoints").is_dir()) if parent.is_dir() else []
        if not previous:
            raise ConfigError(f"resume=true but no earlier run with checkpoints is under {parent}; "
                              "pass the interrupted run's directory as run.dir=PATH.")
        return previous[-1]
    return parent / _stamp()


RESUME_SECTIONS = ("task", "protocol", "backbone")  # what a resumed run must share with the run it continues


def check_resume(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse ``resume=true`` into a run started with another task, protocol or backbone, before writing anything."""
    saved = run_dir / "config.yaml"
    if not (cfg.resume and saved.is_file()):
        return
    try:
        before = OmegaConf.to_container(OmegaConf.load(saved))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same refusal
        raise ConfigError(f"resume=true: cannot read {str(saved)!r} ({type(e).__name__}); start a new run "
                          "(resume=false) or pass another run.dir.") from None
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    changed = [f"{key}: {old!r} -> {new!r}" for section in RESUME_SECTIONS
               for key, old, new in _differences(section, before.get(section), now.get(section))]
    if changed:
        raise ConfigError(f"resume=true would continue {str(run_dir)!r}, which was started with other settings "
                          f"({'; '.join(changed)[:600]}). Resume with the same settings, or start a new run "
                          "(resume=false).")


def _differences(prefix: str, old, new) -> list[tuple[str, object, object]]:
    # Keys the saved config lacks came with a newer version of the suite; the old run had their default.
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old, key=str) for d in _differences(f"{prefix}.{k}", old[k], new.get(k))]
    return [] if old == new else [(prefix, old, new)]


def run_one(overrides: list[str]) -> dict:
    """Compose, validate, run the task and write results.json; returns the results."""
    cfg = validate(compose(overrides))
    load_baselines()  # a damaged baselines file fails here, not after the task's work is done
    run_dir = resolve_run_dir(cfg)
    check_resume(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if is_global_zero():
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    # Flat task_name/backbone_name/protocol_name keys: W&B groups and filters by config keys (not by tags),
    # and flat keys work in every W&B view and in the Reports API.
    names = {"task_name": cfg.task.name, "backbone_name": cfg.backbone.name, "protocol_name": cfg.protocol.name}
    logger = RunLogger(cfg.logger.wandb, run_dir, name=f"{cfg.task.name}/{cfg.backbone.name}/{cfg.protocol.name}",
                       group=cfg.task.name, job_type=cfg.protocol.name,
                       config={**names, **OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)})
    start = time.time()
    try:
        ctx = RunContext(cfg=cfg, run_dir=run_dir, logger=logger)
        output = TASKS.get(cfg.task.adapter).run(ctx)
        results = build_results(cfg, output, time.time() - start, run_dir)
        results["baselines"] = baseline_rows(results)
        if is_global_zero():
            write_results(run_dir, results)
            logger.summary({**results["metrics"], **{f"counts/{k}": v for k, v in results["counts"].items()},
                            "wall_time_s": results["wall_time_s"]})
            log_comparison(logger, results)
    finally:
        logger.finish()
        os.environ.pop(RUN_DIR_ENV, None)
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
    multirun = any(a in ("-m", "--multirun") for a in argv)
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("-m", "--multirun", "--cfg")]
    try:
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
                results.append(run_one(job))
            except (TransferError, UnknownNameError) as e:
                if not multirun:
                    raise
                failures.append((job, e))
                print(f"error: {e}", file=sys.stderr)
    except (TransferError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if results and is_global_zero():
        print("\n" + format_table(results))
        for r in results:
            print(f"results: {Path(r['run_dir']) / 'results.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
