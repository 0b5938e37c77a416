"""Classification metrics as the transfer papers report them, in percent.

Mean per-class accuracy is the mean, over the classes **present in the evaluated split**, of the fraction
of that class's images predicted correctly (SimCLR, arXiv 2002.05709, Appendix B.8; ssl-transfer
``linear.py``: per-class recall from the confusion matrix of the test labels). A class with no image in the
split has no accuracy and is left out, even when the model predicts it; ``torchmetrics``' ``macro`` average
would count such a predicted-but-absent class as 0 and report less.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                           split: str) -> dict[str, float]:
    """``{split}/top1``, ``{split}/top5`` (5 or more classes) and ``{split}/mean_per_class``, in percent.

    ``logits`` (N, num_classes), ``target`` (N,) class indices. An empty split gives no metric.
    """
    if not len(target):
        return {}
    logits, target = logits.float(), target.long()
    out = {f"{split}/top1": 100.0 * float(multiclass_accuracy(logits, target, num_classes, average="micro", top_k=1))}
    if num_classes >= 5:
        out[f"{split}/top5"] = 100.0 * float(multiclass_accuracy(logits, target, num_classes, average="micro",
                                                                  top_k=5))
    out[f"{split}/mean_per_class"] = mean_per_class(logits, target)
    return out


def top1(logits: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == target).float().mean())


def mean_per_class(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present in ``target`` of their accuracy (percent): (N, C), (N,) -> float."""
    target = target.long()
    correct = (logits.argmax(1) == target).double()
    size = max(int(target.max()) + 1, logits.shape[1])
    per_class_total = torch.bincount(target, minlength=size).double()
    per_class_correct = torch.bincount(target, weights=correct, minlength=size)
    present = per_class_total > 0
    return 100.0 * float((per_class_correct[present] / per_class_total[present]).mean())


SCORERS = {"top1": top1, "mean_per_class": mean_per_class}
