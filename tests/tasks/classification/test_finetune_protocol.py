"""``protocol=finetune`` is the papers' fine-tune protocol (SimCLR App. B.8, BYOL App. D.3): a grid of lr x wd with
wd divided by lr, a fixed number of steps at a global batch, each point scored on val after its last step, the best
refit on train+val, then tested. ``finetune_strong`` keeps the suite's stronger recipe under its own name."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tasks.classification import task as classification
from tasks.classification.protocols import PAPER_LR_GRID, PAPER_WD_GRID, FinetuneProtocolConfig
from transfer.config import compose, validate
from transfer.run import main as run_main


def test_the_finetune_recipe_is_the_papers_protocol():
    p = validate(compose(["task=cifar100", "protocol=finetune", "logger.wandb.mode=disabled"])).protocol
    assert p == FinetuneProtocolConfig()  # the recipe file and the schema agree (video refuses any difference)
    assert (p.steps, p.batch_size, p.image_size, p.test_crop_pct) == (20_000, 256, 224, 0.875)
    assert p.sweep and p.wd_over_lr and p.select == "last" and p.bn_momentum_from_steps
    assert len(p.lr_grid) == 7 and p.lr_grid[0] == 1e-4 and p.lr_grid[-1] == 0.1
    assert p.wd_grid[0] == 0.0 and len(p.wd_grid) == 8 and p.wd_grid[1] == 1e-6 and p.wd_grid[-1] == 1e-3
    ratios = [b / a for a, b in zip(PAPER_LR_GRID, PAPER_LR_GRID[1:])] + \
        [b / a for a, b in zip(PAPER_WD_GRID[1:], PAPER_WD_GRID[2:])]
    assert all(r == pytest.approx(10 ** 0.5, rel=2e-3) for r in ratios)  # log-spaced, half a decade apart
    assert (p.randaugment, p.label_smoothing, p.color_jitter, p.mixup, p.cutmix) == (None, 0.0, 0.0, 0.0, 0.0)


def test_the_strong_recipe_keeps_its_own_name_and_values():
    p = validate(compose(["task=cifar100", "protocol=finetune_strong", "logger.wandb.mode=disabled"])).protocol
    assert p.name == "finetune_strong" and not p.sweep and p.steps is None and p.select == "best_epoch"
    assert (p.randaugment, p.label_smoothing, p.weight_decay) == ("rand-m10-n2", 0.1, 1e-4)


def test_the_sweep_divides_each_weight_decay_by_its_learning_rate(monkeypatch):
    tried = []

    def fake_fit(ctx, backbone, splits, resolution, protocol, **kwargs):
        tried.append((protocol.lr, protocol.weight_decay))
        score = 50.0 + 10 * protocol.lr - protocol.weight_decay  # best: the largest lr, then the smallest decay
        module = SimpleNamespace(undecodable={"bad.jpg"})
        return module, SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_score=torch.tensor(score))), \
            None, None

    monkeypatch.setattr(classification, "_fit", fake_fit)
    monkeypatch.setattr(classification, "_backbone", lambda ctx: None)
    protocol = dataclasses.replace(FinetuneProtocolConfig(), lr_grid=[0.01, 0.1], wd_grid=[0.0, 1e-4])
    ctx = SimpleNamespace(cfg=SimpleNamespace(protocol=protocol, task=SimpleNamespace(metric="top1")))
    undecodable = set()
    best, rows, chosen = classification._sweep(ctx, None, 32, undecodable)
    assert undecodable == {"bad.jpg"}  # images no fit could decode are gathered over the grid
    assert tried == [(0.01, 0.0), (0.01, pytest.approx(1e-2)), (0.1, 0.0), (0.1, pytest.approx(1e-3))]
    assert [r[:2] for r in rows] == [[0.01, 0.0], [0.01, 1e-4], [0.1, 0.0], [0.1, 1e-4]]
    assert chosen[:2] == [0.1, 0.0] and (best.lr, best.weight_decay, best.sweep) == (0.1, 0.0, False)
    off = dataclasses.replace(protocol, wd_over_lr=False)
    tried.clear()
    classification._sweep(SimpleNamespace(cfg=SimpleNamespace(protocol=off, task=ctx.cfg.task)), None, 32, set())
    assert [wd for _, wd in tried] == [0.0, 1e-4, 0.0, 1e-4]


@pytest.mark.parametrize("train_size, batch, momentum", [(1_020, 256, 0.1), (45_000, 256, 10 / 175),
                                                         (1_000_000, 256, 10 / 3906)])
def test_batch_norm_statistics_decay_with_the_steps_per_epoch(train_size, batch, momentum):
    module = SimpleNamespace(backbone=nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert classification._set_bn_momentum(module, train_size, batch) == pytest.approx(momentum)
    assert module.backbone[1].momentum == pytest.approx(momentum)  # TF decay max(1 - 10/s, 0.9) = 1 - momentum


@pytest.mark.e2e
def test_a_paper_finetune_run_sweeps_refits_on_train_val_and_tests(tmp_path, parquet_files):
    run_dir = tmp_path / "ft"
    code = run_main(["task=cifar100", f"task.data_dir={parquet_files}", "task.max_bad_fraction=0.2",
                     "task.check_split_sizes=false", "protocol=finetune", "protocol.steps=3", "protocol.batch_size=8",
                     "protocol.lr_grid=[0.01,0.1]", "protocol.wd_grid=[0.001]", "backbone=rs50",
                     "backbone.weights=random", "task.resolution=32", "trainer.precision=32-true",
                     "trainer.num_workers=0", "trainer.eval_batch_size=8", "trainer.progress_bar=false",
                     "logger.wandb.mode=disabled", f"run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    extra = results["extra"]
    assert [r[:2] for r in extra["sweep"]] == [[0.01, 0.001], [0.1, 0.001]]
    best = max(extra["sweep"], key=lambda r: r[2])
    assert extra["best_lr"] == best[0] and extra["optimiser_weight_decay"] == pytest.approx(0.001 / best[0])
    assert extra["global_step"] == 3 and extra["global_batch"] == 8  # the refit: protocol.steps at the batch
    for lr in (0.01, 0.1):  # each grid point trained its 3 steps and was scored once, after the last
        assert (run_dir / "checkpoints" / "sweep" / f"lr{lr:g}-wd0.001" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "final" / "last.ckpt").is_file()
    assert "test/top1" in results["metrics"] and results["metrics"]["val/best_top1"] == pytest.approx(best[2])
    assert extra["preprocess"] == "checkpoint"  # task.resolution=32, not the papers' 224 / 256
    reasons = " | ".join(results["comparison"]["reasons"])
    assert "protocol.steps=3" in reasons and "task.check_split_sizes=false" in reasons
    assert not any(b["comparable"] for b in results["baselines"])


def test_finetune_input_follows_task_preprocess():
    from transfer.backbones import build_backbone

    with torch.device("meta"):  # only its spec is read: the network's structure, no weights computed
        backbone = build_backbone("rs50", weights="random")  # its own test input: 160 px, crop 0.875

    def sizes(*overrides):
        cfg = validate(compose(["task=cifar100", "logger.wandb.mode=disabled", *overrides]))
        return classification.finetune_input(cfg, backbone)

    assert sizes("protocol=finetune") == (224, 0.875, "paper")  # auto: the protocol's, the papers' 256 -> 224
    assert sizes("protocol=finetune", "task.preprocess=checkpoint") == (160, 0.875, "checkpoint")
    assert sizes("protocol=finetune", "task.preprocess=checkpoint", "task.resolution=224") == (224, 0.875, "paper")
    assert sizes("protocol=finetune_strong") == (160, 0.875, "checkpoint")


@pytest.mark.e2e
def test_checkpoint_preprocessing_is_what_a_finetune_run_tests_at_and_records(tmp_path):
    # task.preprocess=checkpoint reaches the fine-tune's test transform and the record (not 224 / 0.875, "paper").
    run_dir = tmp_path / "ft"
    code = run_main(["task=digits", "task.limit_per_split=4", "task.preprocess=checkpoint", "protocol=finetune",
                     "protocol.sweep=false", "protocol.steps=1", "protocol.batch_size=4", "task.resolution=32",
                     "backbone=resnet50_rsb_a3", "backbone.weights=random", "trainer.precision=32-true",
                     "trainer.num_workers=0", "trainer.eval_batch_size=4", "trainer.progress_bar=false",
                     "logger.wandb.mode=disabled", f"run.dir={run_dir}"])
    assert code == 0
    extra = json.loads((run_dir / "results.json").read_text())["extra"]
    # resnet50_rsb_a3's own test crop is 0.95 (timm's pretrained config); the protocol's is 0.875.
    assert (extra["resolution"], extra["test_crop_pct"], extra["preprocess"]) == (32, 0.95, "checkpoint")


def test_freeze_backbone_keeps_the_backbones_weights_and_batch_norm_statistics():
    """protocol.freeze_backbone=true trains only the head: Lightning calls train() every epoch, and the backbone's
    batch norms must not update their running statistics in it."""
    from tasks.classification.finetune import FinetuneModule

    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    body.num_features = 4
    module = FinetuneModule(body, 3, dataclasses.replace(FinetuneProtocolConfig(), freeze_backbone=True))
    module.train()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    module(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert not body.training and module.head.training
    assert not any(p.requires_grad for p in body.parameters())


def _fit(module, batches, steps: int = 3):
    """A real Lightning fit of ``module`` for ``steps`` optimiser steps on CPU (no logger, no checkpoints)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    from torch.utils.data import DataLoader

    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def test_freeze_backbone_keeps_the_batch_norm_statistics_through_a_real_fit():
    """Lightning 2.x never calls module.train() in fit: the frozen backbone must still stay in eval mode, so its
    running statistics and num_batches_tracked are those it was loaded with, while the head trains."""
    from tasks.classification.finetune import FinetuneModule
    from transfer.images import ImageBatch

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
    body.num_features = 4
    module = FinetuneModule(body, 3, dataclasses.replace(FinetuneProtocolConfig(), freeze_backbone=True,
                                                         mixup=0.0, cutmix=0.0))
    module.train()  # a freshly built module is in train mode, as in a run
    body.train()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    head = {k: v.clone() for k, v in module.head.state_dict().items()}
    batches = [ImageBatch(torch.randn(4, 3, 8, 8) * 3 + 1, torch.tensor([0, 1, 2, 0]), [], []) for _ in range(3)]
    trainer = _fit(module, batches)
    assert trainer.global_step == 3
    after = body.state_dict()
    assert int(after["1.num_batches_tracked"]) == 0
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen backbone's weights or BN moved"
    assert any(not torch.equal(head[k], v) for k, v in module.head.state_dict().items()), "the head did not train"


def test_without_freeze_a_real_fit_updates_the_batch_norm_statistics():
    from tasks.classification.finetune import FinetuneModule
    from transfer.images import ImageBatch

    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    body.num_features = 4
    module = FinetuneModule(body, 3, dataclasses.replace(FinetuneProtocolConfig(), mixup=0.0, cutmix=0.0))
    batches = [ImageBatch(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), [], []) for _ in range(2)]
    _fit(module, batches, steps=2)
    assert int(body[1].num_batches_tracked) == 2
