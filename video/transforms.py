"""Clip transforms on torchvision.transforms.v2: one random draw per clip, applied to every frame.

Clips arrive as (T, C, H, W) uint8 and leave as float (C, T, H, W), normalised with the backbone
weights' own mean and std. v2 treats a ``tv_tensors.Video`` as frames sharing one set of parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from transfer.errors import ConfigError
from video.config import TRAIN_CROPS


class ToModelInput:
    """uint8 (T, C, H, W) -> normalised float (C, T, H, W), written into ``out`` when given.

    One float allocation per clip (normalised in place): a test item holds 3 crops of 32 x 256^2 frames,
    and each extra float copy of a crop is 25 MB per loader worker.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
        self.shift = (mean / std).view(-1, 1, 1, 1)

    def __call__(self, frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        frames = frames.permute(1, 0, 2, 3)  # (T, C, H, W) -> (C, T, H, W), a view
        if out is None:
            out = torch.empty(frames.shape, dtype=torch.float32)
        out.copy_(frames)  # uint8 -> float32
        return out.mul_(self.scale).sub_(self.shift)  # (x / 255 - mean) / std


def build_train_transform(*, size: int, mean: Sequence[float], std: Sequence[float], crop: str = "resized",
                          area: tuple[float, float] = (0.08, 1.0), aspect: tuple[float, float] = (0.5, 2.0),
                          jitter: tuple[int, int] = (256, 320), flip: bool = True,
                          randaugment: tuple[int, int] | None = None) -> v2.Compose:
    """Random crop (``resized``: area/aspect jitter; ``jitter``: short side in ``jitter`` then a square crop),
    horizontal flip, optional RandAugment (num_ops, magnitude), normalisation."""
    if crop not in TRAIN_CROPS:
        raise ConfigError(f"train crop {crop!r} is not one of {TRAIN_CROPS}.")
    if crop == "resized":
        steps = [v2.RandomResizedCrop(size, scale=area, ratio=aspect, antialias=True)]
    else:
        lo, hi = jitter
        if not 0 < lo <= hi or lo < size:
            raise ConfigError(f"scale jitter {jitter} must satisfy crop size {size} <= min <= max.")
        steps = [v2.RandomShortestSize(list(range(lo, hi + 1)), antialias=True), v2.RandomCrop(size)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        steps.append(v2.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1]))
    return v2.Compose([tv_tensors.Video, *steps, ToModelInput(mean, std)])


class MultiCropEval:
    """Short side -> ``size``, then ``crops`` square crops spread along the long side (3: start, centre, end).

    The three-crop test of SlowFast and mmaction2 (``ThreeCrop``); v2 has no transform for it.
    Output (crops, C, T, size, size).
    """

    def __init__(self, *, size: int, mean: Sequence[float], std: Sequence[float], crops: int = 3):
        if crops < 1:
            raise ConfigError(f"spatial crops={crops} must be at least 1.")
        self.size, self.crops = size, crops
        self.resize = v2.Resize(size, antialias=True)
        self.to_input = ToModelInput(mean, std)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if min(frames.shape[-2:]) != self.size:  # frames decoded at this short side (video.decode) skip the resize
            frames = self.resize(tv_tensors.Video(frames))
        h, w = frames.shape[-2:]
        s = self.size
        if self.crops == 1:
            offsets = [((h - s) // 2, (w - s) // 2)]
        else:
            along = [round(i * (max(h, w) - s) / (self.crops - 1)) for i in range(self.crops)]
            offsets = [(a, (w - s) // 2) if h > w else ((h - s) // 2, a) for a in along]
        out = torch.empty(self.crops, frames.shape[1], frames.shape[0], s, s)  # (S, C, T, s, s)
        for i, (top, left) in enumerate(offsets):
            self.to_input(frames[..., top: top + s, left: left + s], out=out[i])
        return out
