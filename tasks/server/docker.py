"""`DockerTritonServer`: NVIDIA's Triton image through docker-compose.yml (GPU hosts)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from tasks import paths
from tasks.errors import ServerError
from tasks.server.embedded import access, access_errors, end_group
from tasks.server.network import check_ports_free, client_host, http_ready, wait_until_ready
from tasks.settings import Endpoints


class DockerTritonServer:
    """NVIDIA's Triton image with the GPU, run through docker-compose.yml (GPU hosts only):
    the `Server` protocol, for `server=docker`."""

    def __init__(self, endpoints: Endpoints, load_timeout: float = 900.0) -> None:
        self.endpoints = endpoints
        self.load_timeout = load_timeout  # the first start builds and pulls the image
        self.http_url = f"{client_host(endpoints.host)}:{endpoints.http_port}"
        self.grpc_url = f"{client_host(endpoints.host)}:{endpoints.grpc_port}"
        self._process: subprocess.Popen | None = None

    def command(self, *args: str) -> list[str]:
        if shutil.which("docker-compose"):
            base = ["docker-compose"]
        elif shutil.which("docker"):
            base = ["docker", "compose"]
        else:
            raise ServerError(
                "server=docker: no docker or docker-compose on PATH; install "
                "Docker with the NVIDIA container toolkit, or use server=embedded"
            )
        return [*base, "-f", str(paths.COMPOSE_FILE), *args]

    def environment(self) -> dict[str, str]:
        """Variables docker-compose.yml reads for the published ports."""
        e = self.endpoints
        return {
            **os.environ,
            "TRITON_HOST": e.host,
            "HTTP_PORT": str(e.http_port),
            "GRPC_PORT": str(e.grpc_port),
            "METRICS_PORT": str(e.metrics_port),
        }

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def failure(self) -> ServerError:
        return ServerError(f"the triton container stopped; see {paths.SERVER_LOG}")

    def start(self) -> DockerTritonServer:
        e = self.endpoints
        ports = {"http": e.http_port, "grpc": e.grpc_port, "metrics": e.metrics_port}
        check_ports_free(e.host, ports)
        with access_errors():  # the compose secret the supervisor closes model control with
            access().ensure_secret(paths.ADMIN_KEY)
        paths.SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
        with open(paths.SERVER_LOG, "wb") as log:
            self._process = subprocess.Popen(
                self.command("up", "--build", "triton"),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def check() -> None:
            if not self.running:
                self.stop()
                raise ServerError(f"the triton container stopped; see {paths.SERVER_LOG}")

        if not wait_until_ready(lambda: http_ready(self.http_url), check, self.load_timeout, 1.0):
            self.stop()
            raise ServerError(
                f"the triton container was not ready after {self.load_timeout:.0f} s; see "
                f"{paths.SERVER_LOG}"
            )
        print(
            f"tritonserver (docker): ready: HTTP {self.http_url}, gRPC {self.grpc_url}", flush=True
        )
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        subprocess.run(
            self.command("down"), env=self.environment(), check=False, capture_output=True
        )
        end_group(self._process, signal.SIGTERM, 30)
        self._process = None
        print("tritonserver (docker): stopped", flush=True)
