"""The linear probe's l2 search never reports a best that may lie outside what it searched."""
from __future__ import annotations

import json

import pytest
import torch
from suite_helpers import QUICK

from tasks.classification.linear import l2_grid, search_l2
from tasks.classification.metrics import top1
from transfer.run import main as run_main

FIT = dict(max_iter=60, tolerance=1e-6)


def noisy_problem(n: int, seed: int, d: int = 30, classes: int = 3):
    """5 informative dimensions among 25 of growing noise: weak penalties overfit, strong ones fall back to the
    class means, which the noise hurts; the validation curve has one peak, near l2 = 1 to 10 here."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(classes, d)
    means[:, :5] = torch.randn(classes, 5, generator=torch.Generator().manual_seed(0))
    scale = torch.ones(d)
    scale[5:] = torch.logspace(0, 1.3, d - 5)
    y = torch.arange(n) % classes
    return means[y] + 0.7 * scale * torch.randn(n, d, generator=g), y


@pytest.fixture(scope="module")
def problem():
    return noisy_problem(90, seed=1), noisy_problem(300, seed=2)


def test_a_best_at_the_grid_end_is_followed_outside_until_the_curve_comes_down(problem):
    train, val = problem
    grid = l2_grid(31.6, 316.0, 3)  # entirely on the strong side of the peak
    plain_best = max(search_l2(train, val, 3, grid, top1, extend_decades=0, **FIT).curve, key=lambda c: c[1])
    search = search_l2(train, val, 3, grid, top1, **FIT)
    assert search.edge == "weak" and not search.at_edge
    scores = dict(search.curve)
    best = search.best.l2
    assert best < min(grid) and scores[best] > plain_best[1]  # the grid alone would have reported less
    assert scores[best] == max(scores.values())
    assert scores[search.searched[0]] < scores[best] and scores[search.searched[1]] < scores[best]
    assert search.searched[1] == max(grid) and search.searched[0] < best


def test_without_room_to_extend_the_search_says_the_best_may_lie_outside(problem):
    train, val = problem
    search = search_l2(train, val, 3, l2_grid(31.6, 316.0, 3), top1, extend_decades=0, **FIT)
    assert search.edge == "weak" and search.at_edge and search.best.l2 == pytest.approx(31.6)
    assert search.as_dict() == {"edge": "weak", "searched": [pytest.approx(31.6), pytest.approx(316.0)],
                                "at_edge": True}


def test_an_inside_peak_needs_no_extension_and_refinement_adds_points_around_it(problem):
    train, val = problem
    grid = l2_grid(0.1, 1e3, 5)
    refined = search_l2(train, val, 3, grid, top1, refine_steps=2, **FIT)
    assert refined.edge is None and not refined.at_edge and refined.searched == (min(grid), max(grid))
    scores = dict(refined.curve)
    peak = max(grid, key=lambda l2: (scores[l2], l2))  # the grid's best; ties keep the stronger penalty
    extra = sorted(set(scores) - set(grid))
    assert len(extra) == 4 and all(peak / 10 < l2 < peak * 10 for l2 in extra)  # quarter and eighth decades
    assert scores[refined.best.l2] == max(scores.values()) >= scores[peak]


def test_a_coarse_grid_is_extended_by_at_most_extend_decades(problem):
    """Two values 11 decades apart: the weak end is open, and the extension stops extend_decades past it (not one
    whole 11-decade grid step, to 1e-10)."""
    train, val = problem
    grid = l2_grid(31.6, 3.16e12, 2)  # the peak (near 1-10) lies below the weak end
    for decades in (4.0, 2.5):
        search = search_l2(train, val, 3, grid, top1, extend_decades=decades, **FIT)
        assert search.edge == "weak"
        assert search.searched[0] == pytest.approx(31.6 / 10 ** decades)
        assert min(l2 for l2, _ in search.curve) >= 31.6 / 10 ** decades * (1 - 1e-9)


@pytest.mark.e2e
def test_a_run_records_the_edge_and_is_not_comparable_when_the_best_may_lie_outside(tmp_path):
    run_dir = tmp_path / "run"
    code = run_main([*QUICK, "protocol=linear", "protocol.l2_min=1e4", "protocol.l2_max=1e5", "protocol.l2_steps=2",
                     "protocol.extend_decades=0", "task.limit_per_split=90", f"run.dir={run_dir}"])
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    search = results["extra"]["l2_search"]
    assert search["at_edge"] and search["edge"] is not None
    assert results["extra"]["best_l2"] in search["searched"]
    assert any("may lie outside" in r for r in results["extra"]["not_comparable"])
    assert any("may lie outside" in r for r in results["comparison"]["reasons"]) and not results["comparable"]
