"""Object detection and instance segmentation transfer through detectron2 (Faster/Mask/Cascade R-CNN, RetinaNet).

Importing this package registers the ``detection`` task adapter and its ``frozen`` protocol; detectron2
itself is imported only when a detection run starts (or, where installed, when ``check`` tries the
translation), so the rest of the suite works where it is not installed.
"""
from tasks.detection.requirement import require_detectron2
from tasks.detection.schema import METRICS, DetectionTaskConfig, check
from transfer.protocols import FrozenProtocolConfig, RecipeFinetuneProtocolConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput


def run(ctx: RunContext) -> TaskOutput:
    """Fine-tuned (``protocol=finetune``) or frozen-backbone (``protocol=frozen``) detection transfer."""
    require_detectron2()
    from tasks.detection.train import run as train_and_evaluate

    return train_and_evaluate(ctx)


# What the detector is: changing one of these on resume would load the optimizer of another model.
MODEL_KEYS = ("task.base_config", "task.class_names", "task.freeze_at", "task.frozen_freeze_at", "task.backbone_norm",
              "task.head_norm", "task.res5_extra_norm", "task.opts")
# The solver is detectron2's config (task.solver, task.opts): the fine-tune protocol only says whether the backbone
# trains, and protocol.freeze_backbone=true is the frozen protocol (RecipeFinetuneProtocolConfig.canonical).
TASKS.add("detection", TaskAdapter(config_class=DetectionTaskConfig, run=run,
                                   protocols={"finetune": RecipeFinetuneProtocolConfig, "frozen": FrozenProtocolConfig},
                                   check=check, metrics=METRICS, model_keys=MODEL_KEYS))
