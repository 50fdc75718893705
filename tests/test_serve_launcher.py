"""The embedded tritonserver launcher against the real server from the nvidia-pytriton wheel.

Model repositories are built here: an identity model on the python backend, one whose
`initialize` raises, and one that loads too slowly. No mock stands in for Triton.
"""

from __future__ import annotations

import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import ServerError
from tasks.server import (
    STUB_NAME,
    EmbeddedTritonServer,
    find_tritonserver,
    free_port,
    preflight_stub,
    prepare_backend_dir,
    server_environment,
)
from tests.helpers.client import infer
from tests.helpers.models import IDENTITY_MODEL, add_model

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("tokenizer.json is missing next to model.py")

    def execute(self, requests):
        return []
"""

SLOW_MODEL = """\
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(60)

    def execute(self, requests):
        return []
"""


def live_processes() -> dict[int, list[str]]:
    """argv of every live (not zombie) process, read from /proc independently of tasks.server."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and state not in ("Z", "X"):
            found[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def stubs_of(server: EmbeddedTritonServer) -> list[int]:
    return [
        pid
        for pid, argv in live_processes().items()
        if argv and argv[0].endswith(STUB_NAME) and any(server.shm_prefix in a for a in argv)
    ]


def servers_on(repo: Path) -> list[int]:
    flag = f"--model-repository={repo.resolve()}"
    return [pid for pid, argv in live_processes().items() if flag in argv]


def shm_regions_of(server: EmbeddedTritonServer) -> list[Path]:
    return sorted(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


@pytest.fixture(scope="module")
def server(identity_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("identity_log") / "tritonserver.log"
    with EmbeddedTritonServer(identity_repo, log_file=log, load_timeout=60) as running:
        yield running


# --- the bundled server and its python backend ----------------------------------------------


def test_find_tritonserver_picks_the_stub_of_this_interpreter():
    install = find_tritonserver()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert install.stub.parent.name == version
    assert install.server.name == "tritonserver"
    assert all(path.is_file() for path in vars(install).values())


def test_prepare_backend_dir_links_the_python_backend(tmp_path):
    install = find_tritonserver()
    backend_dir = prepare_backend_dir(tmp_path / "backends", install)
    prepare_backend_dir(tmp_path / "backends", install)  # again: links are replaced
    python_dir = backend_dir / "python"
    assert (python_dir / STUB_NAME).resolve() == install.stub.resolve()
    assert (python_dir / "libtriton_python.so").resolve() == install.python_backend.resolve()
    utils = python_dir / "triton_python_backend_utils.py"
    assert utils.resolve() == install.backend_utils.resolve()


def test_server_environment_puts_venv_bin_and_libdir_first():
    venv_bin = str(Path(sys.executable).parent)
    libdir = sysconfig.get_config_var("LIBDIR")
    env = server_environment({"PATH": f"/usr/bin:{venv_bin}", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(":") == [venv_bin, "/usr/bin"]
    assert env["LD_LIBRARY_PATH"].split(":") == [libdir, "/opt/lib"]


def test_preflight_accepts_the_bundled_stub():
    preflight_stub(find_tritonserver().stub, server_environment())


def test_preflight_rejects_a_stub_that_cannot_start(tmp_path):
    stub = tmp_path / STUB_NAME
    stub.write_text(
        "#!/bin/sh\necho 'libpython3.x.so.1.0: cannot open shared object' >&2\nexit 127\n"
    )
    stub.chmod(0o755)
    with pytest.raises(ServerError, match=r"(?s)exit 127.*libpython3\.x\.so\.1\.0: cannot open"):
        preflight_stub(stub, server_environment())


# --- a real server ----------------------------------------------------------------------------


@pytest.mark.server
def test_identity_model_answers_over_http(server):
    data = np.array([[0.5, -1.0, 3.25], [7.0, 0.0, -2.5]], dtype=np.float32)
    result = infer(server, "http", "identity", {"INPUT0": data})
    np.testing.assert_array_equal(result["OUTPUT0"], data)


def test_port_in_use_fails_before_launching(identity_repo, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "never.log"
        server = EmbeddedTritonServer(identity_repo, http_port=port, log_file=log)
        expected = rf"port {port} \(http\) is already in use on 127\.0\.0\.1; pass http_port="
        with pytest.raises(ServerError, match=expected):
            server.start()
    assert not log.exists(), "the server was launched although its port was taken"
    assert server.pid is None


@pytest.mark.server
def test_broken_model_fails_with_its_own_error_and_leaves_nothing(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "identity", IDENTITY_MODEL)
    add_model(repo, "broken", BROKEN_MODEL)
    server = EmbeddedTritonServer(repo, log_file=tmp_path / "server.log", load_timeout=60)
    with pytest.raises(ServerError) as raised:
        server.start()
    message = str(raised.value)
    assert "failed to load 'broken'" in message
    assert "RuntimeError: tokenizer.json is missing next to model.py" in message
    assert "not ready after" not in message  # failed on the model's error, not on the timeout
    assert "pinned memory" not in message  # reason lines only, not the whole log
    assert servers_on(repo) == []
    assert stubs_of(server) == []
    assert shm_regions_of(server) == []


@pytest.mark.server
def test_load_timeout_stops_a_server_that_never_gets_ready(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "slow", SLOW_MODEL)
    server = EmbeddedTritonServer(repo, log_file=tmp_path / "server.log", load_timeout=3)
    with pytest.raises(ServerError, match=r"(?s)not ready after 3 s.*loading: slow:1"):
        server.start()
    assert servers_on(repo) == []
    assert stubs_of(server) == []
    assert shm_regions_of(server) == []


@pytest.mark.server
def test_stop_leaves_nothing_behind_and_frees_the_ports(identity_repo, tmp_path):
    ports = {kind: free_port() for kind in ("http", "grpc", "metrics")}
    first = EmbeddedTritonServer(
        identity_repo,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        log_file=tmp_path / "first.log",
    )
    with first:
        pid = first.pid
        assert stubs_of(first), "the identity model should run in a python backend stub"
        assert shm_regions_of(first), "the python backend should hold a shm region"
    assert pid not in live_processes()
    assert stubs_of(first) == []
    assert shm_regions_of(first) == []
    first.stop()  # idempotent

    second = EmbeddedTritonServer(
        identity_repo,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        log_file=tmp_path / "second.log",
    )
    with second:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(second.http_url)
        assert client.is_model_ready("identity")
        client.close()
    assert stubs_of(second) == []


def test_the_supervisor_as_a_container_entrypoint_heals_the_server_it_starts(
    identity_repo, tmp_path
):
    """`supervisor.py --admin-key-file F -- tritonserver ...` (the server image's command): it
    adds the flags a reload needs, closes model control behind the secret in F (and reloads
    with it), reloads a model whose stub was killed, passes SIGTERM on, exits as the server
    does."""
    import os
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tasks import paths
    from tasks.server import http_ready, supervision

    install = find_tritonserver()
    env = server_environment()
    backend_dir = prepare_backend_dir(tmp_path / "backends", install)
    http, grpc, metrics = free_port(), free_port(), free_port()
    prefix = f"llm_in_triton_entry_{os.getpid()}_"
    secret = tmp_path / "admin-key"
    secret.write_text("the-admin-secret\n")
    secret.chmod(0o600)
    command = [
        sys.executable,
        str(paths.runtime_file("supervisor", "supervisor.py")),
        "--url", f"127.0.0.1:{http}", "--shm-prefix", prefix, "--admin-key-file", str(secret), "--",
        str(install.server), f"--model-repository={identity_repo}",
        f"--backend-directory={backend_dir}",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
    ]  # fmt: skip
    log = tmp_path / "entry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not http_ready(f"127.0.0.1:{http}", "identity"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        unload = f"http://127.0.0.1:{http}/v2/repository/models/identity/unload"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(unload, data=b"{}"), timeout=10)
        assert refused.value.code == 403
        shown = [" ".join(argv) for argv in live_processes().values()]
        assert any("@ADMIN_KEY@" in line for line in shown)  # the server, its placeholder only
        assert not any("the-admin-secret" in line for line in shown)
        pids = list(supervision().stubs(prefix))
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "'identity' is back in" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert http_ready(f"127.0.0.1:{http}", "identity")
        text = log.read_text()
        assert "adding --model-control-mode=explicit --load-model=* --strict-readiness=true" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0 and "tritonserver exited with 0" in log.read_text()
    assert not supervision().stubs(prefix)


def test_the_entrypoint_ends_the_server_when_a_held_model_loses_a_stub(tmp_path):
    """A model whose requests outlive execute (the generation loop's config says so): a reload
    would leave its requests hanging, so the image's supervisor ends the server and exits for
    the container to be started again (compose's restart policy, Kubernetes)."""
    import os
    import signal
    import subprocess
    import time

    from tasks import paths
    from tasks.server import http_ready, supervision
    from tests.helpers.models import IDENTITY_MODEL, add_model

    repo = tmp_path / "repo"
    add_model(repo, "held", IDENTITY_MODEL)
    config = repo / "held" / "config.pbtxt"
    config.write_text(
        config.read_text()
        + 'parameters { key: "requests_outlive_execute" value { string_value: "true" } }\n'
    )
    install = find_tritonserver()
    backend_dir = prepare_backend_dir(tmp_path / "backends", install)
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [  # no shm prefix: the supervisor gives the server one of its own
        sys.executable, str(paths.runtime_file("supervisor", "supervisor.py")),
        "--url", f"127.0.0.1:{http}", "--",
        str(install.server), f"--model-repository={repo}", f"--backend-directory={backend_dir}",
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
    ]  # fmt: skip
    log, temporary = tmp_path / "entry.log", tmp_path / "tmp"
    temporary.mkdir()  # where the supervisor writes this run's admin secret
    with open(log, "wb") as out:
        environment = {**server_environment(), "TMPDIR": str(temporary)}
        proc = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
    prefix = f"llm_in_triton_supervised_{proc.pid}_"
    try:
        deadline = time.monotonic() + 60
        while not http_ready(f"127.0.0.1:{http}", "held"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1)  # a look at the stubs as loaded
        os.kill(next(iter(supervision().stubs(prefix))), signal.SIGKILL)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert code != 0, text
    assert "the requests it held are answered by no one now" in text
    assert "so that it restarts" in text and "is back in" not in text
    # the killed server's shm regions and this run's secret are gone with the supervisor
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    assert not list(temporary.iterdir())


def test_a_stub_name_gives_its_model_with_or_without_an_instance_group():
    from tasks.server import supervision

    strip = supervision().strip_instance
    ready = {"identity", "gpt_2", "encode_model"}
    assert strip("identity_0", ready) == "identity"  # no instance_group in the config
    assert strip("encode_model_0_0", ready) == "encode_model"
    assert strip("gpt_2_0_0", ready) == "gpt_2"  # a name ending in digits keeps them
    assert strip("gone_0_1", ready) == "gone"  # not ready: the 2.51 pattern
    assert strip("encode_model_0_0") == "encode_model"
