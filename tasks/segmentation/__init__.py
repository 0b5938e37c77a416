"""Semantic segmentation transfer through detectron2: Semantic FPN on Pascal VOC 2012 and ADE20K.

Importing this package registers the ``segmentation`` task adapter; detectron2 itself is imported only
when a segmentation run starts, so the rest of the suite works where it is not installed.
"""
from tasks.detection.requirement import require_detectron2
from tasks.segmentation.config import SegmentationTaskConfig, check
from transfer.protocols import FrozenProtocolConfig, RecipeFinetuneProtocolConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput

# Percent. mIoU and mean class accuracy average over the classes present in the evaluation split;
# fwIoU weights each class's IoU by its share of labelled pixels (detectron2 SemSegEvaluator).
METRICS = ("test/miou", "test/fwiou", "test/mean_acc", "test/pixel_acc")


def run(ctx: RunContext) -> TaskOutput:
    """Fine-tuned (``protocol=finetune``) or frozen-backbone (``protocol=frozen``) segmentation."""
    require_detectron2()
    from tasks.segmentation.train import run as train_and_evaluate

    return train_and_evaluate(ctx)


# task.solver holds the training values: the fine-tune protocol only says whether the backbone trains.
TASKS.add("segmentation", TaskAdapter(config_class=SegmentationTaskConfig, run=run,
                                      protocols={"finetune": RecipeFinetuneProtocolConfig,
                                                 "frozen": FrozenProtocolConfig},
                                      check=check, metrics=METRICS))
