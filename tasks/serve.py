"""Stage `serve`: run the real `tritonserver` bundled in the nvidia-pytriton wheel.

The wheel carries the server, the python backend and one backend stub per Python version.
Launching it standalone takes four facts measured on this project's machines (see
ENVIRONMENT.md): a backend folder holding the stub of the running interpreter's version, the
venv's `bin/` first on PATH (the stub finds its packages through the first `python3`), the
interpreter's LIBDIR first on LD_LIBRARY_PATH (or the stub loads another libpython), and a
preflight run of the stub, because a broken stub makes the server hang in "loading" forever.

`EmbeddedTritonServer` starts the server in its own process group, waits until it is ready,
fails fast with Triton's own reason lines when a model does not load, and on `stop()` leaves
no stub process and no `/dev/shm` region behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks import artifacts, paths
from tasks.errors import ServerError, fails_cleanly
from tasks.settings import Endpoints, Settings, current

INSTALL_FIX = "pip install -r requirements.txt"
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
PREFLIGHT_TIMEOUT = 15.0  # seconds for the stub to print its usage line
# --exit-timeout-secs: one budget for open HTTP connections (an idle keep-alive client counts)
# and in-flight inferences; when it runs out Triton exits without unloading models.
EXIT_TIMEOUT = 10
KILL_MARGIN = 20.0  # after the exit timeout, before SIGKILL: 30 s in all by default
KILL_TIMEOUT = 5.0
POLL_INTERVAL = 0.1

# A Triton log line: `E1124 05:34:53.493753 3385 model_lifecycle.cc:642] "message"`.
LOG_LINE = re.compile(r"^(?P<level>[IWE])\d{4} [\d:.]+ +\d+ (?P<source>[^\]]+)\] (?P<msg>.*)$")
# Error lines Triton prints on every CPU-only start (the second for each ensemble): harmless.
LOG_NOISE = ("CudaDriverHelper has not been initialized", "unable to create stream for ")
# Error messages after which the server will not become ready: stop waiting at once.
FATAL_MESSAGES = ("failed to load '", "Poll failed for model directory", "failed to start ")


@dataclass(frozen=True)
class TritonInstall:
    """The files of the tritonserver bundled in the nvidia-pytriton wheel."""

    server: Path
    python_backend: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # the python backend stub built for the running interpreter


def find_tritonserver() -> TritonInstall:
    """Locate the bundled server, python backend and this interpreter's stub, or say how to fix."""
    import importlib.util  # find_spec does not import pytriton itself

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            f"nvidia-pytriton is not installed in {sys.prefix}, so there is no tritonserver "
            f"to run; install it with: {INSTALL_FIX}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    stubs = root / "python_backend_stubs"
    install = TritonInstall(
        server=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python" / "libtriton_python.so",
        backend_utils=root / "backends" / "python" / "triton_python_backend_utils.py",
        stub=stubs / version / STUB_NAME,
    )
    if install.server.is_file() and not install.stub.is_file() and stubs.is_dir():
        built = sorted(p.parent.name for p in stubs.glob(f"*/{STUB_NAME}"))
        raise ServerError(
            f"the python backend stub for Python {version} is missing from {stubs} (built for: "
            f"{', '.join(built) or 'none'}); a stub of another version makes the server hang "
            f"while loading. Use a venv of one of those versions, then: {INSTALL_FIX}"
        )
    missing = [str(p) for p in vars(install).values() if not p.is_file()]
    if missing:
        raise ServerError(
            f"the tritonserver bundled in nvidia-pytriton is incomplete, missing: "
            f"{', '.join(missing)}; reinstall it with: {INSTALL_FIX}"
        )
    for program in (install.server, install.stub):
        if not os.access(program, os.X_OK):
            raise ServerError(f"{program} is not executable; reinstall with: {INSTALL_FIX}")
    return install


def prepare_backend_dir(directory: Path, install: TritonInstall | None = None) -> Path:
    """Fill `directory/python/` with links to the python backend; return `directory`.

    The result is what `tritonserver --backend-directory` expects. Existing links are replaced.
    """
    install = install or find_tritonserver()
    python_dir = directory / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {
        install.python_backend.name: install.python_backend,
        install.backend_utils.name: install.backend_utils,
        STUB_NAME: install.stub,
    }
    for name, source in links.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return directory


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver and its stubs: the venv's bin/ first on PATH and the
    interpreter's LIBDIR first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend(str(Path(sys.executable).parent), env.get("PATH"))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = _prepend(libdir, env.get("LD_LIBRARY_PATH"))
    return env


def _prepend(entry: str, search_path: str | None) -> str:
    rest = [p for p in (search_path or "").split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *rest])


def preflight_stub(stub: Path, env: Mapping[str, str], timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Run the stub with no arguments in the server's environment; raise unless it is healthy.

    A healthy stub prints "Expected 9 arguments" and exits 1. Anything else (typically exit
    127: libpython not found) would make the server hang in "loading" forever.
    """
    try:
        done = subprocess.run(
            [str(stub)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ServerError(
            f"the python backend stub {stub} did not answer within {timeout:.0f} s when run "
            f"with no arguments; reinstall with: {INSTALL_FIX}"
        ) from None
    except OSError as err:
        raise ServerError(f"cannot run the python backend stub {stub}: {err}") from None
    if done.returncode == 1 and "Expected 9 arguments" in done.stdout + done.stderr:
        return
    shown = (done.stderr.strip() or done.stdout.strip() or "(no output)")[-2000:]
    libdir = sysconfig.get_config_var("LIBDIR")
    raise ServerError(
        f"the python backend stub {stub} is broken here (exit {done.returncode}), so the "
        f"server would hang loading python models. It said:\n{shown}\n"
        f"It needs libpython{sys.version_info.major}.{sys.version_info.minor} from {libdir} "
        f"(a shared build of this Python) and this venv's packages: {INSTALL_FIX}"
    )


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


def failure_reasons(log_text: str) -> list[str]:
    """The server's own error lines from a tritonserver log, unescaped, without known noise."""
    reasons: list[str] = []
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if match and match["level"] == "E":
            reason = _unquote(match["msg"])
        elif line.startswith(("error: ", "[libprotobuf ERROR")):
            reason = line.strip()
        else:
            continue
        if reason and reason not in reasons and not any(n in reason for n in LOG_NOISE):
            reasons.append(reason)
    # Triton logs a failing instance twice; keep the "failed to load 'model'" line only.
    instance = "Failed to create instance: "
    return [
        r
        for r in reasons
        if instance not in r
        or not any(o != r and r.split(instance, 1)[1].strip() in o for o in reasons)
    ]


def _unquote(message: str) -> str:
    if len(message) >= 2 and message[0] == message[-1] == '"':
        message = message[1:-1].replace("\\n", "\n").replace('\\"', '"')
    return message.rstrip()


def _indent(reason: str) -> str:
    first, *rest = reason.splitlines() or [""]
    return "\n".join([f"  {first}", *(f"    {line}".rstrip() for line in rest)])


def _is_fatal(line: str) -> bool:
    match = LOG_LINE.match(line)
    return bool(match and match["level"] == "E" and any(f in match["msg"] for f in FATAL_MESSAGES))


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


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
    host = wildcard.get(host, host)
    return f"[{host}]" if ":" in host else host


@functools.cache
def supervision():
    """triton/supervisor/supervisor.py: finds the stubs, reloads a model that lost one."""
    return artifacts.load_runtime("supervisor", "supervisor.py")


def stub_pids(shm_prefix: str) -> list[int]:
    """Live python backend stubs of the server whose shm regions start with `shm_prefix`."""
    return list(supervision().stubs(shm_prefix))


class EmbeddedTritonServer:
    """A tritonserver process on a model repository, as a context manager.

    Ports left as None are picked free at construction, so the URLs are known before
    `start()`. The log goes to `log_file` (default: a kept temporary file). With `supervise`
    (the default) the server runs with explicit model control and strict readiness, and a
    supervisor thread reloads a model whose stub process dies (triton/supervisor/).
    `exit_timeout` is Triton's `--exit-timeout-secs`; `stop()` sends SIGKILL only after that
    plus a margin (30 s in all by default).
    """

    def __init__(
        self,
        model_repository: Path,
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
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
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

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        """host:port of the Prometheus endpoint (served under /metrics)."""
        return f"{_client_host(self.host)}:{self.ports['metrics']}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

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
        if self._process is not None:
            raise ServerError(f"this tritonserver is already running (pid {self._process.pid})")
        if not self.model_repository.is_dir():
            raise ServerError(
                f"model repository {self.model_repository} is not a directory; build it with doit"
            )
        check_ports_free(self.host, self.ports)
        install = find_tritonserver()
        env = server_environment()
        preflight_stub(install.stub, env)
        self._echo(f"tritonserver: starting on {self.model_repository} (log: {self.log_path})")
        started = time.monotonic()
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix="llm-in-triton-serve-"))
            backend_dir = prepare_backend_dir(self._workdir / "backends", install)
            process = self._launch(install.server, backend_dir, env)
            self._wait_until_ready(process)
            if self.supervise:
                self.supervisor = (
                    supervision().Supervisor(self.http_url, self.shm_prefix, log=self._echo).start()
                )
        except BaseException:
            self.stop()
            raise
        self._echo(
            f"tritonserver: ready in {time.monotonic() - started:.1f} s (pid {self.pid}): "
            f"HTTP {self.http_url}, gRPC {self.grpc_url}, metrics {self.metrics_url}/metrics"
        )
        return self

    def stop(self) -> None:
        """Stop the server and clean up after it. Idempotent and safe from a signal handler:
        it takes no lock, and a nested call simply finishes the job."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:  # first: the stubs that leave now leave on purpose
            supervisor.stop()
        process = self._process
        if process is not None:
            if process.poll() is None:
                if not self._terminated:
                    self._terminated = True
                    self._signal_group(process, signal.SIGTERM)
                if not _wait(process, self.exit_timeout + KILL_MARGIN):
                    self._signal_group(process, signal.SIGKILL)
                    _wait(process, KILL_TIMEOUT)
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
                preexec_fn=_parent_death_signal(),
            )
        return self._process

    def _wait_until_ready(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.load_timeout
        log = _LogFollower(self.log_path)
        while True:
            fatal = any(_is_fatal(line) for line in log.new_lines())
            exit_code = process.poll()
            if fatal or exit_code is not None:
                self.stop()
                raise ServerError(self._failure_message(exit_code))
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"tritonserver was not ready after {self.load_timeout:.0f} s (load_timeout); "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _is_ready(self) -> bool:
        return http_ready(self.http_url)

    def _failure_message(self, exit_code: int | None) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        reasons = failure_reasons(text)
        shown = "\n".join(_indent(r) for r in reasons[:20])
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

    def _signal_group(self, process: subprocess.Popen, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

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


class _LogFollower:
    """Complete lines appended to a log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """Wait for `process` to exit; with a timeout, Popen.wait takes its lock without blocking."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _parent_death_signal():
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


SAMPLE_TEXT = "Triton serves transformers."


def example_request(settings: Settings, url: str) -> str:
    """A curl command a user can paste: one text per ensemble input."""
    import json

    body = {
        "inputs": [
            {
                "name": name,
                "shape": [1, 1],
                "datatype": "BYTES",
                "data": [SAMPLE_TEXT],
            }
            for name in settings.task.text_inputs
        ]
    }
    return f"curl -s -X POST http://{url}/v2/models/{settings.name}/infer -d '{json.dumps(body)}'"


class DockerTritonServer:
    """NVIDIA's Triton image with the GPU, run through docker-compose.yml (GPU hosts only).

    The same interface as EmbeddedTritonServer, for `doit serve server=docker`."""

    def __init__(self, endpoints: Endpoints, load_timeout: float = 900.0) -> None:
        self.endpoints = endpoints
        self.load_timeout = load_timeout  # the first start builds and pulls the image
        self.http_url = f"{_client_host(endpoints.host)}:{endpoints.http_port}"
        self.grpc_url = f"{_client_host(endpoints.host)}:{endpoints.grpc_port}"
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
        paths.SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
        with open(paths.SERVER_LOG, "wb") as log:
            self._process = subprocess.Popen(
                self.command("up", "--build", "triton"),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.load_timeout
        while not http_ready(self.http_url):
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"the triton container did not become ready; see {paths.SERVER_LOG}"
                )
            time.sleep(1.0)
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        _wait(self._process, 30)
        self._process = None
        print("tritonserver (docker): stopped", flush=True)


def make_server(endpoints: Endpoints):
    if endpoints.server == "docker":
        return DockerTritonServer(endpoints)
    return EmbeddedTritonServer(
        paths.MODELS,
        host=endpoints.host,
        http_port=endpoints.http_port,
        grpc_port=endpoints.grpc_port,
        metrics_port=endpoints.metrics_port,
        log_file=paths.SERVER_LOG,
    )


def sample_request(settings: Settings, url: str) -> None:
    """Answer one request with the real client, so a user sees the deployment work."""
    client = [
        sys.executable,
        str(paths.CLIENT),
        "-u",
        url,
        "-m",
        settings.name,
        *(arg for _ in settings.task.text_inputs for arg in ("-t", SAMPLE_TEXT)),
    ]
    print(f"serve: sample request: {' '.join(client[1:])}", flush=True)
    try:  # no stdin: the client must not wait for texts on a pipe doit was given
        subprocess.run(client, check=False, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print("serve: the sample request took over 120 s; the server keeps running", flush=True)


def serve_foreground(settings: Settings) -> None:
    """Serve models/ until Ctrl-C or SIGTERM, after answering one sample request."""
    import threading

    from tasks.plan import check_served_plans

    check_served_plans(paths.MODELS)  # a plan built for another GPU: our error, not TensorRT's
    server = make_server(settings.endpoints)
    stop, ready = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not ready.is_set():  # still loading: interrupt the wait, start() cleans up
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready.set()
        sample_request(settings, server.http_url)
        print(
            f"serve: try it:\n  {example_request(settings, server.http_url)}\n"
            f"  python triton/send_request.py --protocol grpc -u {server.grpc_url} "
            f"-m {settings.name} -t 'your text' --statistics\n"
            "serve: Ctrl-C stops the server",
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.running:
                raise server.failure()
    except KeyboardInterrupt:
        print("serve: interrupted while the server was starting", flush=True)
    finally:
        ready.set()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def task_serve():
    """Serve models/ on tritonserver (embedded, or server=docker); builds stale parts first."""
    settings = current()
    return {
        "actions": [(fails_cleanly(serve_foreground), [settings])],
        "task_dep": ["repo"],
        "uptodate": [False],
    }
