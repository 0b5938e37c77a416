"""Tiny NYU Depth v2 copies in the real layouts (writers in tests/nyu_export.py), as fixtures of this folder."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from nyu_export import FAST, frame, write_mat_release, write_png_export


@pytest.fixture(scope="session")
def png_root(tmp_path_factory) -> Path:
    return write_png_export(tmp_path_factory.mktemp("nyu_png"))


@pytest.fixture(scope="session")
def nyu():
    """This folder's writers and settings (test modules cannot import a conftest by name in importlib mode)."""
    return SimpleNamespace(frame=frame, write_png_export=write_png_export, write_mat_release=write_mat_release,
                           FAST=list(FAST))
