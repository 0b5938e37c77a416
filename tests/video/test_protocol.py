"""The video adapter's fine-tune protocol: backbone.drop_path_rate reaches the built network, and
protocol.freeze_backbone=true trains only the classifier (backbone weights and batch-norm statistics kept)."""
import pytest
import torch
from timm.layers import DropPath

from transfer.compare import run_reasons
from transfer.config import compose, validate
from video.model import stage_drop_path_rates
from video.module import VideoModule
from video.task import build_classifier

SMALL = ["task=kinetics400", "backbone=resnet50", "backbone.weights=random", "task.inflation.self_gating=none"]


def _cfg(tmp_path, *overrides):
    return validate(compose([*SMALL, f"task.data_dir={tmp_path}", *overrides]))


def _meta_classifier(cfg, num_classes: int = 3):
    """``build_classifier`` on the meta device: the real network's modules and settings, no weights computed (for
    checks of structure and flags; a test that runs the network builds it for real)."""
    with torch.device("meta"):
        return build_classifier(cfg, num_classes=num_classes)


def _stage_rates(model) -> list[list[float]]:
    from video.inflate import stage_modules

    return [[b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in stage.children()]
            for stage in stage_modules(model.backbone.model)]


@pytest.mark.parametrize("overrides, rate", [
    ([], 0.1),  # the Kinetics recipes' published rate, set through the defaults list
    (["backbone.drop_path_rate=0.2"], 0.2),  # the command line wins
    (["backbone.drop_path_rate=0"], 0.0),
])
def test_backbone_drop_path_rate_reaches_the_drop_path_modules_of_the_video_model(overrides, rate, tmp_path):
    cfg = _cfg(tmp_path, *overrides)
    assert cfg.backbone.drop_path_rate == rate
    stages = _stage_rates(_meta_classifier(cfg))
    # Model Garden's per-stage rule: rate x (i + 2) / 5, the same for every block of a stage.
    assert [s[0] for s in stages] == pytest.approx(stage_drop_path_rates(rate, 4))
    assert all(len(set(s)) == 1 for s in stages)


def test_a_changed_rate_on_a_from_scratch_run_is_not_comparable(tmp_path):
    from dataclasses import asdict

    from video.task import not_comparable

    cfg = _cfg(tmp_path, "backbone.drop_path_rate=0.2", "trainer.max_epochs=350", "task.inflation.self_gating=last")
    reasons = not_comparable(cfg, classes=400, test_videos=10, never_scored=0)["not_comparable"]
    assert reasons == ["backbone.drop_path_rate=0.2 differs from the kinetics400 recipe's 0.1"]
    results = {"task": "kinetics400", "adapter": "video", "protocol": "finetune", "backbone": "resnet50",
               "weights": {"source": "random"}, "protocol_config": asdict(cfg.protocol),
               "extra": {"scratch_recipe": cfg.task.scratch_recipe, "not_comparable": reasons}}
    assert run_reasons(results) == reasons


def test_freeze_backbone_trains_only_the_head_and_keeps_the_backbone_statistics(tmp_path):
    cfg = _cfg(tmp_path, "protocol.freeze_backbone=true", "protocol.bn_momentum=0.5")
    model = build_classifier(cfg, num_classes=3)
    module = VideoModule(model, cfg.protocol, eval_labels=[0], train_videos=1, global_batch=2,
                         check_train=lambda failed: None)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    module.train()  # what Lightning calls at the start of each epoch
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms) and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    clips = torch.randn(2, 3, 4, 32, 32)  # (B, C, T, H, W)
    torch.nn.functional.cross_entropy(module(clips), torch.tensor([0, 1])).backward()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the backbone's weights or statistics changed"
    assert model.head.weight.grad is not None
    # Recorded as such, the run is frozen transfer for the comparison: random weights there measure nothing.
    results = {"task": "kinetics400", "adapter": "video", "protocol": "finetune", "backbone": "resnet50",
               "weights": {"source": "random"}, "protocol_config": {"freeze_backbone": True}, "extra": {}}
    assert any("features of an untrained network" in r for r in run_reasons(results))


def test_without_freeze_the_backbone_trains(tmp_path):
    cfg = _cfg(tmp_path)
    model = _meta_classifier(cfg)
    VideoModule(model, cfg.protocol, eval_labels=[0], train_videos=1, global_batch=2,
                check_train=lambda failed: None).train()
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training


class _TinyClassifier(torch.nn.Module):
    """(B, 3, T, H, W) -> (B, 2): a conv + BN + dropout backbone and a linear head, as VideoClassifier names them."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 1), torch.nn.BatchNorm3d(4),
                                            torch.nn.Dropout(0.5), torch.nn.AdaptiveAvgPool3d(1),
                                            torch.nn.Flatten())
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("freeze", [True, False])
def test_a_real_fit_keeps_a_frozen_backbones_batch_norm_statistics(tmp_path, freeze):
    """Lightning 2.x never calls module.train() in fit; the frozen backbone must stay in eval mode anyway."""
    import dataclasses

    import lightning as L
    from torch.utils.data import DataLoader

    cfg = _cfg(tmp_path, f"protocol.freeze_backbone={str(freeze).lower()}", "protocol.ema_decay=0",
               "protocol.bn_momentum=0.1")
    torch.manual_seed(0)
    model = _TinyClassifier()
    optim = dataclasses.replace(cfg.protocol, warmup_epochs=0.0, lr=1.0)
    module = VideoModule(model, optim, eval_labels=[0], train_videos=4, global_batch=2,
                         check_train=lambda failed: None)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    batches = [{"video": torch.randn(2, 3, 2, 4, 4) * 3 + 1, "label": torch.tensor([0, 1]),
                "failed": torch.zeros(0, dtype=torch.long)} for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    after = model.backbone.state_dict()
    assert int(after["1.num_batches_tracked"]) == (0 if freeze else 3)
    assert all(torch.equal(before[k], after[k]) for k in before) == freeze
    assert any(not torch.equal(head[k], v) for k, v in model.head.state_dict().items()), "the head did not train"


@pytest.mark.parametrize("freeze", [True, False])
def test_the_recorded_recipe_says_what_applied_to_a_frozen_backbone(tmp_path, freeze):
    from types import SimpleNamespace

    from video.task import recipe_used

    cfg = _cfg(tmp_path, f"protocol.freeze_backbone={str(freeze).lower()}")
    layers = {"drop_path_per_stage": [0.04, 0.06, 0.08, 0.1], "bn_momentum": 0.01}
    recipe = recipe_used(cfg.task, cfg.protocol, SimpleNamespace(lr=0.1, global_batch=2), layers, 1)
    if freeze:  # eval mode: no stochastic depth, no statistics update in the backbone
        assert recipe["drop_path_per_stage"] is None and recipe["bn_momentum"] is None
    else:
        assert recipe["drop_path_per_stage"] == layers["drop_path_per_stage"] and recipe["bn_momentum"] == 0.01
