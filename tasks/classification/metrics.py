"""Classification metrics as the transfer papers report them, in percent.

Mean per-class accuracy is the mean, over the classes **present in the evaluated split**, of the fraction
of that class's images predicted correctly (SimCLR, arXiv 2002.05709, Appendix B.8; ssl-transfer
``linear.py``: per-class recall from the confusion matrix of the test labels). A class with no image in the
split has no accuracy and is left out, even when the model predicts it; ``torchmetrics``' ``macro`` average
would count such a predicted-but-absent class as 0 and report less.
"""
from __future__ import annotations

import torch

# Every percentage is a count of hits over a count of images, divided in Python (float64): float32 would put
# noise in the seventh digit that results.json's rounding then keeps (29/30 as 96.66666 instead of 96.66667).


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                           split: str) -> dict[str, float]:
    """``{split}/top1``, ``{split}/top5`` (5 or more classes) and ``{split}/mean_per_class``, in percent.

    ``logits`` (N, num_classes), ``target`` (N,) class indices. An empty split gives no metric.
    Raises ``ValueError`` for a target outside ``[0, num_classes)``.
    """
    if not len(target):
        return {}
    target = target.long()
    if int(target.min()) < 0 or int(target.max()) >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes}); got {int(target.min())}..{int(target.max())}")
    out = {f"{split}/top1": top_k(logits, target, 1)}
    if num_classes >= 5:
        out[f"{split}/top5"] = top_k(logits, target, 5)
    out[f"{split}/mean_per_class"] = mean_per_class(logits, target)
    return out


def top_k(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Percent of images whose class is among the ``k`` highest logits: (N, C), (N,) -> hits / N * 100."""
    hits = (logits.topk(min(k, logits.shape[1]), dim=1).indices == target.long()[:, None]).any(1)
    return 100.0 * int(hits.sum()) / len(target)


def top1(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Percent of images whose highest logit is their class: (N, C), (N,) -> hits / N * 100."""
    return 100.0 * int((logits.argmax(1) == target.long()).sum()) / len(target)


def mean_per_class(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present in ``target`` of their accuracy (percent): (N, C), (N,) -> float.

    Each class's accuracy is its integer hit count over its integer image count, in float64."""
    target = target.long()
    size = max(int(target.max()) + 1, logits.shape[1])
    per_class_total = torch.bincount(target, minlength=size)
    per_class_correct = torch.bincount(target[logits.argmax(1) == target], minlength=size)
    present = per_class_total > 0
    return 100.0 * float((per_class_correct[present].double() / per_class_total[present].double()).mean())


SCORERS = {"top1": top1, "mean_per_class": mean_per_class}
