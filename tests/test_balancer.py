"""replicas=N: the nginx balancer (real nginx) and the replica set (real tritonservers on
conftest's identity_repo). The bench through the balancer, a replica killed, is in test_s3.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import BuildError, ServerError
from tasks.server import EmbeddedTritonServer, NginxBalancer, ReplicaSet, find_nginx, free_port
from tasks.server import balancer as balancer_module
from tests.helpers.client import Client
from tests.helpers.serving import needs_nginx
from tests.helpers.stages import settings_from


def two_ports() -> tuple[int, int]:
    http, grpc = free_port(), free_port()
    while grpc == http:
        grpc = free_port()
    return http, grpc


def nginx_pids(balancer: NginxBalancer) -> list[int]:
    found = subprocess.run(["pgrep", "-f", str(balancer._workdir)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_without_nginx_replicas_fail_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(balancer_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(balancer_module, "NGINX_FALLBACK", tmp_path / "nginx")
    with pytest.raises(ServerError) as caught:
        find_nginx()
    assert str(caught.value) == (
        "replicas=N runs nginx as the load balancer, and it is not installed: apt-get install "
        "nginx (Debian, Ubuntu), or serve one server with replicas=1"
    )


def test_soak_refuses_replicas_at_once():
    from tasks.soak import soak

    with pytest.raises(BuildError, match=r"^replicas=2: doit soak watches one server's memory"):
        soak(settings_from(replicas="2"))


def test_the_config_lists_every_replica_in_both_upstreams_and_never_resends_a_taken_request():
    replicas = [{"http": "127.0.0.1:1001", "grpc": "127.0.0.1:1002"}]
    replicas.append({"http": "127.0.0.1:2001", "grpc": "127.0.0.1:2002"})
    config = NginxBalancer("127.0.0.1", 8000, 8001, replicas, 4).config()
    for address in ("1001", "1002", "2001", "2002"):
        assert f"server 127.0.0.1:{address} max_fails=1 fail_timeout=5s;" in config
    assert "listen 127.0.0.1:8001 http2;" in config and "listen 127.0.0.1:8000;" in config
    retries = [line.split() for line in config.splitlines() if "_next_upstream " in line]
    assert retries == [  # never non_idempotent
        ["proxy_next_upstream", "error", "timeout;"],
        ["grpc_next_upstream", "error", "timeout;"],
    ]
    assert "proxy_next_upstream_tries 2;" in config and "grpc_next_upstream_tries 2;" in config


@needs_nginx
def test_with_no_replica_up_the_balancer_answers_502_and_stops_leaving_nothing():
    dead = [{"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}"}]
    balancer = NginxBalancer("127.0.0.1", *two_ports(), dead * 2, 4).start()
    workdir = balancer._workdir
    try:
        assert balancer.running and nginx_pids(balancer)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://{balancer.http_url}/v2/health/ready", timeout=10)
        assert caught.value.code == 502
        pids = nginx_pids(balancer)
    finally:
        balancer.stop()
    assert not balancer.running and not workdir.exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_the_openai_api_is_fronted_unbuffered_with_the_same_body_limit():
    replicas = [{"http": "127.0.0.1:1001", "grpc": "127.0.0.1:1002"}]
    plain = NginxBalancer("127.0.0.1", 8000, 8001, replicas, 4).config()
    assert "openai" not in plain
    config = NginxBalancer("127.0.0.1", 8000, 8001, replicas, 4, (9000, "127.0.0.1:4321")).config()
    front = config[config.index("upstream openai_api") : config.index("# gRPC (HTTP/2")]
    assert "server 127.0.0.1:4321;" in front and "listen 127.0.0.1:9000;" in front
    for line in ("proxy_buffering off;", "proxy_read_timeout 300s;", "proxy_send_timeout 300s;"):
        assert line in front
    assert "client_max_body_size 4m;" in config  # for every server, this one too
    assert "error_page 413 @too_large;" in front  # in OpenAI's error object


@needs_nginx
def test_with_no_api_behind_it_the_openai_port_answers_502_and_counts_as_no_api():
    from tasks.server.openai_api import answers

    dead = [{"http": f"127.0.0.1:{free_port()}", "grpc": f"127.0.0.1:{free_port()}"}]
    port, backend = free_port(), free_port()
    balancer = NginxBalancer("127.0.0.1", *two_ports(), dead, 4, (port, f"127.0.0.1:{backend}"))
    balancer.start()  # nginx -t took the config
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert caught.value.code == 502
        assert not answers(f"127.0.0.1:{port}")  # the bench starts an API behind it
    finally:
        balancer.stop()


@needs_nginx
def test_a_balancer_on_a_taken_port_is_refused_before_nginx_starts():
    http, grpc = two_ports()
    taken = rf"port {http} \(http\) is already in use"
    with _listening(http), pytest.raises(ServerError, match=taken):
        NginxBalancer("127.0.0.1", http, grpc, [], 4).start()


class _listening:
    def __init__(self, port: int) -> None:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", port))
        self.socket.listen()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.socket.close()


@needs_nginx
@pytest.mark.server
def test_a_killed_replica_is_restarted_while_the_other_answers(identity_repo, tmp_path):
    def replica(index: int, ports: dict | None) -> EmbeddedTritonServer:
        ports = ports or {}
        return EmbeddedTritonServer(
            identity_repo,
            http_port=ports.get("http"),
            grpc_port=ports.get("grpc"),
            metrics_port=ports.get("metrics"),
            log_file=tmp_path / f"replica-{index + 1}.log",
            quiet=True,
        )

    lines: list[str] = []
    replicas = ReplicaSet(2, replica, "127.0.0.1", *two_ports(), 4, log=lines.append).start()
    value = np.array([[1.0, 2.0]], dtype=np.float32)
    try:
        first = replicas.members[0]
        pid = first.pid
        with Client(replicas, "grpc") as grpc, Client(replicas) as http:
            for client in (grpc, http):
                out = client.infer("identity", {"INPUT0": value})["OUTPUT0"]
                np.testing.assert_array_equal(out, value)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not replicas.restarts:  # the other replica answers every request meanwhile
                for client in (grpc, http):
                    out = client.infer("identity", {"INPUT0": value})["OUTPUT0"]
                    np.testing.assert_array_equal(out, value)
                assert time.monotonic() < deadline, lines
            assert replicas.members[0] is not first and replicas.members[0].running
            assert replicas.members[0].ports == first.ports  # where nginx looks for it
            out = grpc.infer("identity", {"INPUT0": value})["OUTPUT0"]
            np.testing.assert_array_equal(out, value)
    finally:
        replicas.stop()
    killed = next(line for line in lines if "exited" in line)
    assert killed.startswith(f"replicas: replica 1 (pid {pid}) exited (killed by SIGKILL")
    assert replicas.restarts[0]["replica"] == 1 and replicas.restarts[0]["pid"] == pid
    assert not any(m.running for m in replicas.members) and not replicas.running
