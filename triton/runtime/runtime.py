"""Helpers every python-backend model shares, shipped as `runtime.py` beside each `model.py`
(tasks/repo.py), as encoding.py and decoding.py are.

- `load`: a sibling module (encoding.py, decoding.py, answer.py) loaded by path;
- `model_args`: what Triton hands `initialize`, parsed;
- `Parameters`: a model's config.pbtxt parameters read as typed values, one message when
  one is missing or bad;
- `bad_request` / `failed`: a request's error response, the client's fault or the server's;
- `softmax`: probabilities from scores, stable for large ones;
- `session_options`: ONNX Runtime's options for a step: its threads, whether they spin, and
  whether they stop as a call returns (sessions taking turns);
- `keep_heap`: glibc's malloc told to reuse large blocks, not map and unmap them at every
  call (each session's process does this once).

Imports only the standard library and numpy, Triton's utilities only when a response is made
and ONNX Runtime only when a session is, so the build and the tests load this file as it is.
A model.py loads it by path under `MODULE` (its siblings import it by that name:
`from llm_in_triton_runtime import softmax`); the build does the same (tasks/artifacts.py
`load_runtime`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

PREFIX = "llm_in_triton_"  # runtime code is no package: its modules are loaded by path
MODULE = f"{PREFIX}runtime"  # the name this module is registered and imported by


def load(directory: Path, name: str):
    """`<directory>/<name>.py`, registered as `llm_in_triton_<name>` so that a generic name
    (encoding, answer) neither shadows nor is shadowed by an installed module."""
    spec = importlib.util.spec_from_file_location(f"{PREFIX}{name}", Path(directory) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before it runs: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class ConfigError(ValueError):
    """A model's config.pbtxt lacks a parameter it reads, or holds a bad one."""


_REQUIRED = object()
_KIND_NAMES = {str: "text", int: "an integer", float: "a number", json.loads: "JSON"}


class Parameters:
    """The `parameters` of a model's config.pbtxt (all strings there), read as typed values."""

    def __init__(self, values: dict[str, str], model: str) -> None:
        self.values, self.model = dict(values), model

    @classmethod
    def of(cls, config: dict) -> Parameters:
        """From the model config Triton hands `initialize` (args["model_config"], parsed)."""
        values = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        return cls(values, config.get("name", "?"))

    def read(self, key: str, kind=str, default=_REQUIRED):
        """`kind(value)` of parameter `key` (kind: str, int, float, json.loads...), or
        `default` when the config has no such parameter; a missing or bad one is a
        ConfigError that names it and the fix."""
        if key not in self.values:
            if default is not _REQUIRED:
                return default
            raise ConfigError(
                f"model '{self.model}': config.pbtxt has no parameter '{key}'; rebuild the "
                "repository with doit (the pbtxt stage writes every parameter a model reads)"
            )
        value = self.values[key]
        try:
            return kind(value)
        except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            wanted = _KIND_NAMES.get(kind, getattr(kind, "__name__", repr(kind)))
            raise ConfigError(
                f"model '{self.model}': parameter '{key}' is {value!r}, not {wanted} ({err}); "
                "rebuild the repository with doit, or fix the value in config.pbtxt"
            ) from None


def model_args(args: dict) -> tuple[dict, Parameters, Path]:
    """The model config, its parameters and the version folder, from `initialize(args)`."""
    config = json.loads(args["model_config"])
    return config, Parameters.of(config), Path(args["model_repository"]) / args["model_version"]


def bad_request(message: str):
    """The response refusing a bad request: a client error (HTTP 400, gRPC INVALID_ARGUMENT)
    on servers whose TritonError has codes, not a server failure."""
    import triton_python_backend_utils as pb_utils

    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    args = (message,) if code is None else (message, code)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(*args))


def outside_vocabulary(ids: np.ndarray, vocab_size: int) -> str | None:
    """Why token ids cannot be run, in words, when one lies outside the vocabulary of
    `vocab_size` tokens (0: unknown, unchecked); else None. An encoder step and the decoding
    loop's door refuse such a request, which would otherwise fail ONNX Runtime's Gather."""
    if not vocab_size or ids.size == 0 or (ids.min() >= 0 and ids.max() < vocab_size):
        return None
    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
    return (
        f"input_ids holds {bad}, outside the vocabulary of {vocab_size} tokens "
        f"(0 to {vocab_size - 1}): send ids from this model's tokenizer"
    )


def failed(message: str):
    """The response of a request the server failed (ONNX Runtime, an answer step): HTTP 500."""
    import triton_python_backend_utils as pb_utils

    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def softmax(values, axis: int = -1) -> np.ndarray:
    """Probabilities from scores along `axis`, in float64; the largest score is subtracted
    first, so large scores do not overflow, and a -inf score gets 0."""
    values = np.asarray(values, dtype=np.float64)
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def session_options(threads: int, spinning: int | str, taking_turns: bool = False):
    """ONNX Runtime's session options: `threads` intra-op threads (0: its own choice), which
    spin between calls when `spinning` is 1 (its default) or sleep when it is 0.

    `taking_turns`: the session is one of several that run one after another in this process
    (a decoding loop's prefill and step): its threads stop spinning as each call returns.
    Otherwise each session's threads spin on through the others' calls, on the cores those
    need: the in-flight loop at 16 rows ran 1.6x the tokens/s with this (AMD EPYC, 2 cores)."""
    import onnxruntime as ort

    keep_heap()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", str(spinning))
    if taking_turns:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


# glibc's mallopt parameters, and what keep_heap sets them to
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit): blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory above this at the heap's top goes back to the system


@functools.cache  # once per process
def keep_heap() -> bool:
    """Have glibc's malloc reuse freed blocks of up to 32 MiB, not map them fresh each time.

    A session's outputs are new numpy arrays at every call: at 16 rows, a decoding step's
    cache is 16 arrays of about 1 MiB. Above 128 KiB glibc maps such blocks from the system
    and unmaps them when freed (its threshold adapts, but its heaps are still trimmed), so
    every step faulted its cache's pages in anew: 44,000 page faults a second in the stream
    model at 16 streams, and 27% more tokens/s without them (AMD EPYC, 2 cores). Process-wide.
    True when glibc took both settings; False where the C library has no mallopt (musl, macOS:
    nothing changes) or refused one. Another allocator preloaded (jemalloc, tcmalloc) may
    answer True and ignore them."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mapped = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and mapped
