"""Classification metrics as the transfer papers report them, in percent."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                           split: str) -> dict[str, float]:
    """``{split}/top1``, ``{split}/top5`` and ``{split}/mean_per_class`` (mean of per-class recalls)."""
    logits, target = logits.float(), target.long()
    out = {f"{split}/top1": multiclass_accuracy(logits, target, num_classes, average="micro", top_k=1)}
    if num_classes >= 5:
        out[f"{split}/top5"] = multiclass_accuracy(logits, target, num_classes, average="micro", top_k=5)
    out[f"{split}/mean_per_class"] = multiclass_accuracy(logits, target, num_classes, average="macro", top_k=1)
    return {k: 100.0 * float(v) for k, v in out.items()}


def top1(logits: torch.Tensor, target: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == target).float().mean())


def mean_per_class(logits: torch.Tensor, target: torch.Tensor) -> float:
    num_classes = max(int(target.max()) + 1, logits.shape[1])
    return 100.0 * float(multiclass_accuracy(logits.float(), target, num_classes, average="macro"))


SCORERS = {"top1": top1, "mean_per_class": mean_per_class}
