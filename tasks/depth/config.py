"""Typed settings of a monocular-depth recipe (``task=nyu_depth``), the depth adapter's protocols (the SGD recipe
the decoder, and under ``finetune`` the backbone, train with) and :func:`check`, the checks of the whole run config
that the depth adapter makes before any run directory exists."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from transfer.data_settings import check_data_settings, local_data_dir
from transfer.errors import ConfigError
from transfer.protocols import check_sgd_momentum

if TYPE_CHECKING:
    from transfer.config import RunConfig

SOURCES = ("auto", "mat", "png")
# Config keys that define the trained decoder: a resume that changes one is another run (its checkpoint would not load).
MODEL_KEYS = ("task.decoder_channels", "task.skip_connections")
DEPTH_FIELDS = ("depths", "rawDepths")
# What task.data_dir holds, named in every error about the copy (here, not in data.py: checking a config needs no
# torchvision).
NYU_LAYOUT = """\
<data_dir>/ holding either the labelled release (task.source=mat) ...
  nyu_depth_v2_labeled.mat   MATLAB v7.3 (HDF5): images N x 3 x 640 x 480 uint8, depths N x 640 x 480 metres;
                             reading it needs h5py (pip install h5py)
  splits.mat                 the official split: trainNdxs (795 frames), testNdxs (654 frames), 1-based
... or PNG exports (task.source=png), e.g. BTS's official_splits export:
  train.txt, test.txt        one frame per line: "<rgb path> <depth path> [...]", relative to data_dir
  <rgb path>                 8-bit RGB JPEG or PNG
  <depth path>               16-bit greyscale PNG, depth in millimetres (task.depth_scale=1000), 0 = no depth"""


# BYOL's NYU schedule (arXiv 2006.07733, App. D.6): 7,500 steps at batch 256. A run that trains another number of
# steps or at another global batch is not comparable (tasks.depth.task.not_comparable).
PUBLISHED_STEPS, PUBLISHED_BATCH = 7500, 256


@dataclass
class DepthTrainingValues:
    """The SGD recipe both depth protocols train with: SGD with momentum, no weight decay on norms and biases,
    linear warmup then cosine decay to 0, stepped per batch (:func:`transfer.optim.sgd_warmup_cosine`).

    Defaults are BYOL's NYU recipe (arXiv 2006.07733, App. D.6) unless a comment says otherwise; BYOL gives neither
    the momentum nor the schedule's shape. The learning rate is ``lr`` at ``lr_reference_batch`` scaled linearly to
    the actual global batch (``trainer.batch_size`` x devices x nodes). ``steps`` is the schedule's length
    (``trainer.max_steps=N`` overrides it). :class:`transfer.errors.ConfigError` for a value out of range.
    """

    name: str
    lr: float = 0.16  # BYOL D.6: learning rate 0.16 ...
    lr_reference_batch: int = PUBLISHED_BATCH  # ... at batch size 256; scaled linearly to the actual global batch
    weight_decay: float = 5e-4  # BYOL D.6: weight decay 0.0005
    momentum: float = 0.9  # not given by BYOL D.6: the usual SGD momentum
    nesterov: bool = False  # not given by BYOL D.6: plain momentum
    steps: int = PUBLISHED_STEPS  # BYOL D.6: 7,500 steps; trainer.max_steps=N overrides
    # Not given by BYOL D.6 (nor the schedule's shape): this suite's linear warmup over this fraction of the steps,
    # then cosine decay to 0.
    warmup_fraction: float = 0.05

    def __post_init__(self) -> None:
        rules = (("lr", self.lr > 0, "> 0"),
                 ("lr_reference_batch", self.lr_reference_batch >= 1, "at least 1 (the global batch lr is given for)"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"),
                 ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                 ("steps", self.steps >= 1, "at least 1"),
                 ("warmup_fraction", 0 <= self.warmup_fraction < 1, "in [0, 1) (the fraction of the steps warming up)"))
        for key, ok, rule in rules:
            if not ok:
                raise ConfigError(f"protocol.{key}={getattr(self, key)} must be {rule}.")
        check_sgd_momentum(self.momentum, self.nesterov)


_STEPS_CHECKED_ELSEWHERE = ("the steps trained (protocol.steps or trainer.max_steps) are checked with the global "
                            "batch against BYOL's 7,500 at 256 (extra.not_comparable)")


@dataclass
class DepthFrozenProtocolConfig(DepthTrainingValues):
    """``protocol=frozen`` of the depth adapter: only the FCRN decoder trains, with BYOL's NYU recipe (arXiv
    2006.07733, App. D.6; :class:`DepthTrainingValues`); the backbone takes no gradient and stays in eval mode, so its
    weights and batch-norm statistics stay as loaded. Its runs land in ``<backbone>-frozen`` and are never compared
    with fine-tuned rows."""

    FROZEN: ClassVar[bool] = True
    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {"steps": _STEPS_CHECKED_ELSEWHERE}

    name: str = "frozen"


@dataclass
class DepthFinetuneProtocolConfig(DepthTrainingValues):
    """``protocol=finetune`` of the depth adapter (the ``nyu_depth`` recipe's default): backbone and FCRN decoder
    trained together with BYOL's NYU recipe (arXiv 2006.07733, App. D.6; :class:`DepthTrainingValues`).

    A run that changes a value is not comparable (:func:`transfer.compare.protocol_deviations`).
    ``freeze_backbone=true`` is frozen transfer: :meth:`canonical` turns the run into ``protocol=frozen`` with the same
    training values (run folder ``<backbone>-frozen``, ``protocol: frozen`` in results.json, the frozen rows).
    """

    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "freeze_backbone": "true makes the run protocol=frozen, compared with the frozen rows",
        "steps": _STEPS_CHECKED_ELSEWHERE,
    }

    name: str = "finetune"
    freeze_backbone: bool = False  # true: train only the decoder (the same run as protocol=frozen)

    def canonical(self) -> DepthFinetuneProtocolConfig | DepthFrozenProtocolConfig:
        if not self.freeze_backbone:
            return self
        return DepthFrozenProtocolConfig(**{f.name: getattr(self, f.name) for f in fields(DepthTrainingValues)
                                            if f.name != "name"})


@dataclass
class DepthAugmentConfig:
    """Training colour changes (each applied to every image, grayscale with a probability), on 0-1 RGB."""

    flip: bool = True
    grayscale_p: float = 0.3
    brightness: float = 0.1255  # additive delta drawn from [-b, b]
    saturation: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hue: float = 0.2  # hue shift drawn from [-h, h] (fraction of the colour circle)

    def __post_init__(self) -> None:
        if not 0 <= self.grayscale_p <= 1 or self.brightness < 0 or not 0 <= self.hue <= 0.5:
            raise ConfigError(f"task.augment: grayscale_p={self.grayscale_p} must be in [0, 1], brightness="
                              f"{self.brightness} >= 0 and hue={self.hue} in [0, 0.5].")
        if len(self.saturation) != 2 or not 0 <= self.saturation[0] <= self.saturation[1]:
            raise ConfigError(f"task.augment.saturation={self.saturation} must be [low, high] with 0 <= low <= high.")


@dataclass
class DepthTaskConfig:
    """The data, model and evaluation settings of a depth recipe (recipes/task/nyu_depth.yaml, with sources). The
    training values are the protocol's (:class:`DepthFinetuneProtocolConfig`, :class:`DepthFrozenProtocolConfig`)."""

    UNKNOWN_KEY_HINT: ClassVar[str] = ("The training values (lr, lr_reference_batch, weight_decay, momentum, nesterov, "
                                       "steps, warmup_fraction) are the protocol's: set protocol.<key> (e.g. "
                                       "protocol.lr=0.08); task.optim.<key> was their old place.")

    name: str
    adapter: str = "depth"
    data_dir: str | None = None
    source: str = "auto"  # auto | mat (labelled .mat + splits.mat) | png (list files of RGB + 16-bit depth PNGs)
    mat_file: str = "nyu_depth_v2_labeled.mat"
    splits_file: str = "splits.mat"
    depth_field: str = "depths"  # depths (the release's filled maps) | rawDepths (the Kinect's raw output)
    train_list: str = "train.txt"  # png: lines "<rgb path> <depth path> [...]" relative to data_dir
    test_list: str = "test.txt"
    depth_scale: float = 1000.0  # png: stored value per metre (millimetres)
    input_scale: float = 0.5  # frames are resized by this factor before the model sees them
    crop: list[int] = field(default_factory=lambda: [228, 304])  # training crop (height, width) after the resize
    eval_crop: list[int] | None = field(default_factory=lambda: [45, 471, 41, 601])  # top, bottom, left, right
    eval_frame: list[int] = field(default_factory=lambda: [480, 640])  # the frame eval_crop is given for
    min_depth_eval: float = 1e-3
    max_depth_eval: float = 10.0
    decoder_channels: list[int] = field(default_factory=lambda: [1024, 512, 256, 128, 64])
    skip_connections: bool = False  # add projected res4/res3/res2 features after the first up-projections
    expected_test_images: int | None = 654  # a test split of another size is reported, not refused
    max_bad_fraction: float = 0.01
    limit_per_split: int | None = None
    augment: DepthAugmentConfig = field(default_factory=DepthAugmentConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"task.source={self.source!r}; valid: {', '.join(SOURCES)}.")
        if self.depth_field not in DEPTH_FIELDS:
            raise ConfigError(f"task.depth_field={self.depth_field!r}; valid: {', '.join(DEPTH_FIELDS)}.")
        if self.depth_scale <= 0 or not 0 < self.input_scale <= 4:
            raise ConfigError(f"task.depth_scale={self.depth_scale} must be > 0 and task.input_scale="
                              f"{self.input_scale} in (0, 4].")
        if len(self.crop) != 2 or min(self.crop) < 32:
            raise ConfigError(f"task.crop={self.crop} must be [height, width], each at least 32 pixels.")
        crop = self.eval_crop
        if crop is not None and (len(crop) != 4 or not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3])):
            raise ConfigError(f"task.eval_crop={self.eval_crop} must be [top, bottom, left, right] with top < bottom "
                              "and left < right (or null for the whole frame).")
        if not 0 <= self.min_depth_eval < self.max_depth_eval:
            raise ConfigError(f"task.min_depth_eval={self.min_depth_eval} must be >= 0 and below "
                              f"task.max_depth_eval={self.max_depth_eval}.")
        if len(self.decoder_channels) < 2 or min(self.decoder_channels) < 1:
            raise ConfigError(f"task.decoder_channels={self.decoder_channels}: the 1x1 projection's width, then one "
                              "width per up-projection block (at least one).")
        check_data_settings(max_bad_fraction=self.max_bad_fraction, limit_per_split=self.limit_per_split)


def data_root(task: DepthTaskConfig) -> Path:
    return local_data_dir(task.data_dir, task=task.name, copy="NYU Depth v2", tree=NYU_LAYOUT)


def check(cfg: RunConfig) -> None:
    """Whole-config checks (``transfer.config.validate`` calls them before any run directory exists): the data
    folder. The protocol's values (:class:`DepthTrainingValues`) and the task's are checked by their schemas when
    ``validate`` builds them, in the same call.
    """
    from transfer.data_settings import check_directory

    data_root(cfg.task)
    check_directory("task.data_dir", cfg.task.data_dir, "a NYU Depth v2 copy (layouts: docs/depth.md)")
