"""detectron2 is an optional dependency: only detection runs need it, and it is not on PyPI."""
from __future__ import annotations

import importlib.util

from transfer.errors import TransferError

INSTALL_GUIDE = "https://detectron2.readthedocs.io/en/latest/tutorials/install.html"


def detectron2_available() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def require_detectron2() -> None:
    """Stop a detection run with an actionable message when detectron2 is not installed."""
    if not detectron2_available():
        raise TransferError(
            "detection tasks need detectron2, which is not installed. detectron2 is not on PyPI: build it "
            f"from source for your PyTorch version as its installation guide explains ({INSTALL_GUIDE}), "
            "then run the detection task again.")
