"""Shared test settings: no network, no W&B account, caches inside the test's own folders, and the share of the
cores each pytest-xdist worker (``-n auto``, the README's test command) may use."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def _cpus() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# In an xdist worker (set before this file is imported, so before torch, numpy and OpenBLAS start their thread
# pools), each worker gets its share of the cores instead of a thread per core each (two workers on two cores
# would run four busy threads; tests/tasks/detection/conftest.py measured one thread faster on shared cores). The
# variables reach the processes tests start too (python -m transfer.run; Lightning's DDP keeps an OMP_NUM_THREADS
# it finds). A value already set is kept.
UNREACHABLE = "http://unreachable.invalid"  # never resolves: downloads fail fast on every machine
# huggingface_hub and datasets read the endpoint once, when a test module first imports them (before any fixture
# runs): set it here so in-process code never sees the real Hub either; _isolated_env sets it again for each test.
os.environ["HF_ENDPOINT"] = UNREACHABLE

XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if XDIST_WORKERS:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _cpus() // XDIST_WORKERS)))

import torch  # noqa: E402  (after the thread settings above)

if XDIST_WORKERS:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# `-n auto`: one worker per core, at most MAX_WORKERS, and no more than the machine's memory holds at GIB_PER_WORKER
# each. A worker's peak is its largest test with the processes it starts: measured with -n 2 -m e2e (proportional
# set size, shared pages split), 6.2 GiB at most, a DDP fine-tune (two ranks beside their launcher); non-e2e
# workers peaked at 2.6 GB (largest process, RSS). Past 8 workers the longest test files and each worker's
# start-up bound the time, not the cores. PYTEST_XDIST_AUTO_NUM_WORKERS=N, or -n N, chooses for yourself; -n 0 runs
# in this one process.
MAX_WORKERS = 8
GIB_PER_WORKER = 6


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist it is never called
def pytest_xdist_auto_num_workers(config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own rule reads it
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(_cpus(), MAX_WORKERS, int(memory_gib // GIB_PER_WORKER)))

# Tests marked `detectron2` anywhere: skipped with the reason where it is missing, failures under
# TRANSFER_REQUIRE_DETECTRON2=1 (tests/needs_detectron2.py).
pytest_plugins = ["needs_detectron2"]

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
    datasets = sys.modules.get("datasets")
    if datasets is not None:  # it read HF_HOME when a test module imported it, before any test: its parquet
        # conversions went to ~/.cache/huggingface/datasets, shared by every process (xdist workers included)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "hf" / "datasets")
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
