"""The detectron2 Backbone over registry backbones (FPN and C4), and the detectron2 config built around it."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.detectron2
pytest.importorskip("detectron2", reason="detectron2 is not installed; it is not on PyPI, build it from source "
                    "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html) to run these tests")

import torch  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from tasks.detection.backbone import TransferBackbone, backbone_section, build_registry_body, level_name  # noqa: E402
from tasks.detection.data import register_data  # noqa: E402
from tasks.detection.train import launch_settings  # noqa: E402
from tasks.detection.translate import build_detectron2_config  # noqa: E402
from transfer.backbones import BACKBONES, build_backbone  # noqa: E402
from transfer.config import BackboneConfig, compose, validate  # noqa: E402
from transfer.errors import ConfigError  # noqa: E402

RESNET_RS = [name for name in BACKBONES.names() if BACKBONES.get(name).family == "resnet_rs"]
LEVELS = ["res2", "res3", "res4", "res5"]


@pytest.fixture(scope="module")
def rs50():
    return build_backbone("rs50", weights="random")


def _wrap(**kw) -> TransferBackbone:
    return TransferBackbone(build_backbone("rs50", weights="random"), out_features=kw.pop("out_features", LEVELS),
                            **kw)


def _wrap_on_meta(**kw) -> TransferBackbone:
    """:func:`_wrap` on the meta device: every module, flag and shape, no weights allocated or initialised."""
    with torch.device("meta"):
        return _wrap(**kw)


def _build_on_meta(d2cfg):
    """detectron2's ``build_model`` on the meta device: the whole structure, module types and ``requires_grad``
    flags, without allocating or initialising weights."""
    d2cfg = d2cfg.clone()
    d2cfg.defrost()
    d2cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        return build_model(d2cfg)


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
    wrapper = _wrap_on_meta(freeze_at=freeze_at, norm="BN")
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
        _wrap_on_meta(**kw)


def _d2cfg(tmp_path, *overrides):
    cfg = validate(compose([*overrides, "backbone.weights=random", "logger.wandb.mode=disabled"]))
    return build_detectron2_config(cfg, tmp_path / "out", register_data(cfg.task))


def _network(name: str) -> tuple[str, str]:
    """Entries with equal keys build the same network (rs152, rs152_i192, ...: one network, other weights)."""
    spec = BACKBONES.get(name)
    return spec.arch, repr(sorted(spec.arch_kwargs.items()))


@pytest.fixture(scope="module")
def built_mask_rcnns() -> dict:
    """What the Mask R-CNN of each distinct network showed, kept by the first of its entries to build it."""
    return {}


@pytest.mark.parametrize("name", RESNET_RS)
def test_mask_rcnn_builds_from_every_resnet_rs_entry(name, coco_root, tmp_path, built_mask_rcnns):
    d2cfg = _d2cfg(tmp_path, "task=coco_instance_seg", f"backbone.name={name}", f"task.data_dir={coco_root}",
                   "task.opts=[MODEL.DEVICE,meta]")
    assert backbone_section(d2cfg).name == name and d2cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2
    # Built once per distinct network (7 for 25 entries), by the first of its entries (that entry's own name is
    # checked on the built body); every entry's declared channels are checked against it. On the meta device: the
    # full structure and every shape, without allocating or initialising weights.
    if _network(name) not in built_mask_rcnns:
        with torch.device("meta"):
            model = build_model(d2cfg)
            pyramid = model.backbone(torch.empty(1, 3, 64, 96))
        bottom_up = model.backbone.bottom_up
        assert bottom_up.body.spec.name == name
        built_mask_rcnns[_network(name)] = ([s.channels for s in bottom_up.output_shape().values()],
                                            {k: tuple(v.shape) for k, v in pyramid.items()},
                                            model.roi_heads.box_predictor.num_classes)
    channels, pyramid, num_classes = built_mask_rcnns[_network(name)]
    assert channels == list(BACKBONES.get(name).feature_channels[1:])
    assert pyramid == {f"p{i}": (1, 256, 64 // 2 ** i, -(-96 // 2 ** i)) for i in range(2, 7)}
    assert num_classes == 2


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


def test_the_whole_backbone_section_reaches_the_registry_body(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", "backbone=rs50", f"task.data_dir={voc_root}",
                   "task.class_names=[red,blue]", "backbone.strict=false", "backbone.min_loaded_fraction=0.5",
                   "backbone.drop_path_rate=0.1")
    assert backbone_section(d2cfg) == BackboneConfig(name="rs50", weights="random", strict=False,
                                                     min_loaded_fraction=0.5, drop_path_rate=0.1)
    with torch.device("meta"):  # module settings only
        body = build_registry_body(d2cfg)  # what every detectron2 builder of tasks/detection/backbone.py wraps
    assert body.model.layer4[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_frozen_protocol_freezes_every_level(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                   "protocol=frozen")
    assert d2cfg.MODEL.BACKBONE.FREEZE_AT == len(BACKBONES.get("rs50").feature_strides)
    finetune = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]")
    assert finetune.MODEL.BACKBONE.FREEZE_AT == 2


def test_freeze_backbone_on_finetune_freezes_every_level(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                   "protocol=finetune", "protocol.freeze_backbone=true")
    assert d2cfg.MODEL.BACKBONE.FREEZE_AT == len(BACKBONES.get("rs50").feature_strides)
    model = _build_on_meta(d2cfg)
    assert not any(p.requires_grad for p in model.backbone.bottom_up.parameters())
    assert any(p.requires_grad for p in model.backbone.parameters())  # the FPN trains


def test_ssl_transfer_frozen_protocol_trains_res5(voc_root, tmp_path):
    # linusericsson/ssl-transfer detectron2-configs/frozen/*.yaml: MODEL.BACKBONE.FREEZE_AT 4.
    d2cfg = _d2cfg(tmp_path, "task=voc_detection_ssl_transfer", f"task.data_dir={voc_root}",
                   "task.class_names=[red,blue]", "protocol=frozen")
    assert d2cfg.MODEL.BACKBONE.FREEZE_AT == 4
    assert (d2cfg.SOLVER.IMS_PER_BATCH, d2cfg.SOLVER.BASE_LR, d2cfg.SOLVER.MAX_ITER) == (2, 0.0025, 144000)
    assert tuple(d2cfg.SOLVER.STEPS) == (96000, 128000) and d2cfg.SOLVER.WARMUP_ITERS == 100
    model = _build_on_meta(d2cfg)
    body = model.backbone.bottom_up.body.model
    assert not any(p.requires_grad for p in body.layer3.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters())


def test_max_steps_shortens_the_schedule_keeping_its_shape(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_detection", f"task.data_dir={coco_root}", "trainer.max_steps=900")
    # detectron2's 1x: 90k iterations, LR drops at 60k and 80k, 1k warmup (configs/Base-RCNN-FPN.yaml, defaults.py).
    assert d2cfg.SOLVER.MAX_ITER == 900
    assert tuple(d2cfg.SOLVER.STEPS) == (600, 800)
    # The warm-up keeps its length, at most a quarter of the shortened schedule.
    assert d2cfg.SOLVER.WARMUP_ITERS == 225


def test_short_schedules_keep_a_warm_up(voc_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                   "trainer.max_steps=20")
    assert d2cfg.SOLVER.WARMUP_ITERS == 5  # the base's 100 would be the whole schedule; scaled, it was 0
    explicit = _d2cfg(tmp_path, "task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                      "trainer.max_steps=20", "task.solver.warmup_iters=0")
    assert explicit.SOLVER.WARMUP_ITERS == 0


def test_fewer_images_per_batch_scale_the_lr_linearly(voc_root, tmp_path):
    common = ("task=voc_detection", f"task.data_dir={voc_root}", "task.class_names=[red,blue]")
    scaled = _d2cfg(tmp_path, *common, "task.solver.ims_per_batch=2")
    # PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml: 16 images at LR 0.02 -> 2 images at 0.0025.
    assert scaled.SOLVER.IMS_PER_BATCH == 2 and scaled.SOLVER.BASE_LR == pytest.approx(0.0025)
    assert any("scaled linearly from 0.02 to 0.0025" in n for n in scaled.TRANSFER_NOTES)
    explicit = _d2cfg(tmp_path, *common, "task.solver.ims_per_batch=2", "task.solver.base_lr=0.01")
    assert explicit.SOLVER.BASE_LR == 0.01 and not explicit.TRANSFER_NOTES
    unchanged = _d2cfg(tmp_path, *common)
    assert (unchanged.SOLVER.IMS_PER_BATCH, unchanged.SOLVER.BASE_LR) == (16, 0.02)


def test_a_recipe_fixed_lr_kept_for_another_batch_size_is_noted(voc_root, tmp_path):
    common = ("task=voc_detection_ssl_transfer", f"task.data_dir={voc_root}", "task.class_names=[red,blue]")
    bigger = _d2cfg(tmp_path, *common, "task.solver.ims_per_batch=16")
    # ssl-transfer's recipe sets 2 images at LR 0.0025: 16 images keep 0.0025, and the log says so.
    assert bigger.SOLVER.BASE_LR == pytest.approx(0.0025)
    (note,) = bigger.TRANSFER_NOTES
    assert "ims_per_batch=16 (recipe: 2)" in note and "not scaled" in note and "would give 0.02" in note
    assert not _d2cfg(tmp_path, *common).TRANSFER_NOTES  # the recipe's own batch size: nothing to note
    assert not _d2cfg(tmp_path, *common, "task.solver.ims_per_batch=16", "task.solver.base_lr=0.02").TRANSFER_NOTES


def test_head_norm_reaches_fpn_and_heads(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_instance_seg", f"task.data_dir={coco_root}", "task.head_norm=GN")
    assert d2cfg.MODEL.FPN.NORM == d2cfg.MODEL.ROI_BOX_HEAD.NORM == d2cfg.MODEL.ROI_MASK_HEAD.NORM == "GN"
    assert d2cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4
    model = _build_on_meta(d2cfg)
    assert any(isinstance(m, nn.GroupNorm) for m in model.roi_heads.box_head.modules())


def test_retinanet_gets_p3_to_p7(coco_root, tmp_path):
    d2cfg = _d2cfg(tmp_path, "task=coco_retinanet", f"task.data_dir={coco_root}")
    assert d2cfg.MODEL.BACKBONE.NAME == "build_transfer_retinanet_fpn_backbone"
    model = _build_on_meta(d2cfg)
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]


@pytest.mark.parametrize("override, match", [
    ("task.base_config=COCO-Detection/nope.yaml", "not a detectron2 model-zoo config"),
    ("task.base_config=COCO-Detection/faster_rcnn_R_50_DC5_1x.yaml", "C4 pair"),
    ("task.base_config=COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", None),  # FPN: accepted
    ("task.res5_extra_norm=true", "applies to C4 detectors"),
    ("trainer.precision=bf16-mixed", "trainer.precision"),
    ("task.freeze_at=9", "exceeds"),
    ("task.opts=[MODEL.NO_SUCH_KEY,1]", "task.opts"),
])
def test_bad_detectron2_settings_fail_in_validate(override, match, coco_root):
    # validate() runs the adapter's check, which tries the whole translation where detectron2 is installed.
    overrides = ["task=coco_detection", f"task.data_dir={coco_root}", override, "trainer.devices=1"]
    if match is None:
        validate(compose(overrides))
        return
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


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


# --- C4: the registry backbone as trunk (stem, res2-res4) and as the per-region res5 head --------------------


@pytest.fixture(scope="module")
def rs50_file(tmp_path_factory):
    """rs50 weights in a file, so the trunk and the head (built separately) load the same values."""
    body = build_backbone("rs50", weights="random")
    for m in body.model.modules():  # non-trivial batch-norm statistics, so a wrong copy would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "rs50.safetensors"
    save_file({k: v.contiguous() for k, v in body.model.state_dict().items()}, str(path))
    return path


def _c4(tmp_path, voc_root, *overrides):
    return _d2cfg(tmp_path, "task=voc_detection_moco_c4", f"task.data_dir={voc_root}", "task.class_names=[red,blue]",
                  *overrides)


def test_c4_trunk_ends_at_res4_and_the_head_is_the_backbones_res5(rs50_file, voc_root, tmp_path):
    d2cfg = _c4(tmp_path, voc_root, "task.backbone_norm=FrozenBN", "task.res5_extra_norm=false")
    d2cfg.defrost()
    d2cfg.MODEL.TRANSFER_BACKBONE.WEIGHTS = str(rs50_file)
    model = build_model(d2cfg).eval()
    trunk, res5 = model.backbone, model.roi_heads.res5
    assert list(trunk.output_shape()) == ["res4"] and trunk.output_shape()["res4"].stride == 16
    assert isinstance(trunk.body.model.layer4, nn.Identity)  # never run, never trained
    full = build_backbone("rs50", weights=str(rs50_file)).eval()
    full.model = FrozenBatchNorm2d.convert_frozen_batchnorm(full.model)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        reference = full.forward_features(x)
        res4 = trunk(x)["res4"]
        torch.testing.assert_close(res4, reference[3])
        torch.testing.assert_close(res5(res4), reference[4])  # same weights, same statistics


def test_c4_follows_mocos_protocol(voc_root, tmp_path):
    d2cfg = _c4(tmp_path, voc_root)
    # facebookresearch/moco detection/configs/pascal_voc_R_50_C4_24k.yaml, Base-RCNN-C4-BN.yaml, train_net.py.
    assert d2cfg.MODEL.BACKBONE.FREEZE_AT == 0 and d2cfg.MODEL.TRANSFER_BACKBONE.NORM == "naiveSyncBN"
    assert (d2cfg.SOLVER.IMS_PER_BATCH, d2cfg.SOLVER.BASE_LR, d2cfg.SOLVER.MAX_ITER) == (16, 0.02, 24000)
    assert tuple(d2cfg.SOLVER.STEPS) == (18000, 22000) and d2cfg.SOLVER.WARMUP_ITERS == 100
    assert d2cfg.TEST.PRECISE_BN.ENABLED and d2cfg.INPUT.MIN_SIZE_TEST == 800
    assert (d2cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, d2cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    model = _build_on_meta(d2cfg)
    assert all(p.requires_grad for p in model.backbone.parameters())
    extra = model.roi_heads.res5[-1]
    assert isinstance(extra, NaiveSyncBatchNorm) and extra.num_features == 2048
    assert any(isinstance(m, NaiveSyncBatchNorm) for m in model.backbone.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_c4_frozen_protocol_fixes_trunk_and_head(voc_root, tmp_path):
    model = _build_on_meta(_c4(tmp_path, voc_root, "protocol=frozen", "task.res5_extra_norm=false"))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.roi_heads.res5.parameters())
    assert any(p.requires_grad for p in model.roi_heads.box_predictor.parameters())
