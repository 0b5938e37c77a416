"""The L-BFGS logistic regression against scikit-learn, and the parts that make it fast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from tasks.classification.linear import (
    NEAR_TIE_MARGIN,
    cross_entropy_sum,
    fit_logistic,
    l2_grid,
    near_ties,
    principal_basis,
    sweep_l2,
)
from tasks.classification.metrics import top1


def digits_features():
    """scikit-learn's digits as features (64 pixel values), the same fixed split as task=digits."""
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    order = torch.tensor(np.random.default_rng(0).permutation(len(x)))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])


def synthetic(n: int = 150, d: int = 400, classes: int = 5, seed: int = 0):
    """Fewer samples than dimensions (the row-space case), shifted away from 0 (the centring case)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 0.25
    def draw(m):
        y = rng.integers(0, classes, m)
        return torch.tensor(centers[y] + rng.normal(size=(m, d)) + 3.0, dtype=torch.float32), torch.tensor(y)
    return draw(n), draw(300)


def sklearn_accuracy(train, test, l2: float) -> tuple[float, np.ndarray]:
    # Objective sum CE + 1/(2C) ||W||^2 with C = 1/l2: the same objective as ours. Tight tolerance: the optimum.
    clf = LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=5000, tol=1e-8)
    # One BLAS thread: these problems are small, and OpenBLAS's threads beside torch's took 40 s instead of 0.2 s
    # for the digits fit at l2=1 (measured on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(train[0].numpy(), train[1].numpy())
    pred = clf.predict(test[0].numpy())
    return 100.0 * float((pred == test[1].numpy()).mean()), pred


@pytest.mark.parametrize("problem", ["digits", "synthetic"])
@pytest.mark.parametrize("l2", [1e-2, 1.0, 1e2, 1e4])
def test_agrees_with_sklearn_at_the_same_penalty(problem, l2):
    train, test = digits_features() if problem == "digits" else synthetic()
    num_classes = int(train[1].max()) + 1
    ours = fit_logistic(*train, num_classes, l2, max_iter=1000, tolerance=1e-6)
    theirs, pred = sklearn_accuracy(train, test, l2)
    assert abs(top1(ours.logits(test[0]), test[1]) - theirs) <= 0.5
    agreement = float((ours.logits(test[0]).argmax(1).numpy() == pred).mean())
    assert agreement >= 0.98


def test_sweep_agrees_with_sklearn_at_its_chosen_penalty():
    train, test = synthetic(seed=1)
    chosen, curve = sweep_l2(train, test, 5, l2_grid(1e-3, 1e3, 13), top1, max_iter=300, tolerance=1e-6)
    best = chosen.l2
    assert len(curve) == 13 and best in [c[0] for c in curve]
    model = fit_logistic(*train, 5, best, max_iter=300, tolerance=1e-6)
    theirs, _ = sklearn_accuracy(train, test, best)
    assert abs(top1(model.logits(test[0]), test[1]) - theirs) <= 0.5
    assert max(c[1] for c in curve) == pytest.approx(top1(model.logits(test[0]), test[1]), abs=0.5)


def test_principal_basis_reproduces_the_centred_features():
    (x, _), _ = synthetic(n=40, d=90)
    b = principal_basis(x)
    assert b.axes.shape == (90, 39)  # centring removes one dimension of the 40-point row space
    torch.testing.assert_close(b.coords @ b.axes.T + b.mean, x, atol=1e-3, rtol=1e-4)
    gram = b.coords.T @ b.coords
    torch.testing.assert_close(gram, torch.diag(b.singular ** 2), atol=1e-1, rtol=1e-3)


def test_weights_live_in_the_row_space_and_the_optimum_is_stationary():
    (x, y), _ = synthetic(n=60, d=200)
    l2 = 0.5
    m = fit_logistic(x, y, 5, l2, max_iter=500, tolerance=1e-8)
    w = m.weight.clone().requires_grad_(True)
    b = m.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * l2 * (w * w).sum()
    loss.backward()
    # The gradient of the full d-dimensional objective vanishes at our solution.
    assert w.grad.abs().max() < 1e-2 * max(1.0, float(w.detach().abs().max())) and b.grad.abs().max() < 1e-2


def test_cross_entropy_sum_matches_torch_and_keeps_tiny_losses():
    logits = torch.randn(32, 7) * 3
    y = torch.randint(0, 7, (32,))
    torch.testing.assert_close(cross_entropy_sum(logits, y), F.cross_entropy(logits, y, reduction="sum"))
    confident = torch.tensor([[40.0, 0.0, 0.0]])
    assert float(F.cross_entropy(confident, torch.tensor([0]), reduction="sum")) == 0.0  # float32 rounds it away
    assert float(cross_entropy_sum(confident, torch.tensor([0]))) > 0.0


def test_warm_start_reaches_the_same_optimum():
    train, test = synthetic(seed=2)
    cold = fit_logistic(*train, 5, 1.0, max_iter=500, tolerance=1e-7)
    warm = fit_logistic(*train, 5, 1.0, max_iter=500, tolerance=1e-7,
                        init=fit_logistic(*train, 5, 100.0, max_iter=500))
    torch.testing.assert_close(cold.logits(test[0]), warm.logits(test[0]), atol=5e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def digits_backbone_features():
    """Penultimate rs50 features (random weights, 32 px) of the digits split, through the suite's extractor."""
    from timm.data import create_transform

    from tasks.classification.datasets import ArrayImages, Transformed
    from tasks.classification.features import extract
    from transfer.backbones import build_backbone

    torch.manual_seed(0)
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    backbone = build_backbone("rs50", weights="random")
    transform = create_transform(**backbone.data_config(resolution=32), is_training=False)
    out = extract(backbone, Transformed(ArrayImages(images, d.target), transform), batch_size=128,
                  num_workers=0, device=torch.device("cpu"), dtype=None, channels_last=False, desc="digits features")
    feats, labels = out.features.clone(), out.labels.clone()
    order = torch.tensor(np.random.default_rng(0).permutation(len(feats)))
    test, train = order[:360], order[360:]
    return (feats[train], labels[train]), (feats[test], labels[test])


@pytest.mark.e2e  # rs50 over all 1,797 digits images, then scikit-learn on 2,048-dim features: the slowest of these
@pytest.mark.parametrize("l2", [1.0, 1e2])
def test_agrees_with_sklearn_on_backbone_features_of_digits(digits_backbone_features, l2):
    train, test = digits_backbone_features
    ours = fit_logistic(*train, 10, l2, max_iter=1000, tolerance=1e-6)
    theirs, _ = sklearn_accuracy(train, test, l2)
    assert abs(top1(ours.logits(test[0]), test[1]) - theirs) <= 0.5


def test_near_ties_count_predictions_within_the_margin_of_the_runner_up():
    logits = torch.tensor([[1.0, 1.0 + NEAR_TIE_MARGIN / 2, 0.0],  # tie between classes 0 and 1
                           [2.0, 0.0, 0.0],  # clear
                           [0.3, 0.3, 0.3],  # exact three-way tie
                           [0.0, -5.0, 2.0 * NEAR_TIE_MARGIN]])  # margin 2x the tolerance: clear
    assert near_ties(logits) == 2
    assert near_ties(logits, margin=3 * NEAR_TIE_MARGIN) == 3
    assert near_ties(torch.zeros(0, 3)) == 0 and near_ties(torch.zeros(4, 1)) == 0
