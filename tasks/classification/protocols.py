"""The classification adapter's protocols and their typed settings: linear probe, k-NN, fine-tuning.

Each schema's defaults are its published recipe (sources in the field comments); ``python -m transfer.run
protocol=NAME`` composes them (registered in Hydra's ConfigStore as ``protocol/classification/NAME``) and a run
that changes a checked field is not comparable with published numbers (:func:`transfer.compare.protocol_deviations`),
except the fields a schema names in ``UNCHECKED_KEYS`` with the reason they cannot change a comparable score.
``PUBLISHED = False`` marks a protocol with no published counterpart; ``FROZEN = True`` one that scores the
backbone's features as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from transfer.errors import ConfigError
from transfer.protocols import check_sgd_momentum


def _check_memory_keys(cfg) -> None:
    """Refuse sizes that cannot bound anything: naming each bad key with its valid range."""
    bad = [f"protocol.{k}={getattr(cfg, k)} (an integer of at least 1)" for k in ("shard_images", "chunk_rows")
           if getattr(cfg, k) < 1]
    if not math.isfinite(cfg.resident_mb) or cfg.resident_mb < 0:
        bad.append(f"protocol.resident_mb={cfg.resident_mb} (a finite number of MiB, 0 or more)")
    if bad:
        raise ConfigError(f"invalid {', '.join(bad)}.")


@dataclass
class LinearProtocolConfig:
    """L2-regularised multinomial logistic regression on frozen, cached penultimate features.

    The grid follows SimCLR (arXiv 2002.05709, Appendix B.8) and BYOL (arXiv 2006.07733, Appendix D.2):
    45 log-spaced values of the L2 penalty in [1e-6, 1e5], chosen on validation, then refit on train+val.
    When the chosen value sits at an end of the grid, the grid is extended past that end by up to
    ``extend_decades`` (the run is marked not comparable if the best is still at the end); ``refine_steps``
    halves the spacing around the peak, as CLIP_benchmark's probe does (0: the papers' grid only). Fit with
    L-BFGS.
    """

    FROZEN: ClassVar[bool] = True

    # Every other key defines the published protocol: a run that changes one is not comparable
    # (transfer.compare.protocol_deviations). These cannot change a comparable score, and why:
    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "cache": "cached features are reused only under a key that covers everything that determines them",
        "extend_decades": "a run whose best l2 still sits at an end of its search is not comparable anyway, "
                          "and an extension that closes the end finds the best the papers' grid would",
    }

    name: str = "linear"
    l2_min: float = 1e-6
    l2_max: float = 1e5
    l2_steps: int = 45
    extend_decades: float = 4.0
    refine_steps: int = 0
    max_iter: int = 200  # per fit; each fit warm-starts from the previous (stronger) penalty
    tolerance: float = 1e-6
    cache: bool = True
    # Bounded memory (docs/classification.md, paragraph "Bounded memory"): images per cache shard, feature
    # rows per chunk of the fit / k-NN, and the size up to which a split's features are held on the device.
    shard_images: int = 8192
    chunk_rows: int = 65536
    resident_mb: float = 4096.0

    def __post_init__(self) -> None:
        if not 0 < self.l2_min < self.l2_max or self.l2_steps < 1:
            raise ConfigError(f"protocol l2 grid [{self.l2_min}, {self.l2_max}] x {self.l2_steps} is empty; "
                              "need 0 < l2_min < l2_max and l2_steps >= 1.")
        if self.max_iter < 1 or not self.tolerance > 0:
            raise ConfigError(f"protocol.max_iter={self.max_iter} must be at least 1 and protocol.tolerance="
                              f"{self.tolerance} > 0.")
        if self.extend_decades < 0 or self.refine_steps < 0:
            raise ConfigError(f"protocol.extend_decades={self.extend_decades} and protocol.refine_steps="
                              f"{self.refine_steps} must be 0 or more.")
        _check_memory_keys(self)


@dataclass
class KnnProtocolConfig:
    """k-NN on cached features: cosine similarity, votes weighted by exp(sim / T).

    k=20, T=0.07 as in the weighted k-NN of Wu et al. 2018 (arXiv 1805.01978), also DINO's default k=20.
    """

    FROZEN: ClassVar[bool] = True

    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "cache": "cached features are reused only under a key that covers everything that determines them",
    }

    name: str = "knn"
    k: int = 20
    temperature: float = 0.07
    cache: bool = True
    # Bounded memory (docs/classification.md, paragraph "Bounded memory"): images per cache shard, feature
    # rows per chunk of the fit / k-NN, and the size up to which a split's features are held on the device.
    shard_images: int = 8192
    chunk_rows: int = 65536
    resident_mb: float = 4096.0

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"protocol.k={self.k} must be >= 1 and protocol.temperature={self.temperature} > 0.")
        _check_memory_keys(self)


def check_randaugment(policy: str | None) -> None:
    """``protocol.randaugment`` must be a policy timm's ``create_transform`` builds (``rand-m10-n2``, ``augmix-m5``,
    ``original``, ``v0``, …) or null; timm itself is asked, so every policy it knows is accepted."""
    if policy is None:
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    try:
        build(policy, hparams)
    except Exception as e:  # noqa: BLE001 - timm raises AssertionError, KeyError or ValueError on a bad policy
        raise ConfigError(f"protocol.randaugment={policy!r} is no timm augmentation policy ({type(e).__name__}: "
                          f"{e}); use e.g. rand-m10-n2 (RandAugment), augmix-m5, original, v0, or null.") from None


# SimCLR (arXiv 2002.05709) App. B.8 and BYOL (arXiv 2006.07733) App. D.3: "a grid of seven logarithmically
# spaced learning rates between 0.0001 and 0.1, and 7 logarithmically-spaced values of weight decay between
# 1e-6 and 1e-3, as well as no weight decay. These values of weight decay are divided by the learning rate."
# Rounded to three significant digits (10^-3.5 = 3.16e-4).
PAPER_LR_GRID = (1.0e-4, 3.16e-4, 1.0e-3, 3.16e-3, 1.0e-2, 3.16e-2, 0.1)
PAPER_WD_GRID = (0.0, 1.0e-6, 3.16e-6, 1.0e-5, 3.16e-5, 1.0e-4, 3.16e-4, 1.0e-3)
SELECT = ("last", "best_epoch")


@dataclass
class FinetuneProtocolConfig:
    """Full fine-tuning as SimCLR (arXiv 2002.05709, App. B.8) and BYOL (arXiv 2006.07733, App. D.3) did it.

    Every (lr, weight decay) of the grid trains ``steps`` SGD steps (Nesterov, momentum 0.9) at global batch
    ``batch_size`` on train, with random-resized-crop + flip only, and is scored on val after its last
    step; weight decay values are divided by the learning rate. The best pair is refit on train+val and that
    model is tested (train crops ``image_size``; test: resize to ``image_size / test_crop_pct``, centre crop).
    Batch-norm statistics use momentum ``min(10 / s, 0.1)`` for ``s`` steps per epoch (the papers' decay
    ``max(1 - 10/s, 0.9)``). The protocol of the published fine-tune rows in transfer/data/baselines.csv; its
    cost: 56 fits of 20,000 steps plus the refit. ``finetune_strong`` is this suite's stronger recipe
    (RandAugment, label smoothing, epochs), which has no published counterpart.
    """

    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "freeze_backbone": "frozen and fine-tuned transfer are both published (detection); the rows say which "
                           "with a freeze_backbone condition",
        "lr": "used only with sweep=false, which is itself off the published recipe",
        "weight_decay": "used only with sweep=false, which is itself off the published recipe",
    }

    name: str = "finetune"
    lr: float = 0.01  # used when sweep=false
    weight_decay: float = 0.0  # used when sweep=false
    momentum: float = 0.9  # SimCLR B.8 / BYOL D.3: SGD with Nesterov momentum 0.9
    nesterov: bool = True
    warmup_epochs: float = 0.0  # no warmup is described; cosine decay over `steps` as in ssl-transfer finetune.py
    label_smoothing: float = 0.0
    # timm auto_augment string, e.g. "rand-m10-n2"; null turns it off. The papers' training augmentation is
    # "random crops with resize to 224x224 pixels and random flips" only (BYOL D.3).
    randaugment: str | None = None
    color_jitter: float = 0.0  # timm's colour-jitter strength in training (timm's own default is 0.4); off (BYOL D.3)
    ema_decay: float = 0.0  # 0 disables the EMA of weights
    mixup: float = 0.0
    cutmix: float = 0.0
    dropout: float = 0.0
    freeze_backbone: bool = False
    # Every lr x weight decay on train, pick on val, refit on train+val, test (SimCLR B.8 / BYOL D.3).
    sweep: bool = True
    lr_grid: list[float] = field(default_factory=lambda: list(PAPER_LR_GRID))  # PAPER_LR_GRID above
    wd_grid: list[float] = field(default_factory=lambda: list(PAPER_WD_GRID))  # PAPER_WD_GRID above
    # The optimiser's weight decay is wd / lr for each grid value (ssl-transfer finetune.py: grid (l, w / l)).
    wd_over_lr: bool = True
    # Optimiser steps per fit; null: trainer.max_epochs / trainer.max_steps. "for 20000 steps with a batch size
    # of 256" (BYOL D.3; SimCLR B.8).
    steps: int | None = 20_000
    batch_size: int | None = 256  # global batch over all devices; null: trainer.batch_size per device
    # Train: random-resized crop 224; test: resize the shorter side to 256 (= 224 / 0.875), centre crop 224
    # (BYOL D.3). Null: the checkpoint's own size and crop (task.resolution wins).
    image_size: int | None = 224
    test_crop_pct: float | None = 0.875
    bn_momentum_from_steps: bool = True  # BN decay max(1 - 10/s, 0.9), s = steps per epoch (BYOL D.3)
    # last: score each fit after its last step (ssl-transfer FinetuneModel.tune); best_epoch: its best val epoch
    select: str = "last"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"protocol.lr={self.lr} must be > 0 and protocol.weight_decay="
                              f"{self.weight_decay} >= 0.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"protocol.ema_decay={self.ema_decay} must be in [0, 1); 0 turns EMA off.")
        for key in ("dropout", "label_smoothing", "momentum"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"protocol.{key}={getattr(self, key)} must be in [0, 1).")
        check_sgd_momentum(self.momentum, self.nesterov)
        if self.color_jitter < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"protocol.color_jitter={self.color_jitter} and protocol.warmup_epochs="
                              f"{self.warmup_epochs} must be 0 or more.")
        check_randaugment(self.randaugment)
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"protocol.mixup={self.mixup} and protocol.cutmix={self.cutmix} are Beta-distribution "
                              "alphas: 0 (off) or more.")
        if self.sweep and not (self.lr_grid and self.wd_grid):
            raise ConfigError("protocol.sweep=true needs protocol.lr_grid=[...] and protocol.wd_grid=[...].")
        if any(lr <= 0 for lr in self.lr_grid) or any(wd < 0 for wd in self.wd_grid):
            raise ConfigError(f"protocol.lr_grid={self.lr_grid} needs values > 0 and protocol.wd_grid="
                              f"{self.wd_grid} values >= 0.")
        for key in ("steps", "batch_size", "image_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"protocol.{key}={getattr(self, key)} must be at least 1, or null.")
        if self.steps is not None and self.warmup_epochs > 0:
            raise ConfigError(f"protocol.warmup_epochs={self.warmup_epochs} counts epochs, but protocol.steps="
                              f"{self.steps} sets the length in steps; use warmup_epochs=0 or steps=null.")
        if self.test_crop_pct is not None and not 0 < self.test_crop_pct <= 1:
            raise ConfigError(f"protocol.test_crop_pct={self.test_crop_pct} must be in (0, 1], or null.")
        if self.select not in SELECT:
            raise ConfigError(f"protocol.select={self.select!r}; valid: {', '.join(SELECT)}.")


@dataclass
class StrongFinetuneProtocolConfig(FinetuneProtocolConfig):
    """This suite's stronger fine-tuning recipe: no published counterpart, so its runs are never shown as
    comparable with the papers' fine-tune rows (for those, use protocol=finetune).

    SGD with Nesterov momentum 0.9, epochs from ``trainer.max_epochs``, one lr / weight decay (or a sweep over
    given grids), warmup then cosine, label smoothing 0.1 and RandAugment as in the ResNet-RS recipe
    (tensorflow/tpu resnet_rs configs: label_smoothing 0.1, randaug_num_layers 2, randaug_magnitude 10 for RS-50
    at 160 px), the best val epoch tested.
    """

    PUBLISHED: ClassVar[bool] = False  # no published counterpart: nothing to deviate from

    name: str = "finetune_strong"
    lr: float = 0.01
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    # 2 layers at magnitude 10 is ResNet-RS's RandAugment for RS-50 at 160 px (tensorflow/tpu resnet_rs
    # configs: randaug_num_layers 2, randaug_magnitude 10).
    randaugment: str | None = "rand-m10-n2"
    color_jitter: float = 0.4  # timm's default (disabled by timm while RandAugment is on)
    # true: train every lr x weight_decay pair of the grids, pick on val, refit on train+val; e.g.
    # ssl-transfer finetune.py's smaller grid: lr logspace(-4,-1,4) x wd {0} + logspace(-6,-3,4)
    sweep: bool = False
    lr_grid: list[float] = field(default_factory=list)
    wd_grid: list[float] = field(default_factory=list)
    wd_over_lr: bool = False
    steps: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    test_crop_pct: float | None = None
    bn_momentum_from_steps: bool = False
    select: str = "best_epoch"


# The protocols of the classification adapter (TaskAdapter.protocols); runners in tasks.classification.task.
PROTOCOLS = {"linear": LinearProtocolConfig, "knn": KnnProtocolConfig, "finetune": FinetuneProtocolConfig,
             "finetune_strong": StrongFinetuneProtocolConfig}
