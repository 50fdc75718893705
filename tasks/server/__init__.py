"""The Triton servers the stages run (serve, bench, soak), behind one `Server` protocol:
`EmbeddedTritonServer` (the tritonserver of the nvidia-pytriton wheel, a child process) and
`DockerTritonServer` (NVIDIA's image, GPU hosts). `make_server` picks one from `server=`.

Modules: install (the bundled server's files), network (ports, readiness, the wait loop),
logs (Triton's log lines), embedded, docker, balancer (`replicas=N` behind nginx), watch
(rolling updates from a published bucket), openai_api (the OpenAI-compatible API's process).
Standard library only: `doit list` imports this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tasks import paths, storage
from tasks.errors import ServerError
from tasks.server.balancer import NginxBalancer, ReplicaSet, find_nginx
from tasks.server.docker import DockerTritonServer
from tasks.server.embedded import (
    EmbeddedTritonServer,
    access,
    access_errors,
    stub_pids,
    supervision,
)
from tasks.server.install import (
    STUB_NAME,
    find_tritonserver,
    preflight_stub,
    prepare_backend_dir,
    server_environment,
)
from tasks.server.network import free_port, http_ready, port_is_free
from tasks.server.openai_api import OpenAIServer
from tasks.server.watch import RepositoryWatcher, folder_manifest
from tasks.settings import Endpoints

__all__ = [
    "STUB_NAME",
    "DockerTritonServer",
    "EmbeddedTritonServer",
    "NginxBalancer",
    "OpenAIServer",
    "ReplicaSet",
    "RepositoryWatcher",
    "Server",
    "access",
    "authorize",
    "find_nginx",
    "find_tritonserver",
    "folder_manifest",
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


def make_server(
    endpoints: Endpoints, log_file: Path | None = None, repo: str | None = None
) -> Server:
    """The server `server=` names, on models/ (or `repo=`: a folder, or s3://BUCKET/PREFIX
    with the AWS variables' endpoint and credentials) and the endpoints' ports.

    Every embedded server closes its admin protocols behind the admin secret in
    .secrets/admin-key (made on first use), and inference behind the API key when the
    environment gives one. The bundled 2.51 predates NVIDIA's August 2025 fixes, so it never
    faces a network itself: with `replicas=N`, or a `host` that is not loopback, it listens on
    loopback behind nginx, which refuses the admin paths; nginx fronts `openai_port` too
    (`openai_api.for_server` starts the API's process behind it)."""
    if endpoints.server == "docker":
        if repo is not None and storage.s3_location(repo) is not None:
            raise ServerError(
                f"repo={repo}: server=docker serves models/; use server=embedded to serve a bucket"
            )
        return DockerTritonServer(endpoints)
    repository, environment = storage.served_repository(repo) if repo else (paths.MODELS, {})
    log_file = log_file or paths.SERVER_LOG
    with access_errors():
        api_key = access().api_key_from_environment()

    def embedded(log: Path, host: str, ports: dict) -> EmbeddedTritonServer:
        return EmbeddedTritonServer(
            repository,
            environment=environment,
            host=host,
            **{f"{kind}_port": port for kind, port in ports.items()},
            log_file=log,
            admin_key_file=paths.ADMIN_KEY,
            api_key=api_key,
        )

    if endpoints.replicas == 1 and not endpoints.faces_network:
        ports = {
            "http": endpoints.http_port,
            "grpc": endpoints.grpc_port,
            "metrics": endpoints.metrics_port,
        }
        return embedded(log_file, endpoints.host, ports)

    def replica(index: int, ports: dict | None) -> EmbeddedTritonServer:
        log = log_file
        if endpoints.replicas > 1:
            log = log_file.with_name(f"{log_file.stem}-{index + 1}{log_file.suffix}")
        return embedded(log, "127.0.0.1", ports or {})  # loopback: only nginx reaches it

    bucket = repo is not None and storage.s3_location(repo) is not None  # no API for one
    return ReplicaSet(
        endpoints.replicas,
        replica,
        endpoints.host,
        endpoints.http_port,
        endpoints.grpc_port,
        endpoints.max_body_mb,
        openai_port=0 if bucket else endpoints.openai_port,
    )


def authorize(client, protocol: str) -> None:
    """Make a tritonclient send the API key the environment gives, if any (bench, soak)."""
    with access_errors():
        access().authorize(client, protocol)
