"""Stage `test`: the test suite (pytest, ruff included), as CI runs it."""

from __future__ import annotations

import sys

from tasks import paths


def task_test():
    """Run the tests: unit, real builds, a real tritonserver, lint (pytest -q)."""
    return {
        "actions": [f"{sys.executable} -m pytest -q {paths.TESTS_DIR}"],
        "uptodate": [False],
        "verbosity": 2,
    }
