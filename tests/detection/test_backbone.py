"""The detectron2 Backbone over registry backbones, and the detectron2 config built around it."""
from __future__ import annotations

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed; it is not on PyPI, build it from source "
                    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) to run these tests")

import torch  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from torch import nn  # noqa: E402

from tasks.detection.backbone import TransferBackbone, level_name  # noqa: E402
from tasks.detection.config import build_detectron2_config  # noqa: E402
from tasks.detection.train import launch_settings  # noqa: E402
from transfer.backbones import BACKBONES, build_backbone  # noqa: E402
from transfer.config import compose, validate  # noqa: E402
from transfer.errors import ConfigError  # noqa: E402

RESNET_RS = [name for name in BACKBONES.names() if BACKBONES.get(name).family == "resnet_rs"]
LEVELS = ["res2", "res3", "res4", "res5"]


@pytest.fixture(scope="module")
def rs50():
    return build_backbone("rs50", weights="random")


def _wrap(**kw) -> TransferBackbone:
    return TransferBackbone(build_backbone("rs50", weights="random"), out_features=kw.pop("out_features", LEVELS),
                            **kw)


def _level_params(wrapper: TransferBackbone) -> list[list[nn.Parameter]]:
    """Parameters of each level's own module (the stem's modules sit before the first stage)."""
    model = wrapper.body.model
    modules = [info["module"] for info in model.feature_info]
    first_stage = model.get_submodule(modules[1])
    stage_ids = {id(p) for p in first_stage.parameters()}
    stem = []
    for p in model.parameters():
        if id(p) in stage_ids:
            break
        stem.append(p)
    return [stem] + [list(model.get_submodule(m).parameters()) for m in modules[1:]]


def test_features_have_the_declared_channels_and_strides(rs50):
    wrapper = TransferBackbone(rs50, out_features=LEVELS)
    x = torch.rand(1, 3, 64, 96)
    out = wrapper(x)
    assert list(out) == LEVELS
    for name, shape in wrapper.output_shape().items():
        assert out[name].shape[1] == shape.channels
        assert out[name].shape[-2:] == (64 // shape.stride, 96 // shape.stride)
        assert level_name(shape.stride) == name


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at_fixes_exactly_the_first_levels(freeze_at):
    wrapper = _wrap(freeze_at=freeze_at, norm="BN")
    for level, params in enumerate(_level_params(wrapper)):
        assert params
        assert all(p.requires_grad == (level >= freeze_at) for p in params), level
    bns = [(name, m) for name, m in wrapper.body.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [m for m in wrapper.body.model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bool(frozen) == (freeze_at > 0)
    assert bool(bns) == (freeze_at < 5)


def test_frozen_levels_get_no_gradient():
    wrapper = _wrap(freeze_at=2, norm="FrozenBN")
    sum(o.sum() for o in wrapper(torch.rand(1, 3, 32, 32)).values()).backward()
    stem, res2, res3 = _level_params(wrapper)[:3]
    assert all(p.grad is None for p in stem + res2)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in res3)


def test_syncbn_replaces_the_norms_of_trained_levels():
    wrapper = _wrap(freeze_at=2, norm="SyncBN")
    model = wrapper.body.model
    modules = [info["module"] for info in model.feature_info]
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.get_submodule(modules[2]).modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.get_submodule(modules[1]).modules())
    wrapper.train()
    assert wrapper(torch.rand(2, 3, 64, 64))["res5"].shape[1] == model.feature_info[-1]["num_chs"]


@pytest.mark.parametrize("kw, match", [
    (dict(norm="GN"), "GroupNorm cannot replace"),
    (dict(freeze_at=6), "freeze_at=6"),
    (dict(out_features=["res6"]), "res6"),
])
def test_impossible_options_raise(kw, match):
    with pytest.raises(ConfigError, match=match):
        _wrap(**kw)


def _d2cfg(tmp_path, *overrides):
    cfg = validate(compose([*overrides, "backbone.weights=random", "logger.wandb.mode=disabled"]))
    return build_detectron2_config(cfg, tmp_path / "out")


@pytest.mark.parametrize("name", RESNET_RS)
def test_mask_rcnn_builds_from_every_resnet_rs_entry(name, coco_root, tmp_path):
    # On the meta device: the full structure and every shape, without allocating or initialising weights.
    d2cfg = _d2cfg(tmp_path, "task=coco_instance_seg", f"backbone.name={name}", f"task.data_dir={coco_root}",
                   "task.opts=[MODEL.DEVICE,meta]")
    with torch.device("meta"):
        model = build_model(d2cfg)
        pyramid = model.backbone(torch.empty(1, 3, 64, 96))
    bottom_up = model.backbone.bottom_up
    assert bottom_up.body.spec.name == name
    channels = BACKBONES.get(name).feature_channels
    assert [s.channels for s in bottom_up.output_shape().values()] == list(channels[1:])
    assert {k: tuple(v.shape) for k, v in pyramid.items()} == {
        f"p{i}": (1, 256, 64 // 2 ** i, -(-96 // 2 ** i)) for i in range(2, 7)}
    assert model.roi_heads.box_predictor.num_classes == 2


def test_config_uses_the_backbone_normalisation_and_the_local_data(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}",
                   "task.class_names=[red,blue]")
    spec = BACKBONES.get("rs50")
    assert d2cfg.INPUT.FORMAT == "RGB"
    assert d2cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * m for m in spec.mean])
    assert d2cfg.MODEL.PIXEL_STD == pytest.approx([255 * s for s in spec.std])
    assert d2cfg.MODEL.WEIGHTS == ""
    assert d2cfg.MODEL.BACKBONE.NAME == "build_transfer_fpn_backbone"
    assert len(d2cfg.DATASETS.TRAIN) == 2 and d2cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2


def test_frozen_protocol_freezes_every_level(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                   "protocol.freeze_backbone=true")
    assert d2cfg.MODEL.BACKBONE.FREEZE_AT == len(BACKBONES.get("rs50").feature_strides)


def test_max_steps_shortens_the_schedule_keeping_its_shape(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_detection", f"task.data_dir={coco_root}", "trainer.max_steps=900")
    # detectron2's 1x: 90k iterations, LR drops at 60k and 80k, 1k warmup (configs/Base-RCNN-FPN.yaml, defaults.py).
    assert d2cfg.SOLVER.MAX_ITER == 900
    assert tuple(d2cfg.SOLVER.STEPS) == (600, 800)
    assert d2cfg.SOLVER.WARMUP_ITERS == 10


def test_head_norm_reaches_fpn_and_heads(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_instance_seg", f"task.data_dir={coco_root}", "task.head_norm=GN")
    assert d2cfg.MODEL.FPN.NORM == d2cfg.MODEL.ROI_BOX_HEAD.NORM == d2cfg.MODEL.ROI_MASK_HEAD.NORM == "GN"
    assert d2cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4
    model = build_model(d2cfg)
    assert any(isinstance(m, nn.GroupNorm) for m in model.roi_heads.box_head.modules())


def test_retinanet_gets_p3_to_p7(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_retinanet", f"task.data_dir={coco_root}")
    assert d2cfg.MODEL.BACKBONE.NAME == "build_transfer_retinanet_fpn_backbone"
    model = build_model(d2cfg)
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]


@pytest.mark.parametrize("override, match", [
    ("task.base_config=COCO-Detection/nope.yaml", "not a detectron2 model-zoo config"),
    ("task.base_config=COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", "FPN builders"),
    ("trainer.precision=bf16-mixed", "trainer.precision"),
    ("task.freeze_at=9", "exceeds"),
    ("task.opts=[MODEL.NO_SUCH_KEY,1]", "task.opts"),
])
def test_bad_detectron2_settings_are_config_errors(override, match, coco_root, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _d2cfg(tmp_path, "task=coco_detection", f"task.data_dir={coco_root}", override, "trainer.devices=1")


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the CPU-only refusal of several processes")
def test_several_processes_need_cuda(coco_root, tmp_path):
    with pytest.raises(ConfigError, match="only with CUDA devices"):
        _d2cfg(tmp_path, "task=coco_detection", f"task.data_dir={coco_root}", "trainer.devices=2",
               "trainer.accelerator=cpu")


def test_multi_node_launch_reads_the_rendezvous_from_the_environment(monkeypatch):
    assert launch_settings(1) == (0, "auto")
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        launch_settings(2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    assert launch_settings(2) == (1, "tcp://10.0.0.1:29500")
