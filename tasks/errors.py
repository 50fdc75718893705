"""A small error hierarchy with messages written for people.

Every message names what is wrong and how to fix it. Stage actions are wrapped by
`fails_cleanly`, which turns these errors into a one-line doit failure instead of a traceback.
"""

from __future__ import annotations

import errno
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


DISK_FULL = "No space left on device"


def disk_full_message(err: BaseException) -> str | None:
    """Our one line for a write that ran out of disk (or quota), wherever it was raised."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
    elif DISK_FULL in str(err):  # raised by a library as its own exception type
        where = ""
    else:
        return None
    return (
        f"DiskFull: no space left on the device{where}. Nothing half-written was kept "
        "(each target is written aside and renamed into place only when complete): free "
        "space (df -h models model_zoo) and run doit again"
    )


def fails_cleanly(action: Callable) -> Callable:
    """Wrap a doit python-action so a BuildError, or a full disk, ends the task with its
    message only."""

    @functools.wraps(action)
    def run(*args, **kwargs):
        from doit.exceptions import TaskFailed

        try:
            result = action(*args, **kwargs)
        except BuildError as err:
            return TaskFailed(f"{type(err).__name__}: {err}")
        except Exception as err:
            message = disk_full_message(err)
            if message is None:
                raise
            return TaskFailed(message)
        return result if result is not None else True

    return run
