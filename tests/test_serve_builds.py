"""`doit serve` lets go of the tree once its server is up: other doit runs read and build
meanwhile, and the running server loads what they change in models/ without a restart."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers.client import Client
from tests.helpers.project import copy_project
from tests.helpers.serving import SERVED_SHAPES, doit_serve

pytestmark = [pytest.mark.server, pytest.mark.slow]


def wait_for(log_path, words: str, process, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while words not in (output := log_path.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, output
        time.sleep(0.2)
    return output


def max_batch_size(server, model: str) -> int:
    with Client(server) as client:
        return int(client.client.get_model_config(model)["max_batch_size"])


def test_while_serve_serves_others_read_build_and_are_served(tmp_path):
    project = copy_project(tmp_path / "project")  # its own: the build adds to models/
    project.doit("task=encode", *SERVED_SHAPES)
    log_path = tmp_path / "serve.log"
    serving, server, variables = doit_serve(project, log_path, "task=encode", *SERVED_SHAPES)
    try:
        assert "other doit runs may build here now" in log_path.read_text()
        # what only reads, and what writes beside models/, runs while it serves
        assert "repo:encode_model" in project.doit("list", "--all").output
        assert (
            "models/encode_model/config.pbtxt" in project.doit("info", "repo:encode_model").output
        )
        project.doit("graph", "task=encode", *SERVED_SHAPES)
        bench = project.doit(
            "bench",
            "task=encode",
            *SERVED_SHAPES,
            *variables,
            "seconds=0.3",
            "concurrency=1",
            "openai_port=0",
        )
        assert "reus" in bench.output.lower(), bench.output  # the running server, not its own
        # a second deployment, built meanwhile, is answered with no restart
        project.doit("task=encode", "name=encode2", *SERVED_SHAPES)
        wait_for(log_path, "watch: 'encode2' version 1 loaded", serving, timeout=60)
        with Client(server) as client:
            assert client.infer("encode2", {"TEXT": ["hello"]})["EMBEDDING"].shape == (1, 384)
        assert max_batch_size(server, "encode2") == 8
        # rebuilt with another batch profile, it answers as its new version
        project.doit("task=encode", "name=encode2", "batch=1,4,16", "seq=1,64,128")
        deadline = time.monotonic() + 60
        while max_batch_size(server, "encode2") != 16:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        with Client(server, "grpc") as client:
            assert client.infer("encode2", {"TEXT": ["a", "b"]})["EMBEDDING"].shape == (2, 384)
        assert serving.poll() is None  # never restarted
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(60)
    # what serve recorded at its start did not overwrite the builds' records
    assert (
        project.doit("task=encode", "name=encode2", "batch=1,4,16", "seq=1,64,128").executed == []
    )
