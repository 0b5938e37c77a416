"""Transfer protocols and their typed settings, shared by every task that supports them."""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer.errors import ConfigError
from transfer.registry import Registry

PROTOCOLS: Registry[type] = Registry("protocol")


@PROTOCOLS.register("linear")
@dataclass
class LinearProtocolConfig:
    """L2-regularised multinomial logistic regression on frozen, cached penultimate features.

    The grid follows SimCLR (arXiv 2002.05709, Appendix B.8) and BYOL (arXiv 2006.07733, Appendix D.2):
    45 log-spaced values of the L2 penalty in [1e-6, 1e5], chosen on validation, then refit on train+val.
    """

    name: str = "linear"
    l2_min: float = 1e-6
    l2_max: float = 1e5
    l2_steps: int = 45
    max_iter: int = 200
    tolerance: float = 1e-6
    cache: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.l2_min < self.l2_max or self.l2_steps < 1:
            raise ConfigError(f"protocol l2 grid [{self.l2_min}, {self.l2_max}] x {self.l2_steps} is empty; "
                              "need 0 < l2_min < l2_max and l2_steps >= 1.")


@PROTOCOLS.register("knn")
@dataclass
class KnnProtocolConfig:
    """k-NN on cached features: cosine similarity, temperature-weighted votes."""

    name: str = "knn"
    k: int = 20
    temperature: float = 0.07
    cache: bool = True

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"protocol.k={self.k} must be >= 1 and protocol.temperature={self.temperature} > 0.")


@PROTOCOLS.register("finetune")
@dataclass
class FinetuneProtocolConfig:
    """Full fine-tuning through the shared Lightning engine (recipe values in recipes/protocol/finetune.yaml)."""

    name: str = "finetune"
    lr: float = 0.01
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    # timm auto_augment string; 2 layers at magnitude 10 is ResNet-RS's RandAugment for RS-50 at 160 px
    # (tensorflow/tpu resnet_rs configs: randaug_num_layers 2, randaug_magnitude 10). null turns it off.
    randaugment: str | None = "rand-m10-n2"
    ema_decay: float = 0.0  # 0 disables the EMA of weights
    mixup: float = 0.0
    cutmix: float = 0.0
    dropout: float = 0.0
    freeze_backbone: bool = False
    sweep: bool = False  # grid over lr_grid x wd_grid, chosen on val, then refit on train+val
    lr_grid: list[float] = field(default_factory=list)
    wd_grid: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"protocol.lr={self.lr} must be > 0 and protocol.weight_decay="
                              f"{self.weight_decay} >= 0.")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"protocol.ema_decay={self.ema_decay} must be in [0, 1); 0 turns EMA off.")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"protocol.mixup={self.mixup} and protocol.cutmix={self.cutmix} are Beta-distribution "
                              "alphas: 0 (off) or more.")
        if self.sweep and not (self.lr_grid and self.wd_grid):
            raise ConfigError("protocol.sweep=true needs protocol.lr_grid=[...] and protocol.wd_grid=[...].")


@PROTOCOLS.register("eval")
@dataclass
class PretrainedEvalConfig:
    """Evaluate the checkpoint's own classifier as it is: nothing is trained (task=imagenet)."""

    name: str = "eval"
