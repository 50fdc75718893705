"""Ports, readiness and the one polling loop every server kind waits in."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping

from tasks.errors import ServerError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the kernel's pick)."""
    family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(address)
        return probe.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on `host:port` now.

    SO_REUSEADDR as servers use it: a port in TIME_WAIT after a stopped server counts as free,
    a port someone listens on (also on 0.0.0.0) does not.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """Fail at once, naming the port, when one is taken (kind -> port)."""
    for kind, port in ports.items():
        if not port_is_free(host, port):
            raise ServerError(
                f"port {port} ({kind}) is already in use on {host}; "
                f"pass {kind}_port=... (another port, or None for a free one)"
            )


def http_ready(url: str, model: str | None = None) -> bool:
    """Whether the Triton server at host:port answers ready (for `model`, if given)."""
    import urllib.error
    import urllib.request

    route = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
    # No proxy: an http_proxy in the environment must not answer for localhost.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{url}{route}", timeout=1.0) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = wildcard.get(host, host)
    return f"[{host}]" if ":" in host else host


class Listening:
    """`http_url` and `grpc_url` (host:port, for clients) of a server that listens on `host`'s
    `ports` ({"http": ..., "grpc": ...})."""

    host: str
    ports: dict[str, int]

    @property
    def http_url(self) -> str:
        return f"{client_host(self.host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{client_host(self.host)}:{self.ports['grpc']}"


def wait_until_ready(
    ready: Callable[[], bool], check: Callable[[], None], timeout: float, interval: float
) -> bool:
    """Poll until `ready()` holds (True) or `timeout` seconds pass (False). `check()` runs
    first in each round and raises to stop at once (the server exited, or said why not)."""
    deadline = time.monotonic() + timeout
    while True:
        check()
        if ready():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
