"""The translation of a detection run's settings into a detectron2 config (imported only with detectron2).

A recipe names a detectron2 model-zoo config (``base_config``) for the architecture, heads and schedule;
this module swaps its ImageNet R-50 for the chosen registry backbone (with that backbone's own
normalisation), points it at the local data and applies the recipe's overrides. Two architectures take a
registry backbone: FPN (Faster/Mask/Cascade R-CNN, RetinaNet) and C4 (Faster/Mask R-CNN whose RoI head is
the backbone's own last stage, as in detectron2's ``Base-RCNN-C4.yaml`` and MoCo's VOC protocol).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

from tasks.detection.backbone import add_transfer_backbone_config
from tasks.detection.data import DataSplits
from tasks.detection.schema import (
    SolverConfig,
    amp_enabled,
    detection_device,
    frozen_levels,
    world_size,
)
from transfer.backbones import BACKBONES
from transfer.errors import ConfigError

if TYPE_CHECKING:
    from transfer.config import BackboneConfig, RunConfig

# detectron2's backbone builders and the builders of tasks/detection/backbone.py that replace them.
FPN_BUILDERS = {"build_resnet_fpn_backbone": "build_transfer_fpn_backbone",
                "build_retinanet_resnet_fpn_backbone": "build_transfer_retinanet_fpn_backbone"}
# C4: the backbone ends at res4 and the RoI head runs res5 on each region (detectron2 Base-RCNN-C4.yaml).
C4_BUILDER, C4_HEADS = "build_resnet_backbone", "Res5ROIHeads"
TRANSFER_C4_BUILDER, TRANSFER_C4_HEADS = "build_transfer_c4_backbone", "TransferRes5ROIHeads"


def build_detectron2_config(cfg: RunConfig, output_dir: Path | None = None,
                            data: DataSplits | None = None) -> CfgNode:
    """The detectron2 config of a run: model-zoo base + registry backbone + local data + overrides.

    Without ``data`` the data sets and class count stay the base config's (used by the adapter's ``check``
    to refuse a bad config before a run directory exists). Raises :class:`ConfigError`.
    """
    task = cfg.task
    d2 = get_cfg()
    add_transfer_backbone_config(d2)
    try:
        d2.merge_from_file(model_zoo.get_config_file(task.base_config))
    except RuntimeError:
        raise ConfigError(f"task.base_config={task.base_config!r} is not a detectron2 model-zoo config. Use a path "
                          "under detectron2's configs/ folder, e.g. COCO-InstanceSegmentation/"
                          "mask_rcnn_R_50_FPN_1x.yaml.") from None
    use_registry_backbone(d2, cfg.backbone, norm=task.backbone_norm, freeze_at=frozen_levels(cfg),
                          res5_extra_norm=task.res5_extra_norm, base_config=task.base_config)
    if task.head_norm:
        _set_head_norm(d2, task.head_norm)
    if data is not None:
        d2.DATASETS.TRAIN, d2.DATASETS.TEST = tuple(data.train), (data.test,)
        d2.MODEL.ROI_HEADS.NUM_CLASSES = d2.MODEL.RETINANET.NUM_CLASSES = len(data.classes)

    apply_solver(d2, task.solver, cfg.trainer.max_steps, recipe_solver(task.name))
    for key, value in (("MIN_SIZE_TRAIN", task.input.min_size_train), ("MAX_SIZE_TRAIN", task.input.max_size_train),
                       ("MIN_SIZE_TEST", task.input.min_size_test), ("MAX_SIZE_TEST", task.input.max_size_test)):
        if value is not None:
            d2.INPUT[key] = tuple(value) if isinstance(value, list) else value
    d2.TEST.EVAL_PERIOD = task.eval_period
    d2.TEST.PRECISE_BN.ENABLED = task.precise_bn
    d2.MODEL.DEVICE = detection_device(cfg)
    d2.SOLVER.AMP.ENABLED = amp_enabled(cfg.trainer.precision, d2.MODEL.DEVICE)
    d2.DATALOADER.NUM_WORKERS = cfg.trainer.num_workers
    d2.TRANSFER = CfgNode({"LOG_PERIOD": cfg.trainer.log_every_n_steps})  # read by DetectionTrainer
    d2.SEED = cfg.trainer.seed
    d2.OUTPUT_DIR = str(output_dir) if output_dir is not None else ""
    try:
        d2.merge_from_list(list(task.opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"task.opts={task.opts} could not be applied to the detectron2 config: {e}") from None
    n = world_size(cfg)
    if d2.SOLVER.IMS_PER_BATCH % n:
        raise ConfigError(f"task.solver.ims_per_batch={d2.SOLVER.IMS_PER_BATCH} is not divisible by the {n} "
                          "processes (trainer.devices x trainer.num_nodes); detectron2 splits it evenly.")
    d2.freeze()
    return d2


def use_registry_backbone(d2: CfgNode, backbone: BackboneConfig, *, norm: str = "FrozenBN", freeze_at: int = 2,
                          res5_extra_norm: bool = False, base_config: str = "the base config") -> str:
    """Swap the backbone builder of a detectron2 config for its registry-backbone twin; returns the architecture.

    The run's ``backbone`` section goes into ``MODEL.TRANSFER_BACKBONE`` whole, so the builders build it as every
    task does (:func:`tasks.detection.backbone.backbone_section`).

    FPN configs get the registry FPN builders; C4 configs (``build_resnet_backbone`` with ``Res5ROIHeads``)
    get a res2-res4 trunk and RoI heads that run the registry backbone's own last stage. Input
    normalisation becomes the backbone's (RGB, its mean and std in 0-255 pixels). Raises ConfigError for
    other architectures (dilated C5, ViT, RegNet builders).
    """
    spec = BACKBONES.get(backbone.name)
    builder = d2.MODEL.BACKBONE.NAME
    if builder in FPN_BUILDERS:
        d2.MODEL.BACKBONE.NAME = FPN_BUILDERS[builder]
        architecture = "FPN"
    elif builder == C4_BUILDER and d2.MODEL.ROI_HEADS.NAME == C4_HEADS and d2.MODEL.RESNETS.RES5_DILATION == 1:
        d2.MODEL.BACKBONE.NAME = TRANSFER_C4_BUILDER
        d2.MODEL.ROI_HEADS.NAME = TRANSFER_C4_HEADS
        architecture = "C4"
    else:
        raise ConfigError(f"task.base_config={base_config!r} uses backbone builder {builder!r} with RoI heads "
                          f"{d2.MODEL.ROI_HEADS.NAME!r}; registry backbones replace the FPN builders "
                          f"{sorted(FPN_BUILDERS)} and the C4 pair ({C4_BUILDER!r}, {C4_HEADS!r}, no dilation). "
                          "Use a *_FPN_* or *_C4_* model-zoo config.")
    if res5_extra_norm and architecture != "C4":
        raise ConfigError(f"task.res5_extra_norm=true applies to C4 detectors, whose RoI head is res5; "
                          f"task.base_config={base_config!r} is {architecture}.")
    d2.MODEL.WEIGHTS = ""  # the builder loads the registry weights; nothing else is loaded over them
    tb = d2.MODEL.TRANSFER_BACKBONE
    tb.NAME, tb.WEIGHTS, tb.STRICT, tb.NORM = backbone.name, backbone.weights, backbone.strict, norm
    tb.MIN_LOADED_FRACTION, tb.DROP_PATH_RATE = backbone.min_loaded_fraction, backbone.drop_path_rate
    tb.RES5_EXTRA_NORM = res5_extra_norm
    d2.MODEL.BACKBONE.FREEZE_AT = freeze_at
    # detectron2 normalises raw 0-255 pixels, in the channel order of INPUT.FORMAT.
    d2.INPUT.FORMAT = "RGB"
    d2.MODEL.PIXEL_MEAN = [255.0 * m for m in spec.mean]
    d2.MODEL.PIXEL_STD = [255.0 * s for s in spec.std]
    return architecture


def architecture_of(d2: CfgNode) -> str:
    return "C4" if d2.MODEL.BACKBONE.NAME == TRANSFER_C4_BUILDER else "FPN"


def _set_head_norm(d2: CfgNode, norm: str) -> None:
    d2.MODEL.FPN.NORM = d2.MODEL.ROI_BOX_HEAD.NORM = d2.MODEL.ROI_MASK_HEAD.NORM = d2.MODEL.RETINANET.NORM = norm
    if d2.MODEL.ROI_BOX_HEAD.NUM_CONV == 0 and architecture_of(d2) == "FPN":
        # Norms act on convolutions; with a norm the box head becomes 4 conv + 1 fc, as in detectron2's
        # configs/Misc/mask_rcnn_R_50_FPN_3x_gn.yaml and mask_rcnn_R_50_FPN_3x_syncbn.yaml.
        d2.MODEL.ROI_BOX_HEAD.NUM_CONV, d2.MODEL.ROI_BOX_HEAD.NUM_FC = 4, 1


def recipe_solver(name: str) -> dict:
    """The ``solver`` section of the task recipe ``recipes/task/<name>.yaml`` as written (empty when none)."""
    from omegaconf import OmegaConf

    from transfer.config import RECIPES_DIR

    path = RECIPES_DIR / "task" / f"{name}.yaml"
    if not path.is_file():
        return {}
    return dict(OmegaConf.to_container(OmegaConf.load(path)).get("solver") or {})


def apply_solver(d2: CfgNode, solver: SolverConfig, max_steps: int, recipe: dict | None = None) -> None:
    """Solver overrides, the linear LR scaling rule, and ``trainer.max_steps`` as a shortened schedule.

    Records what it changed and why in ``d2.TRANSFER_NOTES`` (logged by the run): the LR scaled for a
    smaller ``ims_per_batch`` (linear scaling rule, Goyal et al. 2017, arXiv 1706.02677) unless
    ``base_lr`` is set; the schedule shortened to ``max_steps`` with its LR drops at the same fractions;
    warm-up kept at the base config's length (at most a quarter of a shortened schedule) unless set; and, when
    the task recipe (``recipe``: its ``solver`` section) fixes ``base_lr`` and the run changes ``ims_per_batch``,
    that the LR was kept, not scaled.
    """
    notes = []
    base_ims, base_lr = d2.SOLVER.IMS_PER_BATCH, d2.SOLVER.BASE_LR
    for key, value in (("IMS_PER_BATCH", solver.ims_per_batch), ("BASE_LR", solver.base_lr),
                       ("MAX_ITER", solver.max_iter), ("WARMUP_ITERS", solver.warmup_iters),
                       ("WEIGHT_DECAY", solver.weight_decay), ("MOMENTUM", solver.momentum)):
        if value is not None:
            d2.SOLVER[key] = value
    if solver.base_lr is None and d2.SOLVER.IMS_PER_BATCH != base_ims:
        d2.SOLVER.BASE_LR = base_lr * d2.SOLVER.IMS_PER_BATCH / base_ims
        notes.append(f"task.solver.ims_per_batch={d2.SOLVER.IMS_PER_BATCH} (base config: {base_ims}): learning rate "
                     f"scaled linearly from {base_lr:g} to {d2.SOLVER.BASE_LR:g} (linear scaling rule); set "
                     "task.solver.base_lr to choose it yourself.")
    recipe = recipe or {}
    if (recipe.get("base_lr") is not None and solver.base_lr == recipe["base_lr"]
            and d2.SOLVER.IMS_PER_BATCH != (recipe.get("ims_per_batch") or base_ims)):
        # The recipe fixes the LR for its batch size: another batch size keeps it unless the user sets one.
        recipe_ims = recipe.get("ims_per_batch") or base_ims
        notes.append(f"task.solver.ims_per_batch={d2.SOLVER.IMS_PER_BATCH} (recipe: {recipe_ims}) with the recipe's "
                     f"task.solver.base_lr={solver.base_lr:g}, which is not scaled because the recipe sets it; the "
                     f"linear scaling rule would give {solver.base_lr * d2.SOLVER.IMS_PER_BATCH / recipe_ims:g}. Set "
                     "task.solver.base_lr to choose it.")
    if solver.steps is not None:
        d2.SOLVER.STEPS = tuple(solver.steps)
    d2.SOLVER.CHECKPOINT_PERIOD = solver.checkpoint_period
    if max_steps > 0 and max_steps != d2.SOLVER.MAX_ITER:
        scale = max_steps / d2.SOLVER.MAX_ITER
        # detectron2's scheduler needs strictly increasing drops before the last iteration.
        steps = {max(1, round(s * scale)) for s in d2.SOLVER.STEPS}
        d2.SOLVER.STEPS = tuple(sorted(s for s in steps if s < max_steps))
        notes.append(f"trainer.max_steps={max_steps}: schedule of {d2.SOLVER.MAX_ITER} iterations shortened to "
                     f"{max_steps}, LR drops at {list(d2.SOLVER.STEPS)}.")
        d2.SOLVER.MAX_ITER = max_steps
        if solver.warmup_iters is None:
            # The warm-up protects freshly initialised heads from the full LR; its length does not depend on
            # the schedule's, so it is kept, leaving at least three quarters of a short schedule at full LR.
            d2.SOLVER.WARMUP_ITERS = min(d2.SOLVER.WARMUP_ITERS, max(1, max_steps // 4))
    d2.TRANSFER_NOTES = notes


def solver_record(d2: CfgNode) -> dict:
    """The training values a run actually used (results.json ``recipe``)."""
    s, m = d2.SOLVER, d2.MODEL
    return {
        "architecture": architecture_of(d2),
        "freeze_at": m.BACKBONE.FREEZE_AT,
        "backbone_norm": m.TRANSFER_BACKBONE.NORM,
        "res5_extra_norm": m.TRANSFER_BACKBONE.RES5_EXTRA_NORM,
        "head_norm": m.FPN.NORM if architecture_of(d2) == "FPN" else m.ROI_BOX_HEAD.NORM,
        "ims_per_batch": s.IMS_PER_BATCH, "base_lr": s.BASE_LR, "max_iter": s.MAX_ITER, "steps": list(s.STEPS),
        "gamma": s.GAMMA, "warmup_iters": s.WARMUP_ITERS, "warmup_factor": s.WARMUP_FACTOR,
        "warmup_method": s.WARMUP_METHOD, "lr_scheduler": s.LR_SCHEDULER_NAME, "weight_decay": s.WEIGHT_DECAY,
        "momentum": s.MOMENTUM, "nesterov": s.NESTEROV, "amp": s.AMP.ENABLED,
        "min_size_train": list(d2.INPUT.MIN_SIZE_TRAIN), "max_size_train": d2.INPUT.MAX_SIZE_TRAIN,
        "min_size_test": d2.INPUT.MIN_SIZE_TEST, "max_size_test": d2.INPUT.MAX_SIZE_TEST,
        "pixel_mean": list(m.PIXEL_MEAN), "pixel_std": list(m.PIXEL_STD), "input_format": d2.INPUT.FORMAT,
        "precise_bn": d2.TEST.PRECISE_BN.ENABLED, "notes": list(d2.TRANSFER_NOTES),
    }
