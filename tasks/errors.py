"""A small error hierarchy with messages written for people.

Every message names what is wrong and how to fix it. Stage actions are wrapped by
`fails_cleanly`, which turns these errors into a one-line doit failure instead of a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


class BuildError(Exception):
    """A build step cannot go on; the message says why and what to do."""


class SettingsError(BuildError):
    """A command-line variable is invalid."""


class ModelSourceError(BuildError):
    """The model cannot be found, fetched or used for the task."""


class ExportError(BuildError):
    """The ONNX export or an ONNX file is broken."""


class TensorRTError(BuildError):
    """TensorRT is missing or the engine cannot be built."""


class ParityError(BuildError):
    """The exported model does not match the PyTorch reference."""


class ConfigError(BuildError):
    """A rendered config.pbtxt is invalid or its ensemble wiring is broken."""


class ServerError(BuildError):
    """The embedded tritonserver is missing, cannot start, or a model fails to load."""


def fails_cleanly(action: Callable) -> Callable:
    """Wrap a doit python-action so a BuildError ends the task with its message only."""

    @functools.wraps(action)
    def run(*args, **kwargs):
        from doit.exceptions import TaskFailed

        try:
            result = action(*args, **kwargs)
        except BuildError as err:
            return TaskFailed(f"{type(err).__name__}: {err}")
        return result if result is not None else True

    return run
