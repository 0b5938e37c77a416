"""Multinomial logistic regression with an L2 penalty, fit by L-BFGS in torch (on the GPU when there is one).

The objective is ``sum_i CE(x_i) + l2/2 * ||W||^2`` (bias not penalised): the same as scikit-learn's
``LogisticRegression(C=1/l2)``, so grids and numbers carry over. Written here rather than called from
scikit-learn because that runs on the CPU only and is slow at ImageNet scale (see openai/CLIP issue #202).

Speed without changing the answer: the fit runs in the principal axes of the centred training features.

* Centring is exact: the unpenalised bias absorbs the mean, ``X W^T + b = (X - mu) W^T + (b + W mu)``.
* Directions with no training variance carry no signal, and the L2 penalty drives the weights along them
  to zero, so the optimum lies in the span of the axes: when ``n < d`` the problem shrinks to ``n``
  dimensions (the row space of X) with the same minimiser.
* In those axes ``X^T X`` is diagonal, so each coordinate is rescaled by ``sqrt(k s_j^2 + l2)``, the
  curvature the objective has along it; L-BFGS then starts close to a Newton step instead of spending
  hundreds of iterations on the ill-conditioned weak-penalty end of the sweep. The penalty is kept on the
  original weights, so the minimiser is unchanged; only the path to it is shorter.

Bounded memory (ImageNet-1k: N x D x C = 1.28 M x 2048 x 1000): the features may be :class:`Rows` read chunk by
chunk (``tasks/classification/rows.py``). The mean and the (D, D) Gram matrix of the basis are summed over
chunks, and every L-BFGS evaluation sums the loss and its gradient over chunks (one backward per chunk, the
gradients accumulate), so the fit holds one chunk's (n, D) features, (n, K) coordinates and (n, C) logits
plus the (D, D) basis and the (C, D) weights at a time. The sums differ from the one-block sums only in their
order of addition, so a chunked fit gives the one-block predictions up to numerical ties at the fit's float32
precision: L-BFGS stops at a tolerance, and a test image whose two best logits lie within that noise may be
predicted the other way (:func:`near_ties` counts them; the task reports ``counts.test_near_ties``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasks.classification.rows import Rows, as_rows

# Relative eigenvalue below which a direction of the training features counts as empty.
RANK_TOLERANCE = 1e-10
# Top-2 logit margin (logit units) below which a prediction counts as a near tie: the float32 L-BFGS fit stops
# at a relative tolerance, so a fit by chunks (or on another device) may break such a tie the other way.
NEAR_TIE_MARGIN = 1e-3


def near_ties(logits: torch.Tensor, margin: float = NEAR_TIE_MARGIN) -> int:
    """How many rows of (N, C) ``logits`` have their two largest values closer than ``margin``: predictions
    that numerical noise of the fit can flip (0 when C < 2)."""
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        return 0
    top = logits.topk(2, dim=1).values
    return int((top[:, 0] - top[:, 1] < margin).sum())


@dataclass
class LinearModel:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    l2: float
    iterations: int = 0

    def logits(self, x: torch.Tensor | Rows) -> torch.Tensor:
        """(N, D) features, or :class:`Rows` read chunk by chunk, -> (N, C) logits."""
        if isinstance(x, Rows):
            out = [self.logits(chunk) for chunk, _ in x.chunks()]
            return torch.cat(out) if out else torch.zeros(0, len(self.bias), device=self.weight.device)
        return x.to(self.weight) @ self.weight.T + self.bias


@dataclass
class Basis:
    """Training features in their principal axes: ``coords = (x - mean) @ axes``, ``coords^T coords = diag(s^2)``.

    ``rows`` are the coordinates with the training labels, as :class:`Rows`: computed once and held when the
    features are in memory, computed chunk by chunk from the shards on every pass when they are streamed.
    """

    mean: torch.Tensor  # (D,)
    axes: torch.Tensor  # (D, K), orthonormal columns, K <= min(N, D)
    singular: torch.Tensor  # (K,) singular values s of the centred features
    rows: Rows  # (N, K) coordinates and the (N,) labels

    @property
    def coords(self) -> torch.Tensor:
        """All coordinates as one (N, K) tensor."""
        return self.rows.materialise()


def principal_basis(x: torch.Tensor | Rows) -> Basis:
    """Principal axes of ``x`` from the smaller of its two Gram matrices (in float64 for accuracy).

    ``x`` is an (N, D) tensor or :class:`Rows`; the mean and the (D, D) Gram matrix are summed chunk by chunk,
    so streamed rows need two passes and O(D^2) memory. With ``N < D`` the (N, N) Gram matrix of all rows is
    used (the rows then take less memory than the (D, D) matrix).
    """
    rows = as_rows(x)
    dtype, device = rows.dtype, rows.device
    n, d = len(rows), rows.dim
    total = torch.zeros(d, dtype=torch.float64, device=device)
    for chunk, _ in rows.chunks():
        total += chunk.double().sum(0)
    mean = (total / max(1, n)).to(dtype)
    if n >= d:
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        for chunk, _ in rows.chunks():
            xc = (chunk - mean).double()
            gram += xc.T @ xc
        eig, axes = torch.linalg.eigh(gram)  # (D, D)
    else:
        xc = (rows.materialise() - mean).double()
        eig, left = torch.linalg.eigh(xc @ xc.T)  # (N, N): the row space of x, n < d
    keep = eig > RANK_TOLERANCE * eig.max().clamp_min(torch.finfo(torch.float64).tiny)
    singular = eig[keep].sqrt()
    axes = (xc.T @ left[:, keep]) / singular if n < d else axes[:, keep]  # (D, K): right singular vectors

    def to_coords(chunk: torch.Tensor) -> torch.Tensor:
        return ((chunk - mean).double() @ axes).to(dtype)  # (n, D) -> (n, K)

    coords = rows.map(to_coords, dim=len(singular))
    if rows.in_memory:  # held once for the whole sweep, as the features are
        coords = coords.resident(float("inf"))
    return Basis(mean=mean, axes=axes.to(dtype), singular=singular.to(dtype), rows=coords)


def cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_i CE(logits_i, y_i)`` written as ``softplus(logsumexp_{c != y}(z_c - z_y))``.

    Same value as ``F.cross_entropy(..., reduction="sum")``, but a confidently right sample keeps its tiny
    loss instead of rounding to 0 in float32 (``log(1 + e)`` for e < 1e-7). Weak penalties on separable
    features live in that regime; with the rounding, L-BFGS sees a flat objective and stops far from the optimum.
    """
    margins = logits - logits.gather(1, y[:, None])  # (N, C): z_c - z_y
    margins = margins.scatter(1, y[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(margins, dim=1)).sum()


def objective(model: LinearModel, x: torch.Tensor | Rows, y: torch.Tensor | None = None) -> float:
    """``sum_i CE(x_i W^T + b, y_i) + l2/2 ||W||^2`` of ``model`` on (N, D) features with labels (N,), or Rows."""
    rows = as_rows(x, y)
    with torch.no_grad():
        total = sum(float(cross_entropy_sum(model.logits(chunk), labels)) for chunk, labels in rows.chunks())
        return total + 0.5 * model.l2 * float((model.weight.double() ** 2).sum())


def fit_logistic(x: torch.Tensor | Rows, y: torch.Tensor | None, num_classes: int, l2: float, *, max_iter: int = 200,
                 tolerance: float = 1e-6, init: LinearModel | None = None, basis: Basis | None = None) -> LinearModel:
    """Minimise ``sum CE + l2/2 ||W||^2`` with L-BFGS (strong Wolfe line search), warm-started from ``init``.

    ``x``: (N, D) features with labels ``y`` (N,), or :class:`Rows` (``y=None``), whose chunks the loss and its
    gradient are summed over: memory is bounded by one chunk's (n, D) features and (n, C) logits, whatever N.
    ``basis`` (from :func:`principal_basis` of ``x``) is reused across a sweep; it is computed when absent.
    """
    rows = as_rows(x, y)
    basis = basis if basis is not None else principal_basis(rows)
    n = len(rows)
    dtype, device = basis.mean.dtype, basis.mean.device
    if init is None:
        a = torch.zeros(num_classes, len(basis.singular), dtype=dtype, device=device)
        b = torch.zeros(num_classes, dtype=dtype, device=device)
    else:
        a = init.weight.to(basis.axes) @ basis.axes  # (C, D) -> (C, K)
        b = init.bias.to(basis.axes) + init.weight.to(basis.axes) @ basis.mean
    # Curvature of the mean objective along axis j: about k s_j^2 / n from the data, k the mean softmax
    # variance p(1-p) at the starting point (about 1/C at the uniform start, small once the fit is confident),
    # plus l2 / n from the penalty. Dividing by its square root makes the Hessian close to I.
    with torch.no_grad():
        variance = 0.0
        for z, _ in basis.rows.chunks():
            p = torch.softmax(z @ a.T + b, dim=1)  # (n, C)
            variance += float((p * (1 - p)).sum())
        k = variance / max(1, n) / num_classes
    precond = ((k * basis.singular ** 2 + l2) / n).sqrt()  # (K,)
    theta = a * precond
    theta.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([theta, b], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance * min(1.0, l2),
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    # The loss is divided by n so that gradient tolerances mean the same for every data set size; the
    # gradient tolerance also shrinks with a weak penalty, whose optimum sits where the gradient is small.
    # Loss and gradient are summed chunk by chunk (backward per chunk accumulates into .grad).
    def closure():
        opt.zero_grad()
        penalty = 0.5 * l2 * ((theta / precond) ** 2).sum()
        value = torch.zeros((), dtype=dtype, device=device)
        for i, (z, labels) in enumerate(basis.rows.chunks()):
            loss = (cross_entropy_sum((z / precond) @ theta.T + b, labels) + (penalty if i == 0 else 0.0)) / n
            loss.backward()
            value += loss.detach()
        if n == 0:
            (penalty / max(1, n)).backward()
        return value

    opt.step(closure)
    iterations = int(opt.state[theta].get("n_iter", 0))
    with torch.no_grad():
        weight = (theta / precond) @ basis.axes.T  # (C, K) -> (C, D)
        bias = b - weight @ basis.mean
    return LinearModel(weight.detach(), bias.detach(), l2, iterations)


def _rows(data: tuple[torch.Tensor, torch.Tensor] | Rows) -> Rows:
    return data if isinstance(data, Rows) else as_rows(*data)


def l2_grid(low: float, high: float, steps: int) -> list[float]:
    return np.logspace(math.log10(low), math.log10(high), steps).tolist()


def sweep_l2(train: tuple[torch.Tensor, torch.Tensor] | Rows, val: tuple[torch.Tensor, torch.Tensor] | Rows,
             num_classes: int, grid: list[float], score: Callable[[torch.Tensor, torch.Tensor], float], *,
             basis: Basis | None = None, **fit_kwargs) -> tuple[LinearModel, list[tuple[float, float]]]:
    """Fit every ``l2`` of ``grid`` on train, score on val; returns the best model and the curve ``(l2, score)``.

    Goes from the strongest penalty to the weakest, warm-starting each fit from the previous one; the
    principal axes of train are computed once for the whole sweep (or given as ``basis``). ``train`` and ``val``
    are ``(features, labels)`` tensors or :class:`Rows`.
    """
    train, val = _rows(train), _rows(val)
    basis = basis if basis is not None else principal_basis(train)
    curve, model, best = [], None, None
    for l2 in tqdm(sorted(grid, reverse=True), desc="l2 sweep", unit="fit", leave=False):
        model = fit_logistic(train, None, num_classes, l2, init=model, basis=basis, **fit_kwargs)
        curve.append((l2, score(model.logits(val), val.labels)))
        if best is None or curve[-1][1] > best[1]:  # ties keep the stronger penalty, fitted first
            best = (model, curve[-1][1])
    return best[0], sorted(curve)


@dataclass
class L2Search:
    """The outcome of :func:`search_l2`.

    ``curve`` holds every ``(l2, val score)`` fitted, sorted by l2. ``edge`` names the end(s) of the requested
    grid where the first sweep's curve had not come down from its best (``"weak"``: the smallest l2,
    ``"strong"``: the largest, ``"weak+strong"``), None when the best was bracketed by worse values on both
    sides. ``searched`` are the smallest and largest l2 fitted; ``at_edge`` is True when, even after the
    extension, an end of ``searched`` still scores as well as the best: a better l2 may then lie outside.
    """

    best: LinearModel
    curve: list[tuple[float, float]]
    edge: str | None
    searched: tuple[float, float]
    at_edge: bool

    def as_dict(self) -> dict:
        return {"edge": self.edge, "searched": list(self.searched), "at_edge": self.at_edge}


def _log_step(grid: list[float]) -> float:
    """The grid's spacing in decades (a quarter decade for a one-value grid)."""
    ordered = sorted(grid)
    return math.log10(ordered[1] / ordered[0]) if len(ordered) > 1 else 0.25


def search_l2(train: tuple[torch.Tensor, torch.Tensor] | Rows, val: tuple[torch.Tensor, torch.Tensor] | Rows,
              num_classes: int,
              grid: list[float], score: Callable[[torch.Tensor, torch.Tensor], float], *,
              extend_decades: float = 4.0, refine_steps: int = 0, **fit_kwargs) -> L2Search:
    """:func:`sweep_l2` over ``grid``, then make sure no l2 outside what was searched could score better.

    An end of the grid is *open* while its score is not below the best score (the curve has not come down
    there). Each open end is extended, one decade at a time at the grid's own spacing, until it closes or
    ``extend_decades`` have been added on that side; never further than ``extend_decades`` past the grid (a
    step coarser than what is left is shortened to it). The best is the first-found highest score (ties keep the
    stronger penalty of the first sweep); a new value replaces it only when strictly better. ``refine_steps``
    then halves the spacing around the peak that many times, the refinement CLIP_benchmark's linear probe does
    around its peak; 0 keeps the grid's own values (the papers' protocol).
    """
    step = _log_step(grid)
    train, val = _rows(train), _rows(val)
    basis = principal_basis(train)  # reused by every fit
    best, curve = sweep_l2(train, val, num_classes, grid, score, basis=basis, **fit_kwargs)
    scores = dict(curve)
    best_score = scores[best.l2]

    def fit_and_score(l2: float, init: LinearModel | None) -> LinearModel:
        nonlocal best, best_score
        model = fit_logistic(train, None, num_classes, l2, init=init, basis=basis, **fit_kwargs)
        scores[l2] = score(model.logits(val), val.labels)
        if scores[l2] > best_score:  # strictly better: ties keep the first-found (stronger) penalty
            best, best_score = model, scores[l2]
        return model

    def open_ends() -> list[str]:
        low, high = min(scores), max(scores)
        return [side for side, end in (("weak", low), ("strong", high)) if scores[end] >= best_score]

    first_open = open_ends()
    per_decade = max(1, round(1 / step))
    added = {"weak": 0.0, "strong": 0.0}
    while sides := [s for s in open_ends() if added[s] < extend_decades - 1e-9]:
        # At the grid's spacing, never past extend_decades on this side: a coarse grid (11 decades apart)
        # is extended by at most what is left, not by one whole grid step.
        room = extend_decades - added[sides[0]]
        exps = [e for e in ((i + 1) * step for i in range(per_decade)) if e <= room + 1e-9] or [room]
        if sides[0] == "weak":  # weaker penalties, in order, warm-started from the best fit
            low = min(scores)
            new, model = [low / 10 ** e for e in exps], best
        else:  # stronger penalties, strongest first, from scratch as the first sweep starts
            high = max(scores)
            new, model = sorted((high * 10 ** e for e in exps), reverse=True), None
        for l2 in new:
            model = fit_and_score(l2, model)
        added[sides[0]] += exps[-1]
    for _ in range(refine_steps):
        step /= 2
        center = best
        for l2 in (center.l2 * 10 ** step, center.l2 / 10 ** step):
            fit_and_score(l2, center)
    curve = sorted(scores.items())
    return L2Search(best=best, curve=curve, edge="+".join(first_open) or None, searched=(curve[0][0], curve[-1][0]),
                    at_edge=bool(open_ends()))
