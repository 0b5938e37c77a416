"""detectron2's DatasetMapper with a named, counted failure when an image cannot be read mid-run.

Every image was decoded before training (:mod:`tasks.detection.images`), so a failure here means the file
changed since. A training image is then skipped (detectron2's loader draws another) and recorded, one
JSON line per failure, in ``<OUTPUT_DIR>/unreadable_images.jsonl``, which the run counts in results.json;
a test image stops the run with a DataError naming it, since scoring without it would be silently wrong.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from detectron2.data import DatasetMapper

from transfer.errors import DataError

log = logging.getLogger(__name__)
UNREADABLE_LOG = "unreadable_images.jsonl"
READ_ERRORS = (OSError, SyntaxError)  # what Pillow raises for truncated, corrupt or vanished files


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper(cfg, is_train)``; ``record`` is the file that training-time failures are appended to."""

    def __init__(self, cfg, is_train: bool, record: Path | None = None):
        super().__init__(cfg, is_train)
        self.record = record

    def __call__(self, dataset_dict: dict):
        try:
            return super().__call__(dataset_dict)
        except READ_ERRORS as e:
            name, reason = dataset_dict.get("file_name", "?"), f"{type(e).__name__}: {e}"
            if not self.is_train:
                raise DataError(f"test image {name!r} cannot be read ({reason}); it decoded when the run started, so "
                                "it changed since. Restore the file and run again.") from None
            log.warning("skipping training image %s, which cannot be read (%s)", name, reason)
            if self.record is not None:
                with open(self.record, "a") as f:  # one short appended line per failure: safe across workers
                    f.write(json.dumps({"file": name, "error": reason}) + "\n")
            return None  # detectron2's MapDataset draws another image


def read_unreadable_log(path: Path) -> list[dict]:
    """The failures :class:`CheckedDatasetMapper` recorded (empty when there were none)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"file": "?", "error": f"unparsable record {line[:200]!r}"})
    return out
