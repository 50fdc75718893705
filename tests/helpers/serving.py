"""What tests of a running server share."""

from __future__ import annotations

import os
import re
import time

import pytest

# The shapes every deployment of the session's `served` fixture is built with.
SERVED_SHAPES = ("batch=1,4,8", "seq=1,64,128")
# The tasks `served` builds: task -> the fixture that gives its model (None: the task's
# default). Each is served twice: the python backend's one hop (<task>) and the native
# backends' steps on it (<task>_steps, one_hop=0).
SERVED_MODELS: dict[str, str | None] = {
    "encode": None,
    "seqcls": "labelled_minilm_dir",
    "qa": "crafted_qa_dir",
    "ner": "ner_dir",
}
SERVED_DEPLOYMENTS = [*SERVED_MODELS, *(f"{task}_steps" for task in SERVED_MODELS)]


def counted(read, done):
    """`read()` once `done` holds of it, or after 5 s: Triton's statistics count a request
    when Triton releases it, which can be just after its client has the answer."""
    deadline = time.monotonic() + 5
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def kill_stubs_and_wait(server, model: str, answer, timeout: float = 30.0) -> float:
    """SIGKILL every python-backend stub of `model` (this server's only), then wait until
    `answer()` succeeds again with nobody's help. Readiness must say not-ready in between.
    Returns the seconds until the answer came back."""
    import signal
    import time

    from tasks.server import http_ready, supervision

    found = supervision().stubs(server.shm_prefix)
    pids = [pid for pid, name in found.items() if re.sub(r"_\d+_\d+$", "", name) == model]
    assert pids, f"no stub of {model} among {sorted(found.values())}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    started, was_not_ready = time.monotonic(), False
    while time.monotonic() - started < timeout:
        if not http_ready(server.http_url):
            was_not_ready = True
        elif was_not_ready:
            try:
                answer()
                return time.monotonic() - started
            except Exception:  # not back yet
                pass
        time.sleep(0.05)
    raise AssertionError(f"{model} did not answer again within {timeout:.0f} s of its stub kill")


def generation_outcomes(server, model: str) -> dict[str, float]:
    """llm_in_triton_generation_requests of a model, by outcome (Triton's metrics)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{server.metrics_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("llm_in_triton_generation_requests{") and f'model="{model}"' in line:
            outcome = line.split('outcome="')[1].split('"')[0]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


def nginx_missing() -> bool:
    """No nginx for replicas=N here (the tests that need it skip, naming the package)."""
    from tasks.errors import ServerError
    from tasks.server import find_nginx

    try:
        find_nginx()
    except ServerError:
        return True
    return False


needs_nginx = pytest.mark.skipif(
    nginx_missing(), reason="no nginx: apt-get install nginx (.ci/run does)"
)


def doit_serve(project, log_path, *args: str, environment: dict | None = None):
    """`doit serve ARGS...` in `project` on free ports (the OpenAI API off), its output to
    `log_path`, once it says it serves: (the process, the server's URLs, the port variables).
    The caller stops it (SIGTERM)."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from tasks.server import free_port
    from tests.helpers.project import OFFLINE_ENV

    ports: list[int] = []
    while len(ports) < 3:
        if (port := free_port()) not in ports:
            ports.append(port)
    variables = [f"{k}_port={p}" for k, p in zip(("http", "grpc", "metrics"), ports)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "doit", "serve", *args, *variables, "openai_port=0"],
            cwd=project.root,
            env={**os.environ, **OFFLINE_ENV, **(environment or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 300
    while "Ctrl-C stops the server" not in (output := log_path.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(output)
        time.sleep(0.2)
    server = SimpleNamespace(http_url=f"127.0.0.1:{ports[0]}", grpc_url=f"127.0.0.1:{ports[1]}")
    return process, server, variables
