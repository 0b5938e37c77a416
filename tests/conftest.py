"""Shared test settings: no network, no W&B account, caches inside the test's own folders."""
from __future__ import annotations

import pytest

UNREACHABLE = "http://unreachable.invalid"  # never resolves: downloads fail fast on every machine


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(home / "wandb"))
    monkeypatch.delenv("TRANSFER_RUN_DIR", raising=False)
