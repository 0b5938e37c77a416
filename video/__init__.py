"""Video: 2D->3D inflation of registry backbones, Kinetics data, multi-view testing and the video task adapter.

Importing this package registers the ``video`` task adapter (schemas and checks: :mod:`video.config`, no training
library); the training and multi-view testing (:mod:`video.task`: Lightning) are imported when a run starts.
"""
from transfer.tasks import TASKS, RunContext, TaskAdapter, TaskOutput
from video.config import VideoFinetuneProtocolConfig, VideoTaskConfig, check


def run(ctx: RunContext) -> TaskOutput:
    """Train the inflated backbone on Kinetics clips and test with multi-view averaging (:func:`video.task.run`)."""
    from video.task import run as train_and_test

    return train_and_test(ctx)


# protocol=finetune is the 3D training recipe (video.config.VideoFinetuneProtocolConfig); the name is the image
# tasks' so runs land in <backbone>-finetune and match the published fine-tune / from-scratch rows.
TASKS.add("video", TaskAdapter(config_class=VideoTaskConfig, run=run, check=check, metrics=("test/top1", "test/top5"),
                               protocols={"finetune": VideoFinetuneProtocolConfig}))
