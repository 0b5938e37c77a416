"""Classification metrics: mean per-class accuracy is over the classes present in the split (SimCLR App. B.8)."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy

from tasks.classification.metrics import SCORERS, classification_metrics


def absent_class_case() -> tuple[torch.Tensor, torch.Tensor]:
    """A 6-class model on a test split holding classes 0-3 only: classes 0-2 all right (2 images each),
    class 3 half right (4 images), its two errors predicted as classes 4 and 5, which have no test image."""
    target = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])
    ranks = torch.tensor([0.05, 0.04, 0.03, 0.02, 0.01, 0.0])  # no ties: top-5 is the prediction, then 0, 1, 2, 3
    return 10 * torch.nn.functional.one_hot(predicted, 6).float() + ranks, target  # (10, 6) logits, (10,)


def test_mean_per_class_counts_only_classes_present_in_the_split():
    logits, target = absent_class_case()
    # (1 + 1 + 1 + 0.5) / 4 present classes; averaging in the absent, predicted classes 4 and 5 gives 3.5 / 6.
    assert classification_metrics(logits, target, 6, "test")["test/mean_per_class"] == pytest.approx(87.5)
    assert SCORERS["mean_per_class"](logits, target) == pytest.approx(87.5)
    wrong = 100 * float(multiclass_accuracy(logits, target, 6, average="macro"))
    assert wrong == pytest.approx(58.333, abs=1e-2)  # what the suite reported before


def test_top1_top5_and_an_empty_split():
    logits, target = absent_class_case()
    metrics = classification_metrics(logits, target, 6, "test")
    assert metrics["test/top1"] == pytest.approx(80.0) and metrics["test/top5"] == pytest.approx(100.0)
    assert classification_metrics(logits[:0], target[:0], 6, "test") == {}


def test_percentages_are_counts_divided_in_float64():
    """29 of 30 right is 96.66667 after results.json's seven digits; from float32 it was 96.66666."""
    from transfer.results import tidy_metric

    target = torch.arange(30) % 6
    predicted = target.clone()
    predicted[0] = 1  # one error, in class 0 (5 images)
    logits = torch.nn.functional.one_hot(predicted, 6).float()
    metrics = classification_metrics(logits, target, 6, "test")
    assert metrics["test/top1"] == 100.0 * 29 / 30 and tidy_metric(metrics["test/top1"]) == 96.66667
    assert SCORERS["top1"](logits, target) == 100.0 * 29 / 30
    assert tidy_metric(metrics["test/mean_per_class"]) == tidy_metric(100.0 * (4 / 5 + 5) / 6) == 96.66667
    assert metrics["test/top5"] == 100.0
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        classification_metrics(logits, target + 1, 6, "test")
