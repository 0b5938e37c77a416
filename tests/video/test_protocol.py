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
    stages = _stage_rates(build_classifier(cfg, num_classes=3))
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
    model = build_classifier(cfg, num_classes=3)
    VideoModule(model, cfg.protocol, eval_labels=[0], train_videos=1, global_batch=2,
                check_train=lambda failed: None).train()
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training
