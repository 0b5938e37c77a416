"""Multi-view testing: ``clips`` uniformly spaced temporal clips x ``crops`` spatial crops per video,
softmax scores averaged per video (mmaction2 ``average_clips='prob'``), then top-1 / top-5.

Items of :class:`MultiViewClips` are (video, temporal clip) pairs carrying all spatial crops, so the
views of one video spread over loader workers and DDP ranks; :class:`ViewScores` sums the scores per
video, counts the temporal clips that failed to decode per video, and is reduced over ranks once at
the end.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch.utils.data import Dataset
from torchmetrics.functional.classification import multiclass_accuracy

from video.data import Failure, failed_indices, read_or_skip
from video.decode import ClipSpec


def uniform_starts(duration: Fraction | float, clip: Fraction | float, clips: int) -> list[float]:
    """Start times of ``clips`` clips spread evenly over the video, first at 0, last ending at its end.

    The spacing of pytorchvideo's ``ConstantClipsPerVideoSampler``, computed without its per-call state
    so that any clip of any video can be read independently.
    """
    span = max(Fraction(duration) - Fraction(clip), Fraction(0))
    return [float(span * i / max(clips - 1, 1)) for i in range(clips)]


class MultiViewClips(Dataset):
    """Item ``(v, c)``: temporal clip ``c`` of video ``v`` with all its spatial crops.

    ``pad`` appends placeholder items (video -1) so the length divides the number of DDP ranks:
    Lightning's ``DistributedSampler`` would otherwise repeat real views, and a repeated view would
    be counted twice in a video's average.
    """

    def __init__(self, videos: list[tuple[str, int]], spec: ClipSpec, transform: Callable, *, clips: int = 10,
                 short_side: int | None = None):
        self.videos, self.spec, self.transform, self.clips = videos, spec, transform, clips
        self.short_side = short_side  # frames are resized to this short side while decoding
        self.length = len(videos) * clips

    def pad(self, ranks: int) -> None:
        """Round the length up to a multiple of ``ranks`` with placeholder items."""
        self.length = math.ceil(len(self.videos) * self.clips / ranks) * ranks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict | Failure | None:
        v, c = divmod(i, self.clips)
        if v >= len(self.videos):
            return None  # a placeholder
        path, label = self.videos[v]
        start = lambda duration: uniform_starts(duration, self.spec.duration, self.clips)[c]  # noqa: E731
        return read_or_skip(v, path, label, start, self.spec, self.transform, short_side=self.short_side)


def collate_views(samples: list[dict | Failure | None]) -> dict:
    """Stack the decoded views: video (B, S, C, T, H, W); ``failed`` holds the video index of each temporal clip
    that did not decode; placeholders are dropped."""
    good = [s for s in samples if isinstance(s, dict)]
    batch = {"failed": failed_indices(samples)}
    if good:
        batch["video"] = torch.stack([s["video"] for s in good])
        batch["label"] = torch.tensor([s["label"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good])
    return batch


class ViewScores:
    """Per-video sums of softmax scores over views and counts of failed temporal clips; ``reduce`` merges the
    counts of all ranks."""

    def __init__(self, labels: list[int], num_classes: int, device: torch.device | str = "cpu"):
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.sums = torch.zeros(len(labels), num_classes, dtype=torch.float64, device=device)
        self.views = torch.zeros(len(labels), dtype=torch.long, device=device)
        self.failed = torch.zeros(len(labels), dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        """``logits`` (B, S, K) for the S spatial crops of B temporal clips of videos ``index``."""
        probs = logits.float().softmax(-1).sum(1).double()  # (B, S, K) -> (B, K)
        self.sums.index_add_(0, index, probs)
        self.views.index_add_(0, index, torch.full_like(index, logits.shape[1]))

    def fail(self, index: torch.Tensor) -> None:
        """Temporal clips of videos ``index`` did not decode."""
        index = index.to(self.failed.device)
        self.failed.index_add_(0, index, torch.ones_like(index))

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.sums = all_reduce_sum(self.sums)
        self.views = all_reduce_sum(self.views)
        self.failed = all_reduce_sum(self.failed)

    def failed_videos(self) -> list[int]:
        """Indices of the videos with at least one temporal clip that did not decode."""
        return (self.failed > 0).nonzero().flatten().tolist()

    def metrics(self, prefix: str, top_k: tuple[int, ...] = (1, 5)) -> tuple[dict[str, float], int]:
        """``{prefix/top1: %, prefix/top5: %}`` over videos with at least one view, and how many had none."""
        seen = self.views > 0
        scores = (self.sums[seen] / self.views[seen, None]).float()
        target = self.labels[seen]
        num_classes = self.sums.shape[1]
        out = {}
        for k in top_k:
            if k <= num_classes and seen.any():
                acc = multiclass_accuracy(scores, target, num_classes, top_k=k, average="micro")
                out[f"{prefix}/top{k}"] = 100.0 * float(acc)
        return out, int((~seen).sum())
