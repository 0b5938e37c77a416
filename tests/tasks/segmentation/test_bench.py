"""bench/bench_segmentation.py runs both arms on one batch and prints finite losses and their ratio."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from suite_helpers import REPO

pytestmark = pytest.mark.detectron2  # skipped with the reason without it; a failure under TRANSFER_REQUIRE_DETECTRON2=1
pytest.importorskip("detectron2", reason="detectron2 is not installed; the segmentation bench compares against "
                    "its R-50")


@pytest.mark.e2e
def test_bench_prints_both_arms_and_their_ratio():
    out = subprocess.run([sys.executable, "bench/bench_segmentation.py", "--size", "64", "--steps", "1", "--warmup",
                          "0", "--classes", "5", "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    arms = re.findall(r"^\s+(rs50|detectron2 R-50): +([\d.]+) ms/iter .* loss ([\d.]+) -> ([\d.]+)", out.stdout, re.M)
    assert [a[0] for a in arms] == ["rs50", "detectron2 R-50"], out.stdout
    assert all(float(a[1]) > 0 and float(a[2]) > 0 for a in arms)
    assert "NOT FINITE" not in out.stdout and re.search(r"ratio rs50 / detectron2 R-50: [\d.]+x", out.stdout)
