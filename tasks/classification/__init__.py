"""Image classification transfer: linear probe, k-NN and fine-tuning on registered data sets.

Importing this package registers the ``classification`` task adapter: its schemas and checks, which
``transfer.config.validate`` needs, import no training library; the task itself (:mod:`tasks.classification.task`:
Lightning, timm's transforms, the data sets) is imported when a run starts.
"""
from tasks.classification.config import ClassificationTaskConfig, check
from tasks.classification.protocols import PROTOCOLS
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput


def run(ctx: RunContext) -> TaskOutput:
    """Linear probe, k-NN or fine-tuning, as ``protocol.name`` says (:func:`tasks.classification.task.run`)."""
    from tasks.classification.task import run as run_protocol

    return run_protocol(ctx)


TASKS.add("classification", TaskAdapter(config_class=ClassificationTaskConfig, run=run, check=check,
                                        protocols=PROTOCOLS,
                                        metrics=("test/top1", "test/top5", "test/mean_per_class")))
