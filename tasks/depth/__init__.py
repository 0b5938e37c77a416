"""Monocular depth estimation transfer on NYU Depth v2 (``task=nyu_depth``), trained by the shared Lightning engine.

Importing this package registers the ``depth`` task adapter (schema and checks: :mod:`tasks.depth.config`, no
training library); the training itself (:mod:`tasks.depth.task`: Lightning) is imported when a run starts. Reading
the labelled ``.mat`` release needs h5py, imported only when such a copy is read.
"""
from tasks.depth.config import (
    MODEL_KEYS,
    DepthFinetuneProtocolConfig,
    DepthFrozenProtocolConfig,
    DepthTaskConfig,
    check,
)
from tasks.depth.metrics import LOWER_IS_BETTER, METRICS
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput


def run(ctx: RunContext) -> TaskOutput:
    """Train the FCRN head (and the backbone, unless frozen) and test on NYU (:func:`tasks.depth.task.run`)."""
    from tasks.depth.task import run as train_and_test

    return train_and_test(ctx)


# Both protocols carry BYOL's SGD recipe (tasks.depth.config, with its sources); finetune with
# freeze_backbone=true is the frozen protocol (DepthFinetuneProtocolConfig.canonical).
TASKS.add("depth", TaskAdapter(config_class=DepthTaskConfig, run=run, check=check,
                               protocols={"finetune": DepthFinetuneProtocolConfig, "frozen": DepthFrozenProtocolConfig},
                               metrics=METRICS, lower_is_better=tuple(f"test/{m}" for m in LOWER_IS_BETTER),
                               model_keys=MODEL_KEYS))
