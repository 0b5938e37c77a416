"""Object detection and instance segmentation transfer through detectron2 (Faster/Mask/Cascade R-CNN, RetinaNet).

Importing this package registers the ``detection`` task adapter; detectron2 itself is imported only
when a detection run starts, so the rest of the suite works where it is not installed.
"""
from tasks.detection.config import DetectionTaskConfig
from tasks.detection.requirement import require_detectron2
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput


def run(ctx: RunContext) -> TaskOutput:
    """Fine-tune (``protocol=finetune``) or frozen-backbone (``protocol.freeze_backbone=true``) detection transfer."""
    require_detectron2()
    from tasks.detection.train import run as train_and_evaluate

    return train_and_evaluate(ctx)


TASKS.add("detection", TaskAdapter(config_class=DetectionTaskConfig, run=run, protocols=("finetune",)))
