"""The depth adapter's own protocols: BYOL's SGD recipe lives in ``protocol.*`` (tasks/depth/config.py), reaches the
optimiser and results.json, and a frozen backbone keeps its weights and batch-norm statistics through a real
Lightning fit (transfer.engine.FreezesBackbone)."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tasks.depth.config import DepthFinetuneProtocolConfig, DepthFrozenProtocolConfig
from tasks.depth.model import DepthModel
from tasks.depth.module import DepthModule
from tasks.depth.task import recipe_used
from transfer.compare import run_reasons
from transfer.config import compose, validate
from transfer.errors import ConfigError
from transfer.results import protocol_config
from transfer.rundir import plan_run_dir


def _cfg(tmp_path, *overrides):
    return validate(compose(["task=nyu_depth", f"task.data_dir={tmp_path}", f"run.root={tmp_path}", *overrides]))


def test_protocol_values_reach_the_config_and_a_frozen_finetune_is_the_frozen_protocol(tmp_path):
    tuned = _cfg(tmp_path, "protocol.lr=0.08", "protocol.warmup_fraction=0.1")
    assert type(tuned.protocol) is DepthFinetuneProtocolConfig
    assert (tuned.protocol.lr, tuned.protocol.warmup_fraction, tuned.protocol.steps) == (0.08, 0.1, 7500)
    assert plan_run_dir(tuned).path.parent == tmp_path / "nyu_depth" / "rs50-finetune"
    # finetune with freeze_backbone=true is protocol=frozen, carrying the same training values
    for frozen in (_cfg(tmp_path, "protocol.freeze_backbone=true", "protocol.lr=0.08"),
                   _cfg(tmp_path, "protocol=frozen", "protocol.lr=0.08")):
        assert type(frozen.protocol) is DepthFrozenProtocolConfig and frozen.protocol.lr == 0.08
        assert plan_run_dir(frozen).path.parent == tmp_path / "nyu_depth" / "rs50-frozen"


@pytest.mark.parametrize("override, message", [
    ("protocol.randaugment=rand-m9-n2", r"unknown key 'protocol.randaugment'.*Valid keys of protocol: name, lr, "
                                        r"lr_reference_batch, weight_decay, momentum, nesterov, steps, "
                                        r"warmup_fraction, freeze_backbone\."),
    ("protocol.crop=[64,64]", r"protocol.crop is not a key of depth's finetune protocol; the task has task.crop"),
    ("task.optim.lr=0.1", r"unknown key 'task.optim'.*are the protocol's: set protocol.<key>"),
    ("protocol.lr_reference_batch=0", r"^protocol.lr_reference_batch=0 must be at least 1"),
])
def test_keys_depth_does_not_have_or_cannot_use_are_refused_naming_the_valid_ones(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, override)


@pytest.mark.parametrize("protocol", ["finetune", "frozen"])
def test_help_lists_the_protocol_keys_with_their_sources(protocol):
    from transfer.usage import recipe_help

    text = " ".join(recipe_help("protocol", protocol, task="nyu_depth").split())  # unwrapped
    assert "BYOL's NYU recipe (arXiv 2006.07733, App. D.6" in text
    assert "protocol.lr=0.16" in text and "BYOL D.6: learning rate 0.16" in text  # inherited field, its comment
    assert "protocol.warmup_fraction=0.05" in text and "Not given by BYOL D.6" in text
    assert ("protocol.freeze_backbone=false" in text) == (protocol == "finetune")


def test_results_record_the_depth_protocol_section(tmp_path):
    assert protocol_config(_cfg(tmp_path)) == {
        "name": "finetune", "lr": 0.16, "lr_reference_batch": 256, "weight_decay": 5e-4, "momentum": 0.9,
        "nesterov": False, "steps": 7500, "warmup_fraction": 0.05, "freeze_backbone": False}
    frozen = protocol_config(_cfg(tmp_path, "protocol=frozen", "protocol.momentum=0.5"))
    assert frozen["name"] == "frozen" and frozen["momentum"] == 0.5 and "freeze_backbone" not in frozen


def test_a_changed_protocol_value_makes_the_run_not_comparable_but_the_step_count_is_the_adapters(tmp_path):
    def reasons(*overrides):
        results = {"task": "nyu_depth", "adapter": "depth", "protocol": "finetune", "backbone": "resnet50",
                   "weights": {"source": "hub"}, "protocol_config": protocol_config(_cfg(tmp_path, *overrides)),
                   "extra": {}}
        return run_reasons(results)

    assert reasons() == []
    assert reasons("protocol.lr=0.08") == ["protocol.lr=0.08 differs from the finetune recipe's 0.16"]
    # the steps trained are checked with the global batch by tasks.depth.task.not_comparable (extra.not_comparable)
    assert reasons("protocol.steps=100") == []


def test_resuming_with_another_decoder_or_protocol_is_refused_but_training_values_may_change(tmp_path):
    from omegaconf import OmegaConf

    from transfer.rundir import CONFIG_FILE, config_changes, config_tree

    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config_tree(_cfg(tmp_path)))))
    allow = ["resume_allow_changes=true"]
    assert config_changes(_cfg(tmp_path, "protocol.lr=0.08", *allow), run) == {"protocol.lr": [0.16, 0.08]}
    with pytest.raises(ConfigError, match=r"task.decoder_channels differ"):
        config_changes(_cfg(tmp_path, "task.decoder_channels=[512,256,128]", *allow), run)
    with pytest.raises(ConfigError, match=r"task.skip_connections differ"):
        config_changes(_cfg(tmp_path, "task.skip_connections=true", *allow), run)
    with pytest.raises(ConfigError, match=r"protocol=finetune, this one protocol=frozen"):
        config_changes(_cfg(tmp_path, "protocol.freeze_backbone=true", *allow), run)


def test_the_table5_suite_runs_depth_under_its_own_protocols(tmp_path):
    from transfer.suite import check_jobs, expand, parse_request

    (tmp_path / "nyu").mkdir()
    request = parse_request(["suite=resnet_rs_table5", "suite.only=[nyu_depth]", f"suite.data_root={tmp_path}",
                             "suite.nyu_depth_frozen.protocol.lr=0.08"])
    jobs = expand(request, multirun=False)
    check_jobs(request, jobs)
    protocols = {job.column.id: validate(compose(job.overrides)).protocol for job in jobs}
    assert type(protocols["nyu_depth_frozen"]) is DepthFrozenProtocolConfig
    assert type(protocols["nyu_depth_finetune"]) is DepthFinetuneProtocolConfig
    assert (protocols["nyu_depth_frozen"].lr, protocols["nyu_depth_finetune"].lr) == (0.08, 0.16)


class TinyBackbone(torch.nn.Module):
    """A stand-in for a registry backbone with its contract (``feature_info``, ``forward_features``): two conv + BN
    levels, (B, 3, H, W) -> [(B, 8, H/2, W/2), (B, 16, H/4, W/4)]. The real rs50 is frozen in the e2e run of
    test_depth.py; here a fit takes milliseconds."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.deep = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.feature_info = [SimpleNamespace(channels=8), SimpleNamespace(channels=16)]

    def forward_features(self, x):
        low = self.stem(x)
        return [low, self.deep(low)]


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return TinyBackbone()


def _module(backbone, protocol, **kw) -> DepthModule:
    from tasks.depth.config import DepthTaskConfig

    model = DepthModel(backbone, [16, 8])
    return DepthModule(model, DepthTaskConfig(name="nyu_depth"), protocol, test_frames=1, global_batch=2, **kw)


@pytest.mark.parametrize("protocol, frozen", [
    (DepthFinetuneProtocolConfig(lr=0.08, lr_reference_batch=4, weight_decay=1e-3, momentum=0.5, nesterov=True), False),
    (DepthFrozenProtocolConfig(lr=0.08, lr_reference_batch=4, weight_decay=1e-3, momentum=0.5, nesterov=True), True),
    (DepthFinetuneProtocolConfig(lr=0.08, lr_reference_batch=4, weight_decay=1e-3, momentum=0.5, nesterov=True,
                                 freeze_backbone=True), True),
])
def test_the_optimiser_takes_the_protocols_values_and_skips_a_frozen_backbone(protocol, frozen, tiny_backbone):
    module = _module(tiny_backbone, protocol, total_steps=100)
    opt = module.configure_optimizers()["optimizer"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.08 * 2 / 4] * 2)  # scaled to batch 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.08 * 2 / 4 / 5] * 2)  # warmup step 1 of 5
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert {(g["momentum"], g["nesterov"]) for g in opt.param_groups} == {(0.5, True)}
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    backbone = {id(p) for p in module.model.backbone.parameters()}
    assert (not optimised & backbone) == frozen and backbone - optimised == (backbone if frozen else set())
    assert module.frozen_backbone == frozen


def test_the_recorded_recipe_is_what_trained(tiny_backbone, tmp_path):
    cfg = _cfg(tmp_path, "protocol.freeze_backbone=true", "protocol.lr=0.08")
    module = _module(tiny_backbone, cfg.protocol, total_steps=40)
    frames = SimpleNamespace(items=[0, 1, 2], source="png")
    recipe = recipe_used(cfg.task, module, frames, frames)
    assert recipe["freeze_backbone"] is True and recipe["global_batch"] == 2 and recipe["steps"] == 40
    assert recipe["lr"] == pytest.approx(0.08 * 2 / 256) and recipe["lr_reference"] == [0.08, 256]
    assert recipe["warmup_steps"] == 2 and (recipe["momentum"], recipe["weight_decay"]) == (0.9, 5e-4)
    json.dumps(recipe)  # results.json holds it as is


def _norms(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class CallsTrain(L.Callback):
    """Calls ``module.train()`` before every training batch, as older Lightning versions did around validation and
    as any callback may: a freeze that only set eval mode once would let the statistics move."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.train()


@pytest.mark.parametrize("freeze", [True, False])
def test_a_real_fit_keeps_a_frozen_backbones_weights_and_batch_norm_statistics(freeze, tiny_backbone, tmp_path):
    """Lightning 2.x never calls module.train() in fit; the frozen backbone must stay in eval mode anyway. The
    unfrozen control shows the fit really moves the backbone's statistics and weights."""
    from torch.utils.data import DataLoader

    cfg = _cfg(tmp_path, f"protocol.freeze_backbone={str(freeze).lower()}")
    # No warmup (step 0 already trains at the full rate) and a rate that moves the weights in 3 steps.
    protocol = dataclasses.replace(cfg.protocol, lr=0.5, lr_reference_batch=2, warmup_fraction=0.0)
    module = _module(tiny_backbone, protocol, total_steps=3, train_frames=6)
    backbone, decoder = module.model.backbone, module.model.decoder
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    torch.manual_seed(1)
    batches = [{"image": torch.randn(2, 3, 32, 48) * 2 + 1, "depth": torch.rand(2, 1, 32, 48) * 5 + 0.5,
                "failed": torch.zeros(0, dtype=torch.long)} for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[CallsTrain()])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3 and module.trained_batches == 3
    after = backbone.state_dict()
    norms = _norms(backbone)
    assert norms and {int(m.num_batches_tracked) for m in norms} == {0 if freeze else 3}
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k, _ in backbone.named_parameters()]
    assert stats and weights
    if freeze:
        assert all(torch.equal(before[k], after[k]) for k in before), "a frozen backbone tensor changed"
    else:  # the control: the same fit unfrozen moves every BN statistic and the weights
        assert all(not torch.equal(before[k], after[k]) for k in stats)
        assert any(not torch.equal(before[k], after[k]) for k in weights)
    assert any(not torch.equal(decoder_before[k], v) for k, v in decoder.state_dict().items()), "decoder never trained"
    assert backbone.training != freeze and decoder.training
