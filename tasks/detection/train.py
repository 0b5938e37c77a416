"""Detection transfer runs: detectron2's trainer, hooks and evaluators, started through its ``launch``.

The launching process checks the configuration, weights and data (every image decoded once; undecodable
ones left out and counted), refuses a resume whose checkpoint belongs to another model, then ``launch``
runs :func:`train_worker` once per device (spawning processes when there are several, on every node).
Rank 0's detectron2 ``JSONWriter`` records the training losses and the final evaluation in
``metrics.json``; the launching process reads that file back, so one code path serves one process and
many.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Collection
from pathlib import Path

import yaml
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from tasks.detection import backbone as _registers_builders  # noqa: F401  (BACKBONE/ROI_HEADS_REGISTRY entries)
from tasks.detection.data import LAYOUTS, prepare_data, register_data
from tasks.detection.evaluation import COUNT_TASK, build_evaluator
from tasks.detection.mapper import UNREADABLE_LOG, CheckedDatasetMapper, read_unreadable_log
from tasks.detection.schema import DetectionTaskConfig, comparison_facts, detection_devices
from tasks.detection.translate import build_detectron2_config, solver_record
from transfer.backbones import build_backbone_from_config
from transfer.engine import CHECKPOINT_DIR
from transfer.errors import ConfigError, DataError, TransferError
from transfer.tasks import RunContext, TaskOutput
from transfer.tracking import is_global_zero

log = logging.getLogger(__name__)
METRICS_LOG = "metrics.json"  # detectron2's JSONWriter output, one JSON object per line
TRAIN_TIME_KEY = "wall_clock/train_s"
# detectron2 evaluators report per task (bbox, segm); suite metric keys are split/metric, lower-case.
TASK_PREFIX = {"bbox": "", "segm": "mask_"}
RESUME_IGNORED = ("DEVICE",)  # MODEL keys a resumed run may change (CPU <-> CUDA)


class WallClock(hooks.HookBase):
    """Training time over every attempt of a run, up to its last checkpoint.

    Its state goes into detectron2's checkpoints (trainer ``hooks`` state), so a resumed run adds to it;
    time after an interrupted attempt's last checkpoint is lost with that attempt's work.
    """

    def __init__(self) -> None:
        self.before, self._start = 0.0, None

    def before_train(self) -> None:
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def after_train(self) -> None:
        self.trainer.storage.put_scalar(TRAIN_TIME_KEY, self.elapsed(), smoothing_hint=False)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.before = float(state.get("elapsed_s", 0.0))


class DetectionTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer with checked image reading and the evaluator of each test set's layout.

    Its writers (metrics.json, TensorBoard, console) run every ``TRANSFER.LOG_PERIOD`` iterations
    (``trainer.log_every_n_steps``) instead of DefaultTrainer's fixed 20.
    """

    def build_hooks(self) -> list:
        kept = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicWriter)]
        kept.append(WallClock())
        if comm.is_main_process():
            kept.append(hooks.PeriodicWriter(self.build_writers(), period=self.cfg.TRANSFER.LOG_PERIOD))
        return kept

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        record = Path(cfg.OUTPUT_DIR) / UNREADABLE_LOG if cfg.OUTPUT_DIR else None
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True, record))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str):
        return build_evaluator(dataset_name, Path(cfg.OUTPUT_DIR) / "inference")


def train_worker(d2cfg: CfgNode, task: DetectionTaskConfig, resume: bool,
                 exclude: Collection[str] = ()) -> DetectionTrainer:
    """One process of a (possibly distributed) run: register the data, train, evaluate at the end."""
    register_data(task, exclude)  # detectron2's catalogs live in each process
    seed_all_rng(None if d2cfg.SEED < 0 else d2cfg.SEED + comm.get_rank())
    if comm.is_main_process():
        Path(d2cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(d2cfg.OUTPUT_DIR) / "config.yaml").write_text(d2cfg.dump())
    trainer = DetectionTrainer(d2cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def check_resume(output_dir: Path, d2cfg: CfgNode) -> None:
    """Refuse, before anything is written, to resume a checkpoint of another model (frozen levels, norms, heads).

    detectron2 would otherwise load the old optimizer into the new model and fail on its parameter groups,
    after overwriting the run's config.
    """
    saved = output_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        before = yaml.safe_load(saved.read_text())["MODEL"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"resume=true: cannot read the detectron2 config of the run to continue, {str(saved)!r} "
                          f"({e}). Start a new run (resume=false).") from None
    now = yaml.safe_load(d2cfg.dump())["MODEL"]
    changed = [f"MODEL.{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if k not in RESUME_IGNORED and before.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"resume=true would continue {str(output_dir.parent)!r}, whose checkpoint is of another "
                          f"model ({'; '.join(changed)[:600]}). Resume with the settings it was started with, or "
                          "start a new run (resume=false).")


def launch_settings(num_nodes: int) -> tuple[int, str]:
    """(rank of this machine, rendezvous URL); several machines meet at MASTER_ADDR:MASTER_PORT."""
    if num_nodes == 1:
        return 0, "auto"
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"trainer.num_nodes={num_nodes} needs {', '.join(missing)} in the environment of every "
                          "machine (NODE_RANK 0 on the machine at MASTER_ADDR, 1.. on the others).")
    return int(os.environ["NODE_RANK"]), f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def read_metrics_log(path: Path) -> list[dict]:
    """The records of detectron2's metrics.json (NaN stays NaN: JSONWriter writes it so)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise TransferError(f"cannot read detectron2's training record {str(path)!r}: {e}") from None


def split_metrics(record: dict, split: str = "test") -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                              list[str]]:
    """Evaluation scalars of one record -> (headline metrics, per-class APs, undefined metric names).

    ``bbox/AP50`` becomes ``test/ap50`` and ``segm/AP`` ``test/mask_ap``; per-class APs (COCO's
    ``bbox/AP-<class>``, VOC's ``bbox/AP50-<class>``) go to ``{"test/ap": {class: value}}``. COCO's
    evaluator reports NaN for a class without ground truth and for every AP when the model made no
    detection; those are listed, not reported as numbers.
    """
    metrics, per_class, undefined = {}, {}, []
    for key, value in record.items():
        task, _, name = key.partition("/")
        if task not in TASK_PREFIX or not name:
            continue
        metric, _, cls = name.partition("-")
        out = f"{split}/{TASK_PREFIX[task]}{metric.lower()}"
        if isinstance(value, float) and math.isnan(value):
            undefined.append(f"{out}/{cls}" if cls else out)
        elif cls:
            per_class.setdefault(out, {})[cls] = float(value)
        else:
            metrics[out] = float(value)
    return metrics, per_class, undefined


def distinct_files(records: list[dict]) -> list[dict]:
    """One record per file (its first error), with ``draws``: how many times the loader failed on it."""
    out: dict[str, dict] = {}
    for r in records:
        out.setdefault(r.get("file", "?"), {**r, "draws": 0})["draws"] += 1
    return list(out.values())


def log_training(records: list[dict], logger) -> None:
    """Send detectron2's training scalars (losses, lr, timings) to W&B as ``train/<name>`` by iteration."""
    for record in records:
        scalars = {f"train/{k}": v for k, v in record.items()
                   if k != "iteration" and "/" not in k and isinstance(v, (int, float))}
        if scalars and "iteration" in record:
            logger.log(scalars, step=int(record["iteration"]))


def run(ctx: RunContext) -> TaskOutput:
    """Train a detector on the registry backbone (fine-tuned or frozen) and evaluate it on the test split."""
    cfg, task = ctx.cfg, ctx.cfg.task
    output_dir = ctx.run_dir / CHECKPOINT_DIR
    # Resolve (and download) the weights once here, so a bad source fails with one message, not per process.
    weights = build_backbone_from_config(cfg.backbone).weights
    data = prepare_data(task, cache_dir=ctx.cache_dir, workers=max(1, cfg.trainer.num_workers))
    d2cfg = build_detectron2_config(cfg, output_dir, data.splits)
    if cfg.resume:
        check_resume(output_dir, d2cfg)
    for note in d2cfg.TRANSFER_NOTES:
        log.info(note)
    machine_rank, dist_url = launch_settings(cfg.trainer.num_nodes)
    launch(train_worker, detection_devices(cfg), num_machines=cfg.trainer.num_nodes, machine_rank=machine_rank,
           dist_url=dist_url, args=(d2cfg, task, cfg.resume, data.exclude))
    if not is_global_zero():
        return TaskOutput(metrics={}, weights=weights.as_dict())
    return collect(ctx, d2cfg, data, weights.as_dict())


def collect(ctx: RunContext, d2cfg: CfgNode, data, weights: dict) -> TaskOutput:
    """Read the finished run's metrics.json into a TaskOutput; refuse to score a detector that detected nothing."""
    cfg, task = ctx.cfg, ctx.cfg.task
    output_dir = Path(d2cfg.OUTPUT_DIR)
    records = read_metrics_log(output_dir / METRICS_LOG)
    log_training(records, ctx.logger)
    evaluated = [r for r in records if any(k.startswith("bbox/") for k in r)]
    if not evaluated:
        raise TransferError(f"detectron2 wrote no evaluation to {str(output_dir / METRICS_LOG)!r}; see its log above.")
    last = evaluated[-1]
    images, found = (int(last[k]) if k in last else None for k in (f"{COUNT_TASK}/images", f"{COUNT_TASK}/count"))
    if found == 0:
        raise TransferError(
            f"the detector made no detection on the {int(images or 0)} test images after {d2cfg.SOLVER.MAX_ITER} "
            f"iterations, so its AP would be 0 or undefined rather than a measurement. Train longer "
            "(trainer.max_steps, task.solver.max_iter), check the learning rate (task.solver.base_lr) and the data, "
            f"or lower the score threshold. Checkpoints and metrics.json are in {str(output_dir)!r}.")
    # One entry per file: the loader may draw a file that became unreadable many times, each draw a log line.
    unreadable = distinct_files(read_unreadable_log(output_dir / UNREADABLE_LOG))
    train_skipped = {s["file"] for s in data.skipped if s["split"] in task.train_splits}
    train_total = sum(n for split, n in data.totals.items() if split in task.train_splits)
    left_out = len(train_skipped | {u["file"] for u in unreadable})
    if unreadable and left_out > task.max_bad_fraction * train_total:
        raise DataError(f"{len(unreadable)} training images became unreadable during the run (e.g. "
                        f"{unreadable[0]['file']}: {unreadable[0]['error']}); with the {len(train_skipped)} "
                        f"left out before training that is {left_out} files, more than task.max_bad_fraction="
                        f"{task.max_bad_fraction} of {train_total}. The list is in "
                        f"{str(output_dir / UNREADABLE_LOG)!r}.")
    metrics, per_class, undefined = split_metrics(last)
    if undefined:
        log.warning("undefined, so reported as no number: %s (a class without ground-truth objects in the test "
                    "images has no AP and is left out of the mean; COCO also leaves out object sizes that do not "
                    "occur)", ", ".join(undefined))
    ctx.logger.log(metrics, step=int(last.get("iteration", d2cfg.SOLVER.MAX_ITER)))
    if per_class:
        ctx.logger.table("test/per_class_ap", ["metric", "class", "ap"],
                         [[m, c, v] for m, values in sorted(per_class.items()) for c, v in values.items()])
    recipe = {"protocol": cfg.protocol.name, "base_config": task.base_config, **solver_record(d2cfg)}
    # W&B's config shows the protocol section, whose classification fields detection does not use: the summary
    # carries the values it did use.
    ctx.logger.summary({f"recipe/{k}": v for k, v in recipe.items() if isinstance(v, (bool, int, float, str))})
    test_left_out = sum(1 for s in data.skipped if s["split"] == task.test_split)
    return TaskOutput(
        metrics=metrics, weights=weights, primary_metric=LAYOUTS.get(task.dataset).primary_metric, recipe=recipe,
        counts={"skipped_images": len(data.skipped), "skipped_test_images": test_left_out,
                "unreadable_during_training": len(unreadable), "undefined_metrics": len(undefined)},
        extra={**comparison_facts(cfg), "per_class_ap": per_class, "undefined_metrics": undefined,
               "skipped_images": data.skipped[:100],
               "unreadable_during_training": unreadable[:100], "test_images": images, "detections": found,
               "train_time_all_attempts_s": last.get(TRAIN_TIME_KEY),
               "detectron2_config": str(output_dir / "config.yaml"), "iterations": d2cfg.SOLVER.MAX_ITER})
