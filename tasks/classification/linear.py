"""Multinomial logistic regression with an L2 penalty, fit by L-BFGS in torch (on the GPU when there is one).

The objective is ``sum_i CE(x_i) + l2/2 * ||W||^2`` (bias not penalised): the same as scikit-learn's
``LogisticRegression(C=1/l2)``, so grids and numbers carry over. Written here rather than called from
scikit-learn because that runs on the CPU only and is slow at ImageNet scale (see openai/CLIP issue #202).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class LinearModel:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = 1000,
                 tolerance: float = 1e-6, init: LinearModel | None = None) -> LinearModel:
    """Minimise ``sum CE + l2/2 ||W||^2`` with L-BFGS (strong Wolfe line search), warm-started from ``init``."""
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device) if init is None else init.weight.clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init.bias.clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                            tolerance_change=tolerance * 1e-3, history_size=20, line_search_fn="strong_wolfe")

    # The loss is divided by n so that gradient tolerances mean the same for every data set size.
    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * l2 * (w * w).sum()) / n
        loss.backward()
        return loss

    opt.step(closure)
    return LinearModel(w.detach(), b.detach(), l2)


def l2_grid(low: float, high: float, steps: int) -> list[float]:
    return np.logspace(np.log10(low), np.log10(high), steps).tolist()


def sweep_l2(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
             grid: list[float], score, **fit_kwargs) -> tuple[float, list[tuple[float, float]]]:
    """Fit every ``l2`` of ``grid`` on train, score on val; returns the best l2 and the curve.

    Goes from the strongest penalty to the weakest, warm-starting each fit from the previous one.
    """
    curve, model = [], None
    for l2 in tqdm(sorted(grid, reverse=True), desc="l2 sweep", unit="fit", leave=False):
        model = fit_logistic(*train, num_classes, l2, init=model, **fit_kwargs)
        curve.append((l2, score(model.logits(val[0]), val[1])))
    best = max(curve, key=lambda item: (item[1], item[0]))  # ties: the stronger penalty
    return best[0], sorted(curve)
