"""Lock the doors: no client without the admin secret loads code, unloads a model, registers
shared memory or changes trace and log settings; with an API key set, none infers without it.
Against the real tritonserver of the wheel and real nginx (triton/supervisor/access.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from tasks import paths
from tasks.server import EmbeddedTritonServer, ReplicaSet, access, free_port, make_server
from tasks.settings import Endpoints
from tests.helpers.client import Client
from tests.helpers.serving import SERVED_SHAPES, doit_serve, needs_nginx

pytestmark = pytest.mark.server
EVIL_CODE = """\
import pathlib

pathlib.Path({marker!r}).write_text("the attacker's code ran")


class TritonPythonModel:
    def execute(self, requests):
        return []
"""
EVIL_CONFIG = {
    "name": "evil",
    "backend": "python",
    "max_batch_size": 0,
    "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}],
}
REFUSED = {"http": "403", "grpc": "StatusCode.UNAVAILABLE"}  # Triton's restricted-API answers
VALUE = np.array([[1.0, 2.0]], dtype=np.float32)


def attack(client: Client, marker: Path, headers: dict | None = None) -> None:
    """The request of the issue: load a python model whose file override carries code."""
    code = EVIL_CODE.format(marker=str(marker)).encode()
    client.client.load_model(
        "evil", config=json.dumps(EVIL_CONFIG), files={"file:1/model.py": code}, headers=headers
    )


def refusal(call) -> str:
    """The status of the error `call()` raises (it must raise)."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status())


def ready_models(server) -> set[str]:
    with Client(server) as client:
        index = client.client.get_model_repository_index(headers=server.admin_headers)
    return {m["name"] for m in index if m.get("state") == "READY"}


@pytest.fixture(scope="module")
def locked(identity_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("locked") / "tritonserver.log"
    with EmbeddedTritonServer(identity_repo, log_file=log, quiet=True) as server:
        yield server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_anonymous_attack_is_refused_and_no_code_runs(locked, protocol, tmp_path):
    marker = tmp_path / "ran"
    with Client(locked, protocol) as client:
        assert refusal(lambda: attack(client, marker)) == REFUSED[protocol]
        assert refusal(lambda: client.client.unload_model("identity")) == REFUSED[protocol]
        np.testing.assert_array_equal(client.infer("identity", {"INPUT0": VALUE})["OUTPUT0"], VALUE)
    time.sleep(0.5)  # a load that ran would have written it by now
    assert not marker.exists()
    assert ready_models(locked) == {"identity"}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_admin_protocol_needs_the_secret_and_works_with_it(locked, protocol):
    name = f"llm_access_{os.getpid()}_{protocol}"
    region = shared_memory.SharedMemory(name=name, create=True, size=64)
    key = f"/{region.name}"
    admin = access().client_headers(protocol, admin=locked.admin_key)
    with Client(locked, protocol) as client:
        calls = {
            "unload": lambda h: client.client.unload_model("identity", headers=h),
            "load": lambda h: client.client.load_model("identity", headers=h),
            "register shared memory": lambda h: client.client.register_system_shared_memory(
                "region", key, 64, headers=h
            ),
            "unregister shared memory": lambda h: (
                client.client.unregister_system_shared_memory("region", headers=h)
            ),
            "trace settings": lambda h: client.client.get_trace_settings(headers=h),
            "log settings": lambda h: client.client.update_log_settings(
                {"log_verbose_level": 0}, headers=h
            ),
        }
        try:
            for name, call in calls.items():
                assert refusal(lambda call=call: call(None)) == REFUSED[protocol], name
                call(admin)  # as before the doors were locked
        finally:
            region.close()
            region.unlink()
    assert ready_models(locked) == {"identity"}


def test_with_the_secret_the_same_load_runs_its_code(identity_repo, tmp_path):
    """The attack is real: the admin secret's holder can load code, so nobody else may."""
    marker = tmp_path / "ran"
    log = tmp_path / "tritonserver.log"
    with EmbeddedTritonServer(identity_repo, log_file=log, quiet=True) as server:
        with Client(server) as client:
            attack(client, marker, headers=server.admin_headers)
        assert marker.read_text() == "the attacker's code ran"


def test_a_server_whose_secret_did_not_take_is_refused(identity_repo, tmp_path):
    """verify() is what stops a server started with its placeholder as the secret."""
    log = tmp_path / "tritonserver.log"
    placeholder = access().PLACEHOLDERS["admin"]
    with (
        EmbeddedTritonServer(identity_repo, log_file=log, quiet=True) as server,
        pytest.raises(access().AccessError, match="does not guard model control"),
    ):
        access().verify(server.http_url, placeholder)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_with_an_api_key_inference_needs_it(identity_repo, tmp_path, protocol):
    log = tmp_path / "tritonserver.log"
    with EmbeddedTritonServer(identity_repo, log_file=log, quiet=True, api_key="k3y-42") as server:
        with Client(server, protocol) as anonymous:
            status = refusal(lambda: anonymous.infer("identity", {"INPUT0": VALUE}))
            assert status == REFUSED[protocol]
            assert anonymous.client.is_model_ready("identity")  # health and metadata stay open
        with Client(server, protocol) as client:
            access().authorize(client.client, protocol, api_key="k3y-42")
            out = client.infer("identity", {"INPUT0": VALUE})["OUTPUT0"]
        np.testing.assert_array_equal(out, VALUE)


ECHO_MODEL = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("ECHO", pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy())]
            )
            for r in requests
        ]
"""
ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 8
input [{ name: "TEXT" data_type: TYPE_STRING dims: [1] }]
output [{ name: "ECHO" data_type: TYPE_STRING dims: [1] }]
"""


def test_send_request_sends_the_api_key_from_the_environment(tmp_path):
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    key_file = access().write_secret(tmp_path / "api-key", "from-a-file")
    log = tmp_path / "tritonserver.log"
    with EmbeddedTritonServer(repo, log_file=log, quiet=True, api_key="from-a-file") as server:
        for protocol, environment in [
            ("http", {}),
            ("http", {access().API_KEY_FILE_VARIABLE: str(key_file)}),
            ("grpc", {access().API_KEY_VARIABLE: "from-a-file"}),
        ]:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            command = [sys.executable, str(paths.CLIENT), "--protocol", protocol, "-u", url]
            run = subprocess.run(
                [*command, "-m", "echo", "-t", "héllo"],
                env={k: v for k, v in os.environ.items() if "API_KEY" not in k} | environment,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            if environment:
                assert run.returncode == 0 and "[0] 'héllo'" in run.stdout, run
            else:
                assert run.returncode == 1 and "expecting header 'api-key'" in run.stderr, run


# --- nginx in front ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fronted(identity_repo, tmp_path_factory):
    """One server behind nginx, as `doit serve host=0.0.0.0` runs it."""
    folder = tmp_path_factory.mktemp("fronted")
    lines: list[str] = []

    def replica(index: int, ports: dict | None) -> EmbeddedTritonServer:
        ports = ports or {}
        return EmbeddedTritonServer(
            identity_repo,
            **{f"{kind}_port": port for kind, port in ports.items()},
            log_file=folder / "tritonserver.log",
            admin_key_file=folder / "admin-key",
            quiet=True,
        )

    http, grpc = free_port(), free_port()
    with_nginx = ReplicaSet(1, replica, "127.0.0.1", http, grpc, 1, log=lines.append)
    with_nginx.start()
    try:
        yield with_nginx, lines
    finally:
        with_nginx.stop()


@needs_nginx
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_behind_nginx_the_attack_is_refused_even_with_the_secret(fronted, protocol, tmp_path):
    balancer, _ = fronted
    replica = balancer.members[0]
    marker = tmp_path / "ran"
    admin = access().client_headers(protocol, admin=replica.admin_key)
    expected = {"http": "403", "grpc": "StatusCode.PERMISSION_DENIED"}[protocol]
    with Client(balancer, protocol) as client:
        for h in (None, admin):
            assert refusal(lambda h=h: attack(client, marker, h)) == expected
            assert (
                refusal(lambda h=h: client.client.unload_model("identity", headers=h)) == expected
            )
            assert refusal(lambda h=h: client.client.get_log_settings(headers=h)) == expected
        np.testing.assert_array_equal(client.infer("identity", {"INPUT0": VALUE})["OUTPUT0"], VALUE)
    time.sleep(0.5)
    assert not marker.exists()
    assert ready_models(replica) == {"identity"}


@needs_nginx
def test_nginx_says_why_it_is_there_and_refuses_an_encoded_admin_path(fronted):
    import urllib.error
    import urllib.request

    balancer, lines = fronted
    assert any("faces a network" in line and "refuses the admin paths" in line for line in lines)
    for path in ("/v2/%72epository/index", "//v2/repository/index", "/V2/REPOSITORY/INDEX"):
        request = urllib.request.Request(f"http://{balancer.http_url}{path}", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 403, path


class RecordingUpstream:
    """A plain TCP server standing where a replica would: it keeps each request's head and
    answers 200, so the test sees exactly what nginx passes on."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.port = self.socket.getsockname()[1]
        self.heads: list[str] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                self.heads.append(data.split(b"\r\n\r\n")[0].decode())
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                )


@needs_nginx
def test_nginx_passes_no_body_on_chunked_and_bounds_its_size():
    from tasks.server import NginxBalancer

    upstream = RecordingUpstream()
    address = f"127.0.0.1:{upstream.port}"
    balancer = NginxBalancer(
        "127.0.0.1", free_port(), free_port(), [{"http": address, "grpc": address}], 1
    ).start()
    try:
        chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        head = b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        with socket.create_connection(("127.0.0.1", balancer.ports["http"])) as client:
            client.sendall(head + chunks)
            assert client.recv(100).startswith(b"HTTP/1.1 200")
        passed = upstream.heads[-1].lower()
        assert "transfer-encoding" not in passed and "content-length: 11" in passed, passed
        too_big = b"x" * (1024 * 1024 + 1)
        with socket.create_connection(("127.0.0.1", balancer.ports["http"])) as client:
            client.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n")
            client.sendall(f"Content-Length: {len(too_big)}\r\n\r\n".encode())
            assert client.recv(100).startswith(b"HTTP/1.1 413")
        assert len(upstream.heads) == 1  # the big one never reached it
    finally:
        balancer.stop()
        upstream.socket.close()


def test_a_host_that_faces_a_network_gets_nginx_in_front_and_loopback_does_not():
    fronted = make_server(Endpoints(host="0.0.0.0"))
    assert isinstance(fronted, ReplicaSet) and fronted.count == 1
    assert isinstance(make_server(Endpoints(host="127.0.0.1")), EmbeddedTritonServer)
    assert isinstance(make_server(Endpoints(host="localhost")), EmbeddedTritonServer)


# --- the secrets themselves ---------------------------------------------------------------------


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = access().write_secret(tmp_path / "key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0 or path.parent == tmp_path
    path.chmod(0o644)
    with pytest.raises(access().AccessError, match=r"can be read by others .*chmod 600"):
        access().read_secret(path)


def test_an_api_key_comes_only_from_the_environment_and_a_bad_one_is_refused(tmp_path):
    assert access().api_key_from_environment({}) is None
    assert access().api_key_from_environment({"LLM_IN_TRITON_API_KEY": "abc"}) == "abc"
    with pytest.raises(access().AccessError, match="must not be blank"):
        access().api_key_from_environment({"LLM_IN_TRITON_API_KEY": "a:b"})
    from tasks.variables import VARIABLES

    assert not [name for name in VARIABLES if "key" in name or "secret" in name]


def test_doit_serve_keeps_its_secrets_out_of_ps_logs_and_doit_state(served, tmp_path):
    project, _ = served
    api_key = f"api-{os.getpid()}-{time.time_ns()}"
    log_path = tmp_path / "serve.log"
    process, server, _ = doit_serve(
        project,
        log_path,
        "task=encode",
        *SERVED_SHAPES,
        environment={access().API_KEY_VARIABLE: api_key},
    )
    try:
        output = log_path.read_text()
        secret_file = project.root / ".secrets" / "admin-key"
        admin = access().read_secret(secret_file)
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
        assert "EMBEDDING: float32 [1, 384]" in output  # the sample request sent the key
        assert "need the admin secret in .secrets/admin-key" in output
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
        assert "@ADMIN_KEY@" in ps  # the server is there, its placeholder only
        with Client(server) as client:
            assert refusal(lambda: client.infer("encode", {"TEXT": ["x"]})) == "403"
            assert refusal(lambda: client.client.unload_model("encode")) == "403"
        shown = {
            "ps": ps,
            "the serve log": log_path.read_text(),
            "the tritonserver log": paths.SERVER_LOG.read_text(errors="replace"),
            **{
                str(f): f.read_bytes().decode(errors="replace")
                for f in (project.root / "model_zoo").glob(".doit.db*")
            },
        }
        for where, text in shown.items():
            assert admin not in text and api_key not in text, where
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
