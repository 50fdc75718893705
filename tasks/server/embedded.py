"""`EmbeddedTritonServer`: the bundled tritonserver as a child process.

It starts the server in its own process group, waits until it is ready, fails fast with
Triton's own reason lines when a model does not load, and on `stop()` leaves no stub process
and no `/dev/shm` region behind. When its supervisor finds that only a restart answers the
requests a dead stub held (triton/supervisor/supervisor.py), it restarts in place, on the same
ports, and counts as running meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from tasks import artifacts, paths
from tasks.errors import ServerError
from tasks.server.install import (
    find_tritonserver,
    preflight_stub,
    prepare_backend_dir,
    server_environment,
)
from tasks.server.logs import LogFollower, failure_reasons, indent, is_fatal
from tasks.server.network import (
    Listening,
    check_ports_free,
    client_host,
    free_port,
    http_ready,
    wait_until_ready,
)

SHM_DIR = Path("/dev/shm")
# --exit-timeout-secs: one budget for open HTTP connections (an idle keep-alive client counts)
# and in-flight inferences; when it runs out Triton exits without unloading models.
EXIT_TIMEOUT = 10
KILL_MARGIN = 20.0  # after the exit timeout, before SIGKILL: 30 s in all by default
KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.1


@functools.cache
def supervision():
    """triton/supervisor/supervisor.py: finds the stubs, reloads a model that lost one."""
    return artifacts.load_runtime("supervisor", "supervisor.py")


@functools.cache
def access():
    """triton/supervisor/access.py: the admin secret and API key on Triton's restricted APIs."""
    return artifacts.load_runtime("supervisor", "access.py")


@contextlib.contextmanager
def access_errors():
    """access.py's errors (a secret that cannot be made, read or put in place) as ours."""
    try:
        yield
    except access().AccessError as err:
        raise ServerError(str(err)) from None


def stub_pids(shm_prefix: str) -> list[int]:
    """Live python backend stubs of the server whose shm regions start with `shm_prefix`."""
    return list(supervision().stubs(shm_prefix))


class EmbeddedTritonServer(Listening):
    """A tritonserver process on a model repository, as a context manager.

    Ports left as None are picked free at construction, so the URLs are known before
    `start()`. The log goes to `log_file` (default: a kept temporary file). With `supervise`
    (the default) the server runs with explicit model control and strict readiness, and a
    supervisor thread reloads a model whose stub process dies (triton/supervisor/).
    `exit_timeout` is Triton's `--exit-timeout-secs`; `stop()` sends SIGKILL only after that
    plus a margin (30 s in all by default).

    `model_repository` is a local folder, or a repository URL tritonserver reads itself
    (`s3://[host:port/]bucket/prefix`); `environment` adds variables for the server (the
    AWS credentials of a bucket).

    Model control, shared memory, trace and log settings need the admin secret (the header
    `access().ADMIN_HEADER`): the one in `admin_key_file`, or a fresh one for this server
    (`admin_key`). With `api_key`, inference needs that key too (triton/supervisor/access.py).
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        load_timeout: float = 120.0,
        exit_timeout: int = EXIT_TIMEOUT,
        supervise: bool = True,
        quiet: bool = False,
        environment: Mapping[str, str] | None = None,
        admin_key_file: Path | None = None,
        api_key: str | None = None,
    ) -> None:
        self.admin_key_file = Path(admin_key_file) if admin_key_file else None
        with access_errors():  # a file is made on first use: `doit serve` keeps its own
            self.admin_key = (
                access().ensure_secret(self.admin_key_file)
                if admin_key_file
                else access().new_secret()
            )
        self.api_key = api_key
        self.model_repository = repository_argument(model_repository)
        self.environment = dict(environment or {})
        self.host = host
        self.ports: dict[str, int] = {}
        for kind, port in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port)):
            while port is None or port in self.ports.values():
                port = free_port(host)
            self.ports[kind] = port
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_file = Path(name)
        self.log_path = Path(log_file)
        self.load_timeout = load_timeout
        self.exit_timeout = exit_timeout
        self.supervise = supervise
        self.supervisor = None  # the running Supervisor, once the server is ready
        self.quiet = quiet
        # Names this instance's python backend shm regions, so stop() removes exactly those.
        self.shm_prefix = f"llm_in_triton_{os.getpid()}_{os.urandom(4).hex()}_"
        self._process: subprocess.Popen | None = None
        self._terminated = False
        self._workdir: Path | None = None
        self._stopping = threading.Event()  # stop() was called: a restart under way ends
        self._restarted = threading.Event()  # set but while a restart in place runs
        self._restarted.set()
        self._restarter: threading.Thread | None = None  # the thread restarting in place
        self.restarts: list[dict] = []  # why, old pid, new pid, seconds to ready
        # the supervisor starts the server again when it exits on its own (False: an owner
        # that watches it does, a ReplicaSet)
        self.restart_on_exit = True

    @property
    def metrics_url(self) -> str:
        """host:port of the Prometheus endpoint (served under /metrics)."""
        return f"{client_host(self.host)}:{self.ports['metrics']}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Serving, or restarting in place (see the module)."""
        alive = self._process is not None and self._process.poll() is None
        return alive or not self._restarted.is_set()

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited (negative: the signal that ended it)."""
        return self._process.poll() if self._process is not None else None

    def failure(self) -> ServerError:
        """Why a server that was running has exited, from its own log."""
        code = self._process.returncode if self._process is not None else None
        return ServerError(self._failure_message(code))

    def __enter__(self) -> EmbeddedTritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> EmbeddedTritonServer:
        """Launch the server and wait until it and every model in the repository are ready."""
        self._stopping.clear()
        return self._start()

    def _start(self) -> EmbeddedTritonServer:
        if self._process is not None:
            raise ServerError(f"this tritonserver is already running (pid {self._process.pid})")
        if not is_remote(self.model_repository) and not Path(self.model_repository).is_dir():
            raise ServerError(
                f"model repository {self.model_repository} is not a directory; build it with doit"
            )
        check_ports_free(self.host, self.ports)
        install = find_tritonserver()
        env = {**server_environment(), **self.environment}
        preflight_stub(install.stub, env)  # without the secrets' library: the stub is no server
        self._echo(f"tritonserver: starting on {self.model_repository} (log: {self.log_path})")
        started = time.monotonic()
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix="llm-in-triton-serve-"))
            backend_dir = prepare_backend_dir(self._workdir / "backends", install)
            with access_errors():
                env.update(self._secret_environment())
            process = self._launch(install.server, backend_dir, env)
            self._wait_until_ready(process)
            with access_errors():
                access().verify(self.http_url, self.admin_key)
            if self.supervise:
                supervisor = supervision().Supervisor(
                    self.http_url,
                    self.shm_prefix,
                    log=self._echo,
                    headers=self.admin_headers,
                    restart=self._restart_in_place,
                    alive=(lambda: self.returncode is None) if self.restart_on_exit else None,
                )
                self.supervisor = supervisor.start()
        except BaseException:
            self.stop()
            raise
        self._echo(
            f"tritonserver: ready in {time.monotonic() - started:.1f} s (pid {self.pid}): "
            f"HTTP {self.http_url}, gRPC {self.grpc_url}, metrics {self.metrics_url}/metrics"
        )
        return self

    def kept_log(self, pid: int) -> Path:
        """Where the log of an exited server (pid) is kept when a new one starts on its name."""
        return self.log_path.with_name(f"{self.log_path.stem}.{pid}{self.log_path.suffix}")

    def forget(self, model: str) -> None:
        """A model loaded anew on purpose: the supervisor of now counts its stubs afresh."""
        if self.supervisor is not None:
            self.supervisor.forget(model)

    def _restart_in_place(self, reason: str) -> None:
        """Kill the server and start it again on the same ports (the supervisor's thread calls
        this): every connection drops, so a request in flight gets an error, not a hang."""
        process, began = self._process, time.monotonic()
        self._restarter = threading.current_thread()
        self._restarted.clear()
        try:
            self._echo(f"tritonserver: restarting (pid {process.pid}): {reason}")
            supervisor, self.supervisor = self.supervisor, None
            supervisor.stop()  # this very thread: it only stops looking
            signal_group(process, signal.SIGKILL)
            wait_for_exit(process, KILL_TIMEOUT)
            self._process = None
            self._remove_leftovers()
            kept = self.kept_log(process.pid)
            with contextlib.suppress(OSError):  # the new server writes a log of the same name
                self.log_path.replace(kept)
                self._echo(f"tritonserver: the log of pid {process.pid} is now {kept}")
            if not self._stopping.is_set():
                self._start()
                record = {"reason": reason, "pid": process.pid, "new_pid": self.pid}
                self.restarts.append({**record, "seconds": round(time.monotonic() - began, 1)})
        except ServerError as err:  # not running now: the owner reports it as a failure
            self._echo(f"tritonserver: did not restart: {err}")
        finally:
            self._restarted.set()

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open model control on this server (for our own callers)."""
        return access().http_headers(admin=self.admin_key)

    def _secret_environment(self) -> dict[str, str]:
        """The variables that put the secrets in place of their placeholders (secret_args.c),
        from files in this server's private folder unless given."""
        secrets = {"admin": self.admin_key_file}
        if secrets["admin"] is None:
            secrets["admin"] = access().write_secret(self._workdir / "admin-key", self.admin_key)
        if self.api_key is not None:
            secrets["api_key"] = access().write_secret(self._workdir / "api-key", self.api_key)
        library = access().build_library(paths.SECRET_ARGS_BUILD)
        return access().launch_environment(library, secrets)

    def stop(self) -> None:
        """Stop the server and clean up after it. Idempotent and safe from a signal handler:
        it takes no lock, and a nested call simply finishes the job. A restart in place that
        is under way ends first."""
        self._stopping.set()
        if threading.current_thread() is not self._restarter:
            self._restarted.wait(self.load_timeout + KILL_TIMEOUT)
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:  # first: the stubs that leave now leave on purpose
            supervisor.stop()
        process = self._process
        if process is not None:
            if process.poll() is None:
                if not self._terminated:
                    self._terminated = True
                    signal_group(process, signal.SIGTERM)
                if not wait_for_exit(process, self.exit_timeout + KILL_MARGIN):
                    signal_group(process, signal.SIGKILL)
                    wait_for_exit(process, KILL_TIMEOUT)
            self._process = None
            self._echo(f"tritonserver: stopped (pid {process.pid}, exit {process.returncode})")
        self._remove_leftovers()

    def _launch(self, server: Path, backend_dir: Path, env: dict[str, str]) -> subprocess.Popen:
        command = [
            str(server),
            f"--backend-directory={backend_dir}",
            f"--model-repository={self.model_repository}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={self.exit_timeout}",
        ]
        for kind, port in self.ports.items():
            command += [f"--{kind}-address={self.host}", f"--{kind}-port={port}"]
        if self.supervise:
            command += supervision().SERVER_ARGS
        command += access().server_arguments(api_key=self.api_key is not None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._terminated = False
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() signals all of it
                preexec_fn=parent_death_signal(),
            )
        return self._process

    def _wait_until_ready(self, process: subprocess.Popen) -> None:
        log = LogFollower(self.log_path)

        def check() -> None:
            fatal = any(is_fatal(line) for line in log.new_lines())
            exit_code = process.poll()
            if fatal or exit_code is not None:
                self.stop()
                raise ServerError(self._failure_message(exit_code))

        if not wait_until_ready(self._is_ready, check, self.load_timeout, POLL_INTERVAL):
            self.stop()
            raise ServerError(
                f"tritonserver was not ready after {self.load_timeout:.0f} s (load_timeout); "
                f"last lines of {self.log_path}:\n{self._log_tail()}"
            )

    def _is_ready(self) -> bool:
        return http_ready(self.http_url)

    def _failure_message(self, exit_code: int | None) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        reasons = failure_reasons(text)
        shown = "\n".join(indent(r) for r in reasons[:20])
        if exit_code is None:
            how = "stopped at the first load failure"
        else:
            how = f"exited with code {exit_code}"
        if not shown:
            shown = self._log_tail()
        return (
            f"tritonserver could not serve {self.model_repository} ({how}):\n{shown}\n"
            f"full log: {self.log_path}"
        )

    def _log_tail(self, count: int = 15) -> str:
        if not self.log_path.exists():
            return "  (no log written)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        lines = [line for line in lines if line.strip() and not line.startswith(("+", "|"))]
        return "\n".join(f"  {line}" for line in lines[-count:]) or "  (empty log)"

    def _remove_leftovers(self) -> None:
        """Kill this server's orphaned stubs, remove its shm regions and its backend folder."""
        for pid in stub_pids(self.shm_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_TIMEOUT
        while stub_pids(self.shm_prefix) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def _echo(self, message: str) -> None:
        if self.quiet:
            return
        # A print re-entered from a signal handler raises RuntimeError: drop the line then.
        with contextlib.suppress(RuntimeError):
            print(message, flush=True)


def is_remote(repository: str) -> bool:
    """A repository tritonserver fetches itself (s3://, gs://, as://), not a local folder."""
    return "://" in repository


def repository_argument(repository: Path | str) -> str:
    """--model-repository as tritonserver takes it: a URL as given, a folder made absolute."""
    text = str(repository)
    return text if is_remote(text) else str(Path(text).resolve())


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """`signum` to `process`'s group (it was started in a session of its own); gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def end_group(process: subprocess.Popen, signum: int, timeout: float) -> None:
    """`signum` to `process`'s group, and SIGKILL if it has not exited within `timeout` s."""
    if process.poll() is not None:
        return
    signal_group(process, signum)
    if not wait_for_exit(process, timeout):
        signal_group(process, signal.SIGKILL)
        wait_for_exit(process, KILL_TIMEOUT)


def wait_for_exit(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for `process` to exit; with a timeout, Popen.wait takes its lock without blocking."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def parent_death_signal():
    """A preexec_fn asking Linux to SIGTERM the server if this process dies without stop().

    Only from the main thread: the kernel sends it when the launching *thread* exits.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_signal
