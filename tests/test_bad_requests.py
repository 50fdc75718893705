"""The bad-request matrix: every kind of bad request, to every served encoder deployment,
over HTTP and gRPC. Each gets a client error (HTTP 400, gRPC INVALID_ARGUMENT) whose words
name the problem, never an ONNX Runtime trace; the server keeps serving and its memory stays
flat. (Generation's kinds: tests/test_generation.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks import catalog
from tests.helpers.client import Client, Raw
from tests.helpers.serving import SERVED_DEPLOYMENTS, SERVED_MODELS

pytestmark = pytest.mark.server

MAX_BATCH = 8  # conftest.SERVED_SHAPES
MAX_SEQ = 128
DEPLOYMENTS = SERVED_DEPLOYMENTS


def texts(*values) -> np.ndarray:
    return np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=object)


def task_of(deployment: str) -> catalog.TaskSpec:
    return catalog.TASKS[deployment.removesuffix("_steps")]


def names(deployment: str) -> tuple[str, ...]:
    return task_of(deployment).text_inputs


def good_inputs(deployment: str, first=None, count: int = 1) -> list:
    """A good request's inputs, with the first text replaced by `first` if given."""
    names = task_of(deployment).text_inputs
    found = [(n, "BYTES", texts(*["Who met whom at the zoo?"] * count), None) for n in names]
    if first is not None:
        found[0] = (names[0], "BYTES", texts(first), None)
    return found


def second_text(deployment: str, value) -> list:
    """qa: the CONTEXT replaced."""
    names = task_of(deployment).text_inputs
    return [(names[0], "BYTES", texts("Who?"), None), (names[1], "BYTES", texts(value), None)]


# kind -> (inputs for a deployment, or None where the kind does not apply; words expected)
KINDS = {
    "wrong-dtype": (
        lambda d: [
            (task_of(d).text_inputs[0], "INT32", np.array([[7]], np.int32), None),
            *good_inputs(d)[1:],
        ],
        "data-type is 'INT32', but model",
    ),
    "wrong-shape": (
        lambda d: [(n, "BYTES", texts("a", "b").reshape(1, 2), None) for n in names(d)],
        "unexpected shape for input",
    ),
    "shape-disagrees-with-data": (
        lambda d: [(n, "BYTES", texts("a"), [2, 1]) for n in names(d)],
        "expected 2 string elements",
    ),
    "empty-batch": (
        lambda d: [(n, "BYTES", np.zeros((0, 1), object), None) for n in names(d)],
        "got 0",
    ),
    "batch-over-max": (lambda d: good_inputs(d, count=MAX_BATCH + 1), f"must be <= {MAX_BATCH}"),
    "empty-string": (lambda d: good_inputs(d, ""), "is empty"),
    "whitespace-only": (lambda d: good_inputs(d, " \t\n "), "is empty (or only whitespace)"),
    "invalid-utf8": (lambda d: good_inputs(d, b"caf\xe9 \xff"), "is not UTF-8 text"),
    "nul-bytes": (lambda d: good_inputs(d, "a\x00b"), "NUL character"),
    "2mb-text": (lambda d: good_inputs(d, "word " * 420_000), "at most 1048576 bytes"),
    "missing-input": (lambda d: good_inputs(d)[1:], "expected"),
    "unknown-input": (
        lambda d: [*good_inputs(d), ("TEXTS", "BYTES", texts("x"), None)],
        "TEXTS",  # Triton names the input it does not know
    ),
    "qa-empty-context": (
        lambda d: second_text(d, "") if len(names(d)) == 2 else None,
        "CONTEXT[0] is empty",
    ),
}


def token_inputs(names: list[str], ids: list[int], dtype="INT64") -> list:
    """The model's token tensors (`names`, from its metadata) for one row of `ids`."""
    array = np.array([ids], dtype=np.int64 if dtype == "INT64" else np.int32)
    values = {"input_ids": array, "attention_mask": np.ones_like(array)}
    return [(n, dtype, values.get(n, np.zeros_like(array)), None) for n in names]


# Straight to <task>_steps_model, past the tokenizer: ids a tokenizer would never make.
MODEL_KINDS = {
    "out-of-vocabulary-id": (([1, 10**6, 2],), "outside the vocabulary of"),
    "negative-id": (([1, -3, 2],), "outside the vocabulary of"),
    "more-tokens-than-max-seq": (([1] * (MAX_SEQ + 50),), f"at most {MAX_SEQ} tokens"),
    "ids-wrong-dtype": (([1, 2], "INT32"), "data-type is 'INT32'"),
}
GOOD_IDS = [1, 5, 2]


def input_names(server, model: str) -> list[str]:
    with Client(server) as client:
        return client.input_names(model)


def send(server, protocol: str, model: str, inputs: list) -> tuple[str | None, str]:
    """(None, '') on success, else (the status, the message)."""
    with Client(server, protocol) as client:
        return client.refusal(model, [(n, Raw(t, a, shape)) for n, t, a, shape in inputs])


def client_error(protocol: str, status: str | None) -> bool:
    return status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")


def resident_kib(server) -> int:
    """The server's and its stubs' resident memory."""
    from tasks.server import stub_pids

    total = 0
    for pid in [server.pid, *stub_pids(server.shm_prefix)]:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(status.split("VmRSS:")[1].split()[0])
    return total


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_each_bad_request_gets_a_client_error_in_words_and_the_server_serves_on(
    served, deployment, protocol
):
    _, server = served
    assert send(server, protocol, deployment, good_inputs(deployment)) == (None, "")
    problems = []
    for kind, (make, words) in KINDS.items():
        inputs = make(deployment)
        if inputs is None:
            continue
        status, message = send(server, protocol, deployment, inputs)
        if not client_error(protocol, status) or words not in message:
            problems.append(f"{kind}: {status} {message[:300]!r} (wanted {words!r})")
        if "ONNXRuntimeError" in message or "Traceback" in message:
            problems.append(f"{kind}: an internal trace reached the client: {message[:300]!r}")
    assert problems == []
    assert send(server, protocol, deployment, good_inputs(deployment)) == (None, "")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("task", list(SERVED_MODELS))
def test_direct_model_requests_with_ids_no_tokenizer_makes_are_refused_naming_the_limit(
    served, task, protocol
):
    _, server = served
    model = f"{task}_steps_model"
    names = input_names(server, model)
    problems = []
    for kind, (args, words) in MODEL_KINDS.items():
        status, message = send(server, protocol, model, token_inputs(names, *args))
        if not client_error(protocol, status) or words not in message:
            problems.append(f"{kind}: {status} {message[:300]!r} (wanted {words!r})")
    assert problems == []
    assert send(server, protocol, model, token_inputs(names, GOOD_IDS)) == (None, "")


def test_the_matrix_leaves_the_server_ready_and_its_memory_flat(served):
    """The whole matrix, over and over: no model falls over, and resident memory (server and
    stubs) grows by less than 10% once warm."""
    from tasks.server import http_ready

    _, server = served

    def matrix() -> None:
        for deployment in DEPLOYMENTS:
            for make, _ in KINDS.values():
                if (inputs := make(deployment)) is not None:
                    send(server, "grpc", deployment, inputs)
        for task in SERVED_MODELS:
            model = f"{task}_steps_model"
            for args, _ in MODEL_KINDS.values():
                send(server, "http", model, token_inputs(input_names(server, model), *args))

    matrix()  # warm up: allocators and caches settle
    warm = resident_kib(server)
    for _ in range(3):
        matrix()
    assert resident_kib(server) < 1.1 * warm
    assert http_ready(server.http_url)
    for deployment in DEPLOYMENTS:
        assert http_ready(server.http_url, deployment), deployment
        assert send(server, "http", deployment, good_inputs(deployment)) == (None, "")
