"""What the command-line entry points print: one logging set-up, so that every line appears once.

Lightning, the Hugging Face Hub client and ``datasets`` attach their own console handler to their root logger
when imported, and leave it propagating: once the root logger prints too (``logging.basicConfig``), each of their
lines would appear twice ("INFO: GPU available: False" and "GPU available: False"). Their loggers keep their own
handler and stop propagating; this works whether or not they are imported yet.
"""
from __future__ import annotations

import logging

OWN_HANDLERS = ("lightning", "lightning_fabric", "pytorch_lightning", "huggingface_hub", "datasets")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain ``message`` lines at ``level`` on stderr; the libraries above print theirs once, through their own
    handler."""
    logging.basicConfig(level=level, format="%(message)s")
    for name in OWN_HANDLERS:
        logging.getLogger(name).propagate = False
