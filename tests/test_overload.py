"""Bounded queues against a real tritonserver: a burst beyond capacity is rejected at once
(UNAVAILABLE, HTTP 503) instead of queueing without limit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.helpers.client import Client
from tests.helpers.project import copy_project

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    from tasks.server import EmbeddedTritonServer

    project = copy_project(tmp_path_factory.mktemp("overload") / "project")
    project.doit("task=encode", "batch=1,2,4", "seq=1,16,64", "max_queue=1")
    config = (project.root / "models/encode_model/config.pbtxt").read_text()
    assert "max_queue_size: 1\n" in config and "default_queue_policy {" in config
    with EmbeddedTritonServer(project.root / "models", quiet=True) as server:
        yield server


def burst(server, clients: int, protocol: str) -> tuple[list, list]:
    """`clients` requests at once; (latencies of answers, (status, message, latency) of
    failures)."""
    from tritonclient.utils import InferenceServerException

    answered, failed, lock = [], [], threading.Lock()
    start = threading.Barrier(clients)

    def one() -> None:
        with Client(server, protocol) as client:
            start.wait()
            began = time.perf_counter()
            try:
                client.infer("encode", {"TEXT": ["a sentence of some length " * 8]})
                with lock:
                    answered.append(time.perf_counter() - began)
            except InferenceServerException as err:
                with lock:
                    failed.append((str(err.status()), err.message(), time.perf_counter() - began))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered, failed


@pytest.mark.parametrize(("protocol", "status"), [("grpc", "UNAVAILABLE"), ("http", "503")])
def test_a_burst_beyond_the_queue_is_rejected_at_once_and_the_rest_answered(
    bounded, protocol, status
):
    answered, failed = burst(bounded, 24, protocol)
    assert answered, "the accepted requests must be answered"
    assert failed, "a queue of 1 cannot hold a burst of 24"
    assert all(
        status in code and "Exceeds maximum queue size" in message for code, message, _ in failed
    )
    # a rejection is answered faster than the slowest accepted request waits
    assert np.median([seconds for _, _, seconds in failed]) < max(answered)
    again, none = burst(bounded, 1, protocol)  # and the server keeps serving
    assert len(again) == 1 and not none


def test_at_four_times_capacity_accepted_requests_keep_their_latency_and_the_rest_fail_fast(
    bounded,
):
    """Closed loop, as `doit bench` measures: at 4x the concurrency of capacity, the accepted
    requests wait within 2x the p99 at capacity, and rejections come faster than answers."""
    from tasks.loadgen import closed_loop

    text = {"TEXT": ["a sentence of some length " * 8]}

    def setup(state: dict) -> None:
        state["client"] = Client(bounded, "grpc")
        state["close"] = state["client"].close

    def work(state: dict, _text) -> bool:
        return state["client"].infer("encode", text)["EMBEDDING"] is not None

    closed_loop(work, 2, 1.0, [()], setup)  # warm up
    capacity = closed_loop(work, 2, 3.0, [()], setup)  # the batch max is 4: 2 clients fill it
    overload = closed_loop(work, 8, 3.0, [()], setup)
    assert capacity["errors"] == 0 and overload["errors"] == 0  # rejections are counted apart
    assert overload["rejected"] > 0 and overload["requests"] > 0
    assert overload["p99_ms"] <= 2 * capacity["p99_ms"], (capacity, overload)
    assert overload["reject_p50_ms"] < overload["p50_ms"], overload
