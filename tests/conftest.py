"""Shared test settings: no network, no W&B account, caches inside the test's own folders."""
from __future__ import annotations

from pathlib import Path

import pytest

# Tests marked `detectron2` anywhere: skipped with the reason where it is missing, failures under
# TRANSFER_REQUIRE_DETECTRON2=1 (tests/needs_detectron2.py).
pytest_plugins = ["needs_detectron2"]

UNREACHABLE = "http://unreachable.invalid"  # never resolves: downloads fail fast on every machine
CHECKOUT_RUNS = Path(__file__).resolve().parent.parent / "runs"  # run.root's default, seen from the checkout


def _files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _checkout_runs_untouched():
    """No test may write into the checkout's runs/ (run folders, feature or scan caches): fail the session if one
    did, naming what appeared."""
    before = _files_under(CHECKOUT_RUNS)
    yield
    new = sorted(_files_under(CHECKOUT_RUNS) - before)
    if new:
        pytest.fail(f"tests wrote into the checkout's {CHECKOUT_RUNS}: {[str(p) for p in new[:5]]} "
                    f"({len(new)} new paths); pass run.root / run.dir / run.cache_dir under tmp_path")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home / "wandb"))
    monkeypatch.delenv("TRANSFER_RUN_DIR", raising=False)
    # run.root (and the caches under it) default to ./runs: a test that names neither run.root nor run.cache_dir
    # writes into a folder of its own, never into the checkout it was started from.
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def tiny_entries(monkeypatch):
    """The tiny registry entries of tests/tiny_networks.py (``tiny_rs``, ``tiny_resnet``), registered for this test
    only: for tests of the weights loader and the builder's plumbing, whose subject is not the network's size."""
    from tiny_networks import register_tiny_entries  # imported on use: torch and timm are not needed to collect

    return register_tiny_entries(monkeypatch)
