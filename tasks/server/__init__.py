"""The Triton servers the stages run (serve, bench, soak), behind one `Server` protocol:
`EmbeddedTritonServer` (the tritonserver of the nvidia-pytriton wheel, a child process) and
`DockerTritonServer` (NVIDIA's image, GPU hosts). `make_server` picks one from `server=`.

Modules: install (the bundled server's files), network (ports, readiness, the wait loop),
logs (Triton's log lines), embedded, docker. Standard library only: `doit list` imports this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tasks import paths
from tasks.errors import ServerError
from tasks.server.docker import DockerTritonServer
from tasks.server.embedded import EmbeddedTritonServer, stub_pids, supervision
from tasks.server.install import (
    STUB_NAME,
    find_tritonserver,
    preflight_stub,
    prepare_backend_dir,
    server_environment,
)
from tasks.server.network import free_port, http_ready, port_is_free
from tasks.settings import Endpoints

__all__ = [
    "STUB_NAME",
    "DockerTritonServer",
    "EmbeddedTritonServer",
    "Server",
    "find_tritonserver",
    "free_port",
    "http_ready",
    "make_server",
    "port_is_free",
    "preflight_stub",
    "prepare_backend_dir",
    "server_environment",
    "stub_pids",
    "supervision",
]


class Server(Protocol):
    """What serve, bench and soak use of a running Triton server."""

    http_url: str  # host:port
    grpc_url: str

    @property
    def running(self) -> bool: ...

    def start(self) -> Server: ...

    def stop(self) -> None: ...

    def failure(self) -> ServerError:
        """Why a server that was running has stopped."""
        ...


def make_server(endpoints: Endpoints, log_file: Path | None = None) -> Server:
    """The server `server=` names, on models/ and the endpoints' ports."""
    if endpoints.server == "docker":
        return DockerTritonServer(endpoints)
    return EmbeddedTritonServer(
        paths.MODELS,
        host=endpoints.host,
        http_port=endpoints.http_port,
        grpc_port=endpoints.grpc_port,
        metrics_port=endpoints.metrics_port,
        log_file=log_file or paths.SERVER_LOG,
    )
