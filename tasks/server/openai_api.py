"""`OpenAIServer`: the OpenAI-compatible API (triton/openai_api/server.py) as a child process
in front of a running Triton server, kept alive: a process that exits is started again.

Standard library only at import (`doit list` imports tasks.server).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks import paths
from tasks.errors import ServerError
from tasks.server.embedded import end_group, parent_death_signal
from tasks.server.network import check_ports_free, client_host, wait_until_ready

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CHECK_INTERVAL = 0.5  # seconds between looks at the process
RETRY_AFTER = 5.0  # seconds before a start that failed is tried again


GATEWAY_ERRORS = (502, 504)  # nginx in front, with no API behind it (yet)


def answers(url: str) -> bool:
    """The API answers /health (any status: a Triton model not ready yet is still an answer;
    not nginx's 502 for an API that is not up behind it)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{url}/health", timeout=1.0):
            return True
    except urllib.error.HTTPError as err:
        return err.code not in GATEWAY_ERRORS
    except (urllib.error.URLError, OSError):
        return False


def for_server(server, repository: Path, endpoints, **options) -> OpenAIServer:
    """The API's process for a started `server` (not started itself): on the endpoints'
    `host:openai_port`; or, where nginx fronts that port (a ReplicaSet's `openai_backend`),
    on loopback behind it, speaking gRPC to nginx's balanced front (`server.grpc_url`)."""
    backend = getattr(server, "openai_backend", None)
    host, port = ("127.0.0.1", backend) if backend else (endpoints.host, endpoints.openai_port)
    options.setdefault("max_body_mb", endpoints.max_body_mb)
    return OpenAIServer(server.grpc_url, repository, host, port, **options)


class OpenAIServer:
    """The API on `host:port`, for the Triton server at `triton_grpc` (host:port) serving the
    repository folder `repository`. The API key, if any, comes from the environment it
    inherits ($LLM_IN_TRITON_API_KEY or its _FILE), as Triton's does."""

    def __init__(
        self,
        triton_grpc: str,
        repository: Path,
        host: str = "127.0.0.1",
        port: int = 9000,
        log_file: Path | None = None,
        log=print,
        max_body_mb: int = 4,
    ) -> None:
        self.triton_grpc, self.repository = triton_grpc, Path(repository)
        self.host, self.port = host, port
        self.log, self.max_body_mb = log, max_body_mb
        if log_file is None:
            log_file = Path(tempfile.gettempdir()) / "llm-in-triton" / "openai-api.log"
        self.log_path = Path(log_file)
        self.restarts: list[dict] = []  # pid, exit code, seconds to answer again
        self._process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """host:port, for clients on this machine."""
        return f"{client_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(paths.runtime_file("openai_api", "server.py")),
            "--triton",
            self.triton_grpc,
            "--repository",
            str(self.repository),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-body-mb",
            str(self.max_body_mb),
        ]

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(),  # never left holding the port after a kill
            )

        def check() -> None:
            if not self.running:
                raise self.failure()

        if not wait_until_ready(lambda: answers(self.url), check, START_TIMEOUT, 0.1):
            raise self.failure()

    def start(self) -> OpenAIServer:
        """Start the API and the thread that starts it again if it exits."""
        check_ports_free(self.host, {"openai": self.port})
        try:
            self._launch()
        except BaseException:
            self._end_process()
            raise
        self._thread = threading.Thread(target=self._keep_up, name="openai-api", daemon=True)
        self._thread.start()
        return self

    def _keep_up(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL):
            if self.running or self._stop.is_set():
                continue
            process = self._process
            code = process.returncode if process is not None else None
            self.log(f"openai api: exited (pid {self.pid}, code {code}); starting it again")
            began = time.monotonic()
            while not self._stop.is_set():
                try:
                    self._launch()
                except ServerError as err:
                    self.log(f"openai api: did not start again: {err}")
                    self._stop.wait(RETRY_AFTER)
                    continue
                seconds = round(time.monotonic() - began, 1)
                self.restarts.append({"pid": process.pid, "exit": code, "seconds": seconds})
                self.log(f"openai api: back (pid {self.pid}, {seconds} s)")
                break

    def failure(self) -> ServerError:
        code = self._process.poll() if self._process is not None else None
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        lines = [f"  {line}" for line in text.splitlines()[-10:]] or ["  (no log)"]
        state = "does not answer" if code is None else f"exited with code {code}"
        return ServerError(
            f"the OpenAI API ({self.url}) {state}; its log, {self.log_path}:\n" + "\n".join(lines)
        )

    def _end_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            end_group(process, signal.SIGTERM, STOP_TIMEOUT)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._end_process()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
