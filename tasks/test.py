"""Stage `test`: the test suite (pytest, ruff included), as CI runs it: `suite=lean` (the
default) leaves out the tests marked slow, `suite=slow` runs only those, `suite=all` both."""

from __future__ import annotations

import shlex
import sys

from tasks import paths
from tasks.settings import command_line
from tasks.variables import VARIABLES

MARKS = {"lean": "not slow", "slow": "slow", "all": ""}


def task_test():
    """Run the tests: unit, real builds, a real tritonserver, lint (pytest -q; suite=all)."""
    suite = VARIABLES["suite"].read(command_line())
    marks = shlex.quote(MARKS[suite])
    return {
        "actions": [f"{sys.executable} -m pytest -q -m {marks} {paths.TESTS_DIR}"],
        "uptodate": [False],
        "verbosity": 2,
    }
