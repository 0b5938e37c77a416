"""Monocular-depth errors, the evaluation mask, and the training loss.

Definitions (Eigen et al. 2014, as every NYU v2 paper since reports them), computed per image over the
scored pixels and then averaged over images, as BTS's evaluation does (cleinc/bts ``pytorch/bts_eval.py``
``compute_errors`` and ``eval``): with ground truth ``g`` and prediction ``p`` in metres,
``delta_i`` = % of pixels with ``max(g/p, p/g) < 1.25**i``; ``rel`` = mean ``|g - p| / g`` (AbsRel);
``sq_rel`` = mean ``(g - p)**2 / g``; ``rms`` = sqrt(mean ``(g - p)**2``) in metres; ``rms_log`` = sqrt(mean
``(ln g - ln p)**2``); ``log10`` = mean ``|log10 g - log10 p|``.

Scored pixels (also from ``bts_eval.py``): ground truth strictly between ``min_depth`` (1e-3 m) and
``max_depth`` (10 m for NYU: BTS ``arguments_test_nyu.txt`` ``--max_depth 10``), inside the Eigen crop
(rows 45-470, columns 41-600 of the 480 x 640 frame: ``eval_mask[45:471, 41:601]``); predictions are
clipped to [min_depth, max_depth] first.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

METRIC_NAMES = ("delta1", "delta2", "delta3", "rel", "sq_rel", "rms", "rms_log", "log10")
LOWER_IS_BETTER = ("rel", "sq_rel", "rms", "rms_log", "log10")
METRICS = tuple(f"test/{m}" for m in METRIC_NAMES)  # the adapter's metric keys
# Eigen crop as (top, bottom, left, right), exclusive ends, in a frame of EIGEN_FRAME (height, width).
EIGEN_CROP = (45, 471, 41, 601)
EIGEN_FRAME = (480, 640)


def eval_mask(gt: torch.Tensor, *, min_depth: float, max_depth: float,
              crop: Sequence[int] | None = EIGEN_CROP, frame: Sequence[int] = EIGEN_FRAME) -> torch.Tensor:
    """Scored pixels of ``gt`` (H, W): valid depth within the cap and inside ``crop``.

    ``crop`` is given for a ``frame``-sized image and scaled to ``gt``'s size when that differs (a
    down-sampled export) by :func:`scale_crop`; None scores the whole frame.
    """
    mask = (gt > min_depth) & (gt < max_depth)
    if crop is not None:
        h, w = gt.shape[-2:]
        top, bottom, left, right = scale_crop(crop, frame, (h, w))
        inside = torch.zeros_like(mask)
        inside[..., top:bottom, left:right] = True
        mask &= inside
    return mask


def scale_crop(crop: Sequence[int], frame: Sequence[int], size: Sequence[int]) -> tuple[int, int, int, int]:
    """``crop`` (top, bottom, left, right; exclusive ends) of a ``frame`` (height, width) image, in pixels of an
    image of ``size`` (height, width) showing the same view.

    Rule: a pixel of the resized image is inside when its centre, mapped back onto the frame as a resize
    maps it (``align_corners=False``: centre ``i + 0.5`` -> ``(i + 0.5) * frame / size``), lies inside the crop,
    i.e. bound ``b`` becomes ``ceil(b * size / frame - 0.5)``, computed in exact integers. At the frame's own
    size the crop is unchanged; at half size the Eigen crop's 426 x 560 pixels become exactly 213 x 280
    (rows 22-234, columns 20-299 of a 240 x 320 frame).
    """

    def bound(b: int, full: int, n: int) -> int:
        return -((full - 2 * b * n) // (2 * full))  # ceil((2 b n - full) / (2 full)) = ceil(b n / full - 1/2)

    (top, bottom, left, right), (fh, fw), (h, w) = (int(c) for c in crop), frame, size
    clamp = lambda v, n: min(max(v, 0), n)  # noqa: E731
    return (clamp(bound(top, fh, h), h), clamp(bound(bottom, fh, h), h),
            clamp(bound(left, fw, w), w), clamp(bound(right, fw, w), w))


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, *, min_depth: float,
                 max_depth: float) -> torch.Tensor | None:
    """The :data:`METRIC_NAMES` of one image, deltas in percent; None when no pixel is scored.

    ``pred``, ``gt`` and ``mask``: (H, W), depths in metres.
    """
    if not bool(mask.any()):
        return None
    p = pred.double().clamp(min_depth, max_depth)[mask]
    g = gt.double()[mask]
    ratio = torch.maximum(g / p, p / g)
    diff = g - p
    return torch.stack([
        100.0 * (ratio < 1.25).double().mean(), 100.0 * (ratio < 1.25 ** 2).double().mean(),
        100.0 * (ratio < 1.25 ** 3).double().mean(),
        (diff.abs() / g).mean(), (diff ** 2 / g).mean(), (diff ** 2).mean().sqrt(),
        ((g.log() - p.log()) ** 2).mean().sqrt(), (g.log10() - p.log10()).abs().mean(),
    ])


def berhu_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reverse Huber loss over ``valid`` pixels (Laina et al. 2016, arXiv 1606.00373, Sec. 3.2; BYOL App. D.6).

    ``|x|`` up to ``c`` and ``(x**2 + c**2) / (2c)`` above, with ``c`` = 1/5 of the largest absolute
    error in the batch. Shapes broadcast; a batch with no valid pixel gives 0 (and no gradient).
    """
    diff = (pred - gt)[valid]
    if diff.numel() == 0:
        return pred.sum() * 0.0
    absdiff = diff.abs()
    c = (0.2 * absdiff.max()).detach().clamp_min(1e-6)
    return torch.where(absdiff <= c, absdiff, (diff ** 2 + c ** 2) / (2 * c)).mean()
