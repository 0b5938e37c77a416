"""The detectron2 requirement of the test session, for every test marked ``detectron2`` (detection, segmentation).

detectron2 is on no package registry. Where it is not installed, the tests that need it are skipped with the
reason. With ``TRANSFER_REQUIRE_DETECTRON2=1`` (set by ``.ci/run``) a missing or broken detectron2 stops the
session at once, and any test or module skipped for want of it fails the session. Registered by
``tests/conftest.py`` (``pytest_plugins``), so its hooks see the reports of every test, wherever it lives.
"""
from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "TRANSFER_REQUIRE_DETECTRON2"
SKIP_REASON = ("detectron2 is not installed; it is not on PyPI, build it from source "
               "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html, or offline: "
               "pip install --no-build-isolation ../shared/vendor/detectron2-*.tar.gz) to run these tests")


def _detectron2_problem() -> str | None:
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  (the compiled ops: a failed build leaves them out)
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


DETECTRON2_PROBLEM = _detectron2_problem()
if DETECTRON2_PROBLEM and os.environ.get(REQUIRE_ENV) == "1":
    raise pytest.UsageError(f"{REQUIRE_ENV}=1 (CI) but detectron2 cannot be imported ({DETECTRON2_PROBLEM}); the "
                            "detection tests would all be skipped. Build it: pip install --no-build-isolation "
                            "../shared/vendor/detectron2-*.tar.gz")
_outcomes = {"passed": 0, "failed": 0, "skipped": 0, "skipped for want of detectron2": 0}


def _missing_detectron2(report) -> bool:
    return report.outcome == "skipped" and "detectron2 is not installed" in str(report.longrepr)


def pytest_runtest_logreport(report) -> None:
    if "detectron2" in report.keywords and (report.when == "call" or report.outcome != "passed"):
        _outcomes[report.outcome] += 1
    if _missing_detectron2(report):
        _outcomes["skipped for want of detectron2"] += 1


def pytest_collectreport(report) -> None:
    # A module skipped at import (pytest.importorskip) never yields items to count.
    if _missing_detectron2(report):
        _outcomes["skipped"] += 1
        _outcomes["skipped for want of detectron2"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if any(_outcomes.values()):
        terminalreporter.write_line("detectron2 tests: " + ", ".join(f"{n} {k}" for k, n in _outcomes.items()))


def pytest_sessionfinish(session, exitstatus) -> None:
    missing = _outcomes["skipped for want of detectron2"]
    if os.environ.get(REQUIRE_ENV) == "1" and missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n{REQUIRE_ENV}=1 but {missing} detection test module(s)/test(s) were skipped for want of "
              "detectron2: failing the session.")
