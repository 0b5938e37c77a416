"""ImageNet-1k evaluation of a backbone's own classifier (``task=imagenet``).

Importing this package registers the ``imagenet`` task adapter and its ``eval`` protocol (schemas:
:mod:`tasks.imagenet.config`, no training library); the evaluation itself (:mod:`tasks.imagenet.task`: Lightning,
timm's transforms) is imported when a run starts.
"""
from tasks.imagenet.config import SPLITS, ImageNetTaskConfig, PretrainedEvalConfig
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput


def run(ctx: RunContext) -> TaskOutput:
    """Top-1 and top-5 of the backbone's own classifier (:func:`tasks.imagenet.task.run`)."""
    from tasks.imagenet.task import run as evaluate

    return evaluate(ctx)


TASKS.add("imagenet", TaskAdapter(config_class=ImageNetTaskConfig, run=run, protocols={"eval": PretrainedEvalConfig},
                                  metrics=tuple(f"{s}/top{k}" for s in SPLITS for k in (1, 5))))
