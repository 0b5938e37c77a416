"""bench/bench_classification.py runs end to end on tiny inputs and prints every figure."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_classification.py"


@pytest.mark.e2e
def test_bench_prints_the_three_ratios(capsys):
    main = runpy.run_path(str(BENCH))["main"]
    main(["--images", "20", "--size", "16", "--resolution", "32", "--batch", "4", "--workers", "0", "--steps", "2"])
    out = capsys.readouterr().out
    for row in ("ratio end-to-end / bare", "ratio probe / extraction", "ratio loader-fed / resident"):
        line = next(line for line in out.splitlines() if row in line)
        assert float(line.split("|")[2]) > 0
    assert "command: python bench/bench_classification.py --images 20" in out
