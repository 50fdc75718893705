"""`replicas=N`: N embedded servers on one repository behind nginx, as one `Server`.
One replica behind nginx is how a server faces a network (a `host` that is not loopback).

`ReplicaSet` starts the replicas on free loopback ports, one after another, then an
`NginxBalancer` on the ports users know (HTTP and gRPC upstreams, templates/nginx.conf.j2).
With an `openai_port`, nginx also fronts the OpenAI-compatible API there: the API process
listens on a loopback port of its own (`openai_backend`) and speaks gRPC to nginx's balanced
front, so its requests spread over the replicas too.
A replica that exits is restarted on its own ports while the others answer; nginx skips it
meanwhile (a refused connection is retried on another replica). What fails is what the dead
replica had in flight: nginx does not resend a request a replica took.

Standard library only at import (`doit list` imports tasks.server).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tasks import artifacts, paths
from tasks.errors import ServerError
from tasks.server.embedded import end_group, parent_death_signal
from tasks.server.network import (
    Listening,
    check_ports_free,
    free_port,
    port_is_free,
    wait_until_ready,
)

NGINX_FALLBACK = Path("/usr/sbin/nginx")  # Debian's, when /usr/sbin is not on PATH
BALANCER = {  # the template's settings
    "fail_timeout_s": 5,  # a replica that failed a connection is skipped this long
    "keepalive": 32,  # idle connections kept to each upstream, per protocol
    "connect_timeout_s": 2,
    "read_timeout_s": 300,  # a long generation, or a stream, between two messages
}
# Triton's admin protocols, refused at nginx whatever the headers: model control (a load can
# carry code), shared memory, trace and log settings. Operators use a replica's loopback port.
ADMIN_HTTP_PATHS = r"^/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)(/|$)"
ADMIN_HTTP_MODEL_PATHS = r"^/v2/models/[^/]+(/versions/[^/]+)?/trace(/|$)"
ADMIN_GRPC_METHODS = (
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0  # SIGQUIT lets nginx finish what is in flight; SIGKILL after this
CHECK_INTERVAL = 0.5  # seconds between looks at the replicas
RETRY_AFTER = 5.0  # seconds before a replica that failed to restart is tried again


def find_nginx() -> str:
    found = shutil.which("nginx") or (str(NGINX_FALLBACK) if NGINX_FALLBACK.is_file() else None)
    if found is None:
        raise ServerError(
            "replicas=N runs nginx as the load balancer, and it is not installed: "
            "apt-get install nginx (Debian, Ubuntu), or serve one server with replicas=1"
        )
    return found


class NginxBalancer(Listening):
    """nginx in a folder of its own (config, pid, log, temp files), in the foreground."""

    def __init__(
        self,
        host: str,
        http_port: int,
        grpc_port: int,
        replicas: list[dict],
        max_body_mb: int,
        openai: tuple[int, str] | None = None,
    ) -> None:
        self.host, self.ports = host, {"http": http_port, "grpc": grpc_port}
        self.replicas = replicas  # [{"http": "127.0.0.1:PORT", "grpc": "127.0.0.1:PORT"}]
        self.max_body_mb = max_body_mb
        self.openai_upstream = None  # the OpenAI API's "127.0.0.1:PORT", fronted on its port
        if openai is not None:
            self.ports["openai"], self.openai_upstream = openai
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as nginx writes it
        listen = {kind: f"{host}:{port}" for kind, port in self.ports.items()}
        context = {
            **BALANCER,
            "listen": listen,
            "replicas": self.replicas,
            "openai_upstream": self.openai_upstream,
            "max_body_mb": self.max_body_mb,
            "admin_http_paths": [ADMIN_HTTP_PATHS, ADMIN_HTTP_MODEL_PATHS],
            "admin_grpc_methods": "|".join(ADMIN_GRPC_METHODS),
        }
        return artifacts.render_template(paths.NGINX_TEMPLATE, context)

    def start(self) -> NginxBalancer:
        nginx = find_nginx()
        check_ports_free(self.host, self.ports)
        self._workdir = Path(tempfile.mkdtemp(prefix="llm-in-triton-nginx-"))
        self._workdir.chmod(0o755)  # nginx's workers may run as another user (root starts it)
        conf = self._workdir / "nginx.conf"
        conf.write_text(self.config())
        base = [nginx, "-p", f"{self._workdir}/", "-c", str(conf), "-e", str(self.log_path)]
        checked = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
        if checked.returncode != 0:  # nginx's own checker, before it binds anything
            self.stop()
            raise ServerError(
                f"nginx refused the config made from templates/{paths.NGINX_TEMPLATE.name}:\n"
                f"{checked.stderr.strip()}"
            )
        self._process = subprocess.Popen(
            [*base, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # its log is error.log, read by failure()
            start_new_session=True,
            preexec_fn=parent_death_signal(),  # never left holding the ports after a kill
        )

        def check() -> None:
            if not self.running:
                raise self.failure()

        def listening() -> bool:
            return not any(port_is_free(self.host, port) for port in self.ports.values())

        try:
            if not wait_until_ready(listening, check, START_TIMEOUT, 0.05):
                raise self.failure()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def log_path(self) -> Path:
        return (self._workdir or Path(tempfile.gettempdir())) / "error.log"

    def failure(self) -> ServerError:
        code = self._process.poll() if self._process is not None else None
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        lines = [f"  {line}" for line in text.splitlines()[-10:]] or ["  (no log)"]
        state = "is not listening" if code is None else f"exited with code {code}"
        return ServerError(f"nginx (the balancer) {state}:\n" + "\n".join(lines))

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:  # SIGQUIT is graceful: in-flight requests finish
            end_group(process, signal.SIGQUIT, STOP_TIMEOUT)
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


class ReplicaSet(Listening):
    """`count` servers made by `make_replica(index, ports)` behind an NginxBalancer on
    `host`'s `http_port` and `grpc_port` (and `openai_port`, unless 0, passed to the API's
    process on `openai_backend`). `ports` is None for a new replica (free ports are picked),
    or the ports of the one it replaces."""

    def __init__(
        self,
        count: int,
        make_replica: Callable[[int, dict | None], object],
        host: str,
        http_port: int,
        grpc_port: int,
        max_body_mb: int,
        log=print,
        openai_port: int = 0,
    ) -> None:
        self.count, self.make_replica, self.log = count, make_replica, log
        self.max_body_mb = max_body_mb
        self.openai_port = openai_port
        self.openai_backend: int | None = None  # the loopback port the API listens on
        self.members: list = []
        self.restarts: list[dict] = []  # replica, pid, seconds to ready
        self.balancer: NginxBalancer | None = None
        self.host, self.ports = host, {"http": http_port, "grpc": grpc_port}  # the balancer's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = None  # the replica a restart is starting, if any

    @property
    def running(self) -> bool:
        return self.balancer is not None and self.balancer.running

    def failure(self) -> ServerError:
        if self.balancer is None:
            return ServerError("the replicas' balancer was never started")
        return self.balancer.failure()

    def _replica(self, index: int, ports: dict | None):
        """A new replica, not started: this set restarts it when it exits, not it itself."""
        replica = self.make_replica(index, ports)
        replica.restart_on_exit = False
        return replica

    def start(self) -> ReplicaSet:
        fronted = {"openai": self.openai_port} if self.openai_port else {}
        check_ports_free(self.host, {**self.ports, **fronted})  # before loading, not after
        try:
            for index in range(self.count):
                self.log(f"replicas: starting replica {index + 1} of {self.count}")
                self.members.append(self._replica(index, None).start())
            upstreams = [{"http": m.http_url, "grpc": m.grpc_url} for m in self.members]
            openai = None
            if self.openai_port:  # nginx answers 502 there until the API's process is up
                self.openai_backend = free_port()
                openai = (self.openai_port, f"127.0.0.1:{self.openai_backend}")
            self.balancer = NginxBalancer(
                self.host,
                self.ports["http"],
                self.ports["grpc"],
                upstreams,
                self.max_body_mb,
                openai,
            ).start()
        except BaseException:
            self.stop()
            raise
        for index, member in enumerate(self.members):
            self.log(
                f"replicas: replica {index + 1}: pid {member.pid}, HTTP {member.http_url}, "
                f"gRPC {member.grpc_url}, metrics {member.metrics_url}/metrics"
            )
        if self.count == 1:
            self.log(
                f"nginx: in front on HTTP {self.http_url} and gRPC {self.grpc_url}, since "
                f"{self.host} faces a network and tritonserver 2.51 predates NVIDIA's August "
                f"2025 fixes: it refuses the admin paths, bounds bodies to {self.max_body_mb} "
                "MB and passes none on chunked; the server is restarted if it exits"
            )
        else:
            self.log(
                f"replicas: nginx balances {self.count} replicas on HTTP {self.http_url} and "
                f"gRPC {self.grpc_url}; one that exits is restarted; it refuses the admin "
                f"paths, bounds bodies to {self.max_body_mb} MB, passes none on chunked"
            )
        if self.openai_port:
            self.log(
                f"nginx: the OpenAI API's port {self.openai_port} passes to its process on "
                f"127.0.0.1:{self.openai_backend}, which speaks gRPC to {self.grpc_url}"
            )
        self._thread = threading.Thread(target=self._keep_up, name="replicas", daemon=True)
        self._thread.start()
        return self

    def supervisor_of(self, index: int):
        """The supervisor of replica `index` now, across restarts (for the repository watcher)."""
        replicas = self

        class Current:
            def forget(self, name: str) -> None:
                replicas.members[index].forget(name)

        return Current()

    def _keep_up(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL):
            for index, member in enumerate(self.members):
                if not member.running and not self._stop.is_set():
                    self._restart(index, member)

    def _restart(self, index: int, member) -> None:
        code, pid, ports = member.returncode, member.pid, dict(member.ports)
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        kept = member.kept_log(pid)
        self.log(
            f"replicas: replica {index + 1} (pid {pid}) exited ({how}; its log: {kept}); "
            f"restarting it, {self.count - 1} of {self.count} answer meanwhile"
        )
        member.stop()  # its stubs and shm regions go
        with contextlib.suppress(OSError):  # the replacement writes a log of the same name
            member.log_path.replace(kept)
        began = time.monotonic()
        while not self._stop.is_set():
            self._starting = replacement = self._replica(index, ports)
            try:
                self.members[index] = replacement.start()
            except ServerError as err:
                if self._stop.is_set():  # stop() ended the start
                    return
                self.log(f"replicas: replica {index + 1} did not restart: {err}")
                self._stop.wait(RETRY_AFTER)
                continue
            seconds = round(time.monotonic() - began, 1)
            record = {"replica": index + 1, "pid": pid, "exit": code, "seconds": seconds}
            self.restarts.append({**record, "at": time.strftime("%H:%M:%S")})
            self.log(f"replicas: replica {index + 1} is back (pid {replacement.pid}, {seconds} s)")
            return

    def stop(self) -> None:
        self._stop.set()
        starting = self._starting
        if starting is not None:  # a restart under way ends now, not after its load timeout
            starting.stop()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        balancer, self.balancer = self.balancer, None
        if balancer is not None:  # first: no new request reaches a replica that is stopping
            balancer.stop()
        for member in self.members:
            member.stop()
