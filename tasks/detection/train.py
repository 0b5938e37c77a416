"""Detection transfer runs: detectron2's trainer, hooks and evaluators, started through its ``launch``.

The launching process checks the configuration, data layout and weights, then ``launch`` runs
:func:`train_worker` once per device (spawning processes when there are several, on every node).
Rank 0's detectron2 ``JSONWriter`` records the training losses and the final evaluation in
``metrics.json``; the launching process reads that file back, so one code path serves one process
and many.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from tasks.detection import backbone as _registers_fpn_builders  # noqa: F401  (BACKBONE_REGISTRY entries)
from tasks.detection.config import DetectionTaskConfig, build_detectron2_config, detection_devices, register_data
from tasks.detection.data import LAYOUTS
from transfer.backbones import build_backbone
from transfer.engine import CHECKPOINT_DIR
from transfer.errors import ConfigError, TransferError
from transfer.tasks import RunContext, TaskOutput
from transfer.tracking import is_global_zero

METRICS_LOG = "metrics.json"  # detectron2's JSONWriter output, one JSON object per line
# detectron2 evaluators report per task (bbox, segm); suite metric keys are split/metric.
TASK_PREFIX = {"bbox": "", "segm": "mask_"}


class DetectionTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the evaluator of each test set's layout (VOC or COCO).

    Its writers (metrics.json, TensorBoard, console) run every ``TRANSFER.LOG_PERIOD`` iterations
    (``trainer.log_every_n_steps``) instead of DefaultTrainer's fixed 20.
    """

    def build_hooks(self) -> list:
        kept = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicWriter)]
        if comm.is_main_process():
            kept.append(hooks.PeriodicWriter(self.build_writers(), period=self.cfg.TRANSFER.LOG_PERIOD))
        return kept

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str):
        layout = LAYOUTS.get(MetadataCatalog.get(dataset_name).transfer_layout)
        return layout.evaluator(dataset_name, cfg, Path(cfg.OUTPUT_DIR) / "inference")


def train_worker(d2cfg: CfgNode, task: DetectionTaskConfig, resume: bool) -> DetectionTrainer:
    """One process of a (possibly distributed) run: register the data, train, evaluate at the end."""
    register_data(task)  # detectron2's catalogs live in each process
    seed_all_rng(None if d2cfg.SEED < 0 else d2cfg.SEED + comm.get_rank())
    if comm.is_main_process():
        Path(d2cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(d2cfg.OUTPUT_DIR) / "config.yaml").write_text(d2cfg.dump())
    trainer = DetectionTrainer(d2cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


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


def split_metrics(record: dict, split: str = "test") -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Evaluation scalars of one record -> (headline metrics, per-class APs, undefined metric names).

    ``bbox/AP50`` becomes ``test/AP50`` and ``segm/AP`` ``test/mask_AP``; per-class APs (``bbox/AP-cat``)
    go to their own table. COCO's evaluator reports NaN for a class without ground truth and for
    every AP when the model made no detection; those are listed, not reported as numbers.
    """
    metrics, per_class, undefined = {}, {}, []
    for key, value in record.items():
        task, _, name = key.partition("/")
        if task not in TASK_PREFIX or not name:
            continue
        out = f"{split}/{TASK_PREFIX[task]}{name}"
        if isinstance(value, float) and math.isnan(value):
            undefined.append(out)
        elif name.startswith("AP-"):
            per_class[out] = float(value)
        else:
            metrics[out] = float(value)
    return metrics, per_class, undefined


def log_training(records: list[dict], logger) -> None:
    """Send detectron2's training scalars (losses, lr, timings) to W&B as ``train/<name>`` by iteration."""
    for record in records:
        scalars = {f"train/{k}": v for k, v in record.items()
                   if k != "iteration" and "/" not in k and isinstance(v, (int, float))}
        if scalars and "iteration" in record:
            logger.log(scalars, step=int(record["iteration"]))


def run(ctx: RunContext) -> TaskOutput:
    """Fine-tune a detector on the registry backbone and evaluate it on the test split."""
    cfg = ctx.cfg
    output_dir = ctx.run_dir / CHECKPOINT_DIR
    d2cfg = build_detectron2_config(cfg, output_dir)
    # Resolve (and download) the weights once here, so a bad source fails with one message, not per process.
    weights = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, strict=cfg.backbone.strict).weights
    machine_rank, dist_url = launch_settings(cfg.trainer.num_nodes)
    launch(train_worker, detection_devices(cfg), num_machines=cfg.trainer.num_nodes, machine_rank=machine_rank,
           dist_url=dist_url, args=(d2cfg, cfg.task, cfg.resume))
    if not is_global_zero():
        return TaskOutput(metrics={}, weights=weights.as_dict())
    records = read_metrics_log(output_dir / METRICS_LOG)
    log_training(records, ctx.logger)
    evaluated = [r for r in records if any(k.startswith("bbox/") for k in r)]
    if not evaluated:
        raise TransferError(f"detectron2 wrote no evaluation to {str(output_dir / METRICS_LOG)!r}; see its log above.")
    metrics, per_class, undefined = split_metrics(evaluated[-1])
    ctx.logger.log(metrics, step=int(evaluated[-1].get("iteration", d2cfg.SOLVER.MAX_ITER)))
    if per_class:
        ctx.logger.table("test/per_class_AP", ["metric", "value"], [[k, v] for k, v in sorted(per_class.items())])
    return TaskOutput(metrics=metrics, counts={"undefined_metrics": len(undefined)}, weights=weights.as_dict(),
                      primary_metric="test/AP50" if cfg.task.dataset == "voc" else "test/AP",
                      extra={"per_class_AP": per_class, "undefined_metrics": undefined,
                             "detectron2_config": str(output_dir / "config.yaml"),
                             "iterations": d2cfg.SOLVER.MAX_ITER, "ims_per_batch": d2cfg.SOLVER.IMS_PER_BATCH})
